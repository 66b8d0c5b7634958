"""``clipforge eval ...``: every command on a tiny checkpoint and tiny data, JSON out, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipforge.checkpoints import save_model
from clipforge.cli.main import main

SCENES = "builtin:scenes-counting?n_per_class=5&size=32"


@pytest.fixture
def ckpt(micro_vit, tmp_path):
    path = tmp_path / "micro.safetensors"
    save_model(micro_vit, path)
    return str(path)


def _run(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _common(tmp_path, ckpt):
    return ["--model", ckpt, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--batch-size", "8"]


def _records(tmp_path, task):
    files = sorted((tmp_path / "out").glob(f"{task}__*.json"))
    assert files, f"no {task} record written"
    return [json.loads(f.read_text()) for f in files]


def test_zeroshot_cli(capsys, tmp_path, ckpt):
    code, out, err = _run(capsys, "zeroshot", *_common(tmp_path, ckpt), "--dataset", SCENES, "--compare-prompts",
                          "--save-classifier", str(tmp_path / "head.safetensors"))
    assert code == 0, err
    rec = _records(tmp_path, "zeroshot_classification")[0]
    # CLIP_benchmark's keys: model = architecture, pretrained = the weights, language
    assert rec["model"] == "micro-vit" and rec["pretrained"] == ckpt and rec["language"] == "en"
    assert rec["dataset"] == "scenes-counting" and {"acc1", "acc5", "mean_per_class_recall"} <= set(rec["metrics"])
    assert "== zeroshot_classification ==" in out and "acc1" in out and "ensemble" in out
    # the template choice is printed and recorded (the scenes define their own templates)
    assert rec["templates_set"] == "dataset" and "zero-shot templates: dataset" in out
    assert rec["templates"] and all("{c}" in t for t in rec["templates"])
    assert (tmp_path / "head.safetensors").is_file()
    # Second run: the head comes from the cache.
    code, out, _ = _run(capsys, "zeroshot", *_common(tmp_path, ckpt), "--dataset", SCENES)
    assert code == 0 and "cache hit" in out


def test_probe_fewshot_robustness_retrieval_cli(capsys, tmp_path, ckpt):
    c = _common(tmp_path, ckpt)
    assert _run(capsys, "linear-probe", *c, "--dataset", SCENES, "--max-iter", "30")[0] == 0
    assert _run(capsys, "fewshot", *c, "--dataset", SCENES, "--shots", "1,2", "--seeds", "2", "--max-iter", "30")[0] == 0
    code, out, err = _run(capsys, "robustness", *c, "--dataset", SCENES, "--shifts", "grayscale,jpeg:5", "--C", "1",
                          "--max-iter", "30")
    assert code == 0, err and "jpeg:5" in out
    code, out, err = _run(capsys, "retrieval", *c, "--dataset", "builtin:scenes?n=8&size=32", "--split", "test",
                          "--ks", "1,5")
    assert code == 0, err
    assert "text_retrieval_recall@5" in _records(tmp_path, "zeroshot_retrieval")[0]["metrics"]
    lp = _records(tmp_path, "linear_probe")[0]
    assert lp["C"] > 0 and {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} <= set(lp["metrics"])
    assert "acc1" not in lp["metrics"]  # would land in the zero-shot column of clip_benchmark's CSV
    assert set(_records(tmp_path, "fewshot")[0]["curve"]) == {"1", "2"}
    assert [r["shift"] for r in _records(tmp_path, "robustness")[0]["shifts"]] == ["clean", "grayscale", "jpeg:5"]


def test_suite_cli(capsys, tmp_path, ckpt):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
tasks:
  - task: zeroshot
    dataset: "{SCENES}"
  - task: fewshot
    dataset: "{SCENES}"
    shots: [1, 2]
    seeds: 2
    max_iter: 20
""", encoding="utf-8")
    code, out, err = _run(capsys, "suite", *_common(tmp_path, ckpt), "--suite", str(suite))
    assert code == 0, err
    assert (tmp_path / "out" / "report.html").is_file() and "== fewshot ==" in out
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == ["zeroshot_classification", "fewshot"]


def test_cli_errors(capsys, tmp_path, ckpt):
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n", encoding="utf-8")
    code, _, err = _run(capsys, "zeroshot", *_common(tmp_path, ckpt), "--dataset", SCENES, "--classnames", str(names))
    assert code == 1 and "names.txt: 2 class names" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "zeroshot", *_common(tmp_path, ckpt), "--dataset", SCENES, "--templates",
                        str(tmp_path / "nope.txt"))
    assert code == 1 and "template file not found" in err
    code, _, err = _run(capsys, "zeroshot", "--model", "ViT-B-32", "--dataset", SCENES)
    assert code == 1 and "--random-init" in err
    code, _, err = _run(capsys, "robustness", *_common(tmp_path, ckpt), "--dataset", SCENES, "--shifts", "fog")
    assert code == 2 and "argument --shifts: unknown shift 'fog'" in err  # refused while parsing


def test_unreadable_image_is_skipped_and_reported(capsys, tmp_path, ckpt):
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "9.png").write_bytes(b"not a png")
    code, out, err = _run(capsys, "zeroshot", *_common(tmp_path, ckpt), "--dataset", str(root), "--templates", "simple")
    assert code == 0, err
    rec = _records(tmp_path, "zeroshot_classification")[0]
    assert rec["skipped"] == 1 and rec["n_samples"] == 6
    assert "1 unreadable item(s) skipped" in out


def test_random_init_zoo_model(capsys, tmp_path):
    code, out, err = _run(capsys, "zeroshot", "--model", "tiny-vit", "--random-init", "--dataset", SCENES,
                          "--templates", "simple", "--out", str(tmp_path / "out"), "--no-cache", "--no-progress")
    assert code == 0, err
    rec = _records(tmp_path, "zeroshot_classification")[0]
    assert rec["model"] == "tiny-vit" and rec["pretrained"] == "random-init-seed0" and rec["num_classes"] == 3
