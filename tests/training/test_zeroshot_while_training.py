"""Zero-shot on a labelled dataset while training: the metric lands in metrics.jsonl every N steps
(and in the curves), on its own cadence beside the periodic evaluation; bad specs fail up front."""

from __future__ import annotations

import json

import pytest

from clipforge.training import TrainConfig, train

ZS = "builtin:scenes-counting?n_per_class=3&size=32"


def _cfg(model_json, out, **kw) -> TrainConfig:
    base = dict(model=model_json, data="builtin:scenes?n=16&size=32", steps=6, batch_size=8, warmup=1,
                num_workers=0, save_every=0, log_every=1, progress=False, threads=1, out=str(out))
    return TrainConfig(**{**base, **kw})


def test_metric_written_every_n_steps(tmp_path, model_json):
    out = tmp_path / "run"
    summary = train(_cfg(model_json, out, zeroshot_data=ZS, zeroshot_frequency=2, zeroshot_templates="photo"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval/zeroshot_acc" in r]
    assert [r["step"] for r in scored] == [2, 4, 6]
    assert all(0.0 <= r["eval/zeroshot_acc"] <= 1.0 for r in scored)
    assert summary["last_eval"]["eval/zeroshot_acc"] == scored[-1]["eval/zeroshot_acc"]
    assert (out / "curves.png").stat().st_size > 1000


def test_own_cadence_beside_eval_every(tmp_path, model_json):
    out = tmp_path / "run"
    train(_cfg(model_json, out, zeroshot_data=ZS, zeroshot_frequency=3, eval_every=2))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/zeroshot_acc" in r] == [3, 6]
    scenes = [r["step"] for r in records if any(k.startswith("eval/") and "zeroshot" not in k for k in r)]
    assert scenes == [2, 4, 6]  # the scene tasks at eval_every, as before


def test_bad_zeroshot_options_fail_before_training(tmp_path, model_json):
    with pytest.raises(ValueError, match="zeroshot_frequency"):
        TrainConfig(zeroshot_data=ZS)
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        train(_cfg(model_json, tmp_path / "r", zeroshot_data=str(tmp_path / "nope"), zeroshot_frequency=1))
    assert not (tmp_path / "r" / "checkpoints").exists()
