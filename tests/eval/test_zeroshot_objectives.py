"""``clipforge eval`` on models trained with the bag-of-words and caption objectives: zero-shot
works through the same command (scores from the model's head), retrieval is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import micro_config

from clipforge.checkpoints import save_model
from clipforge.cli.main import main
from clipforge.models import create_model

SCENES = "builtin:scenes-counting?n_per_class=2&size=32"


@pytest.mark.parametrize("objective", ["bow", "caption"])
def test_eval_zeroshot_and_retrieval_refusal(capsys, tmp_path, objective):
    ckpt = tmp_path / f"{objective}.safetensors"
    save_model(create_model(dataclasses.replace(micro_config("vit"), objective=objective), seed=0), ckpt)
    common = ["--model", str(ckpt), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
              "--no-progress", "--batch-size", "8"]
    assert main(["eval", "zeroshot", *common, "--dataset", SCENES, "--compare-prompts"]) == 0, capsys.readouterr().err
    rec = json.loads(next((tmp_path / "out").glob("zeroshot_classification__*.json")).read_text())
    assert rec["num_classes"] == 3 and 0.0 <= rec["metrics"]["acc1"] <= 1.0
    assert "acc1_single_template" in rec["metrics"]
    # bow records also carry the score without the token prior; caption has no such variant
    assert ("acc1_token_prior_removed" in rec["metrics"]) == (objective == "bow")
    capsys.readouterr()
    assert main(["eval", "retrieval", *common, "--dataset", "builtin:scenes?n=8&size=32", "--split", "test"]) == 1
    assert "no aligned text embedding" in capsys.readouterr().err
