"""Feature caching, bad input handling, every task's record (JSON schema), suite + HTML report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.eval import EvalContext, InMemoryLabelled, extract_features, run_suite
from clipforge.eval.records import TASKS, records_table
from clipforge.eval.suite import load_suite
from clipforge.eval.tasks import run_fewshot, run_linear_probe, run_retrieval, run_robustness, run_zeroshot
from clipforge.preprocess import ImageLoadError

SCENES = "builtin:scenes-counting?n_per_class=6&size=32"


class FlakyDataset(InMemoryLabelled):
    """Items listed in ``bad`` raise ImageLoadError, like a corrupt file in a real dataset."""

    def __init__(self, *a, bad=(), **k):
        super().__init__(*a, **k)
        self.bad = set(bad)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        if i in self.bad:
            raise ImageLoadError(f"cannot decode image item{i}.jpg")
        return super().__getitem__(i)


def _toy(n=24, bad=(), k=3):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]
    return FlakyDataset(imgs, np.arange(n) % k, ["zebra", "violin", "pizza"][:k], name="toy", bad=bad)


def _check_record(rec, task):
    assert set(["dataset", "model", "task", "metrics"]) <= set(rec)
    assert rec["task"] == task and task in TASKS
    assert isinstance(rec["dataset"], str) and isinstance(rec["model"], str)
    assert rec["metrics"] and all(v is None or isinstance(v, (int, float)) for v in rec["metrics"].values())
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN/inf, everything serialisable


def test_features_cache_and_skips(micro_vit, tmp_path):
    ds = _toy(bad={3, 7})
    fs = extract_features(micro_vit, ds, ds.labels, batch_size=5, cache_path=tmp_path / "f")
    assert fs.skipped == 2 and len(fs) == 22 and 3 not in fs.indices and 7 not in fs.indices
    assert fs.features.dtype == np.float16 and fs.features.shape == (22, 32)
    assert np.allclose(np.linalg.norm(fs.features.astype(np.float32), axis=1), 1, atol=2e-3)
    assert (fs.labels == ds.labels[fs.indices]).all()
    assert "item3.jpg" in fs.skipped_messages[0]
    reads = ds.reads
    again = extract_features(micro_vit, ds, ds.labels, cache_path=tmp_path / "f")
    assert again.cached and ds.reads == reads                  # no image was read again
    assert np.array_equal(np.asarray(again.features), np.asarray(fs.features)) and again.skipped == 2
    assert np.array_equal(again.indices, fs.indices)
    direct = torch.nn.functional.normalize(micro_vit.encode_image(
        torch.stack([__import__("clipforge.preprocess", fromlist=["x"]).image_transform(micro_vit.config.preprocess)(ds.images[0])])), dim=-1)
    assert np.allclose(fs.features[0].astype(np.float32), direct.detach().numpy()[0], atol=2e-3)
    # A different dataset length invalidates the cache entry.
    assert not extract_features(micro_vit, _toy(n=12), cache_path=tmp_path / "f").cached


def test_zeroshot_record_counts_skipped_and_checks_classnames(micro_vit, tmp_path):
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path)
    rec = run_zeroshot(ctx, _toy(bad={0}), templates="simple", compare_prompts=True)
    _check_record(rec, "zeroshot_classification")
    assert rec["skipped"] == 1 and rec["n_samples"] == 23
    assert set(rec["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall", "ensemble_gain_over_classname",
                                   "ensemble_gain_over_single_template"}
    assert np.asarray(rec["confusion_matrix"]).sum() == 23
    assert set(rec["prompt_comparison"]) == {"classname_only", "single_template", "ensemble"}
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"names.txt: 2 class names.*labels in \[0, 2\]"):
        run_zeroshot(ctx, _toy(), classnames=str(names))
    names.write_text("a\nb\nc\nd\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"names.txt: 4 class names, but dataset 'toy' defines 3"):
        run_zeroshot(ctx, _toy(), classnames=str(names))


def test_oracle_zero_shot_task_is_perfect(oracle_kit, tmp_path):
    labels = np.arange(30) % 5
    ds = InMemoryLabelled([oracle_kit.class_image(int(c), seed=i) for i, c in enumerate(labels)], labels,
                          oracle_kit.CLASSES[:5], name="oracle")
    ctx = EvalContext(oracle_kit.OracleCLIP(), model_name="oracle", cache_dir=tmp_path)
    rec = run_zeroshot(ctx, ds, templates="imagenet")
    assert rec["metrics"]["acc1"] == 1.0 and rec["metrics"]["mean_per_class_recall"] == 1.0
    assert rec["templates"] == {"set": "imagenet", "count": 80}


def test_all_tasks_on_builtin_scenes(micro_vit, tmp_path):
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path, batch_size=16)
    zs = run_zeroshot(ctx, SCENES)
    _check_record(zs, "zeroshot_classification")
    assert zs["templates"]["set"] == "dataset"           # the scenes task defines its own templates
    assert zs["dataset"] == "scenes-counting" and zs["n_samples"] == 18
    lp = run_linear_probe(ctx, SCENES, test_fraction=0.5, max_iter=50)
    _check_record(lp, "linear_probe")
    assert lp["n_train"] + lp["n_test"] == 18 and lp["C"] > 0 and lp["C_search"]
    fs = run_fewshot(ctx, SCENES, shots=[1, 2], seeds=2, max_iter=50)
    _check_record(fs, "fewshot")
    assert set(fs["curve"]) == {"1", "2"} and fs["metrics"]["zeroshot_acc1"] is not None
    rb = run_robustness(ctx, SCENES, shifts="grayscale,invert", C=1.0, max_iter=50)
    _check_record(rb, "robustness")
    assert [r["shift"] for r in rb["shifts"]] == ["clean", "grayscale", "invert"]
    assert rb["shifts"][0]["zeroshot_drop"] == 0.0
    rt = run_retrieval(ctx, "builtin:scenes?n=12&size=32", split="test")
    _check_record(rt, "zeroshot_retrieval")
    assert rt["n_images"] == 12 and rt["n_texts"] > 12
    table = records_table([zs, lp, fs, rb, rt])
    for task in ("zeroshot_classification", "linear_probe", "fewshot", "robustness", "zeroshot_retrieval"):
        assert f"== {task} ==" in table


def test_robustness_variants_and_probe_side_by_side(micro_vit, tmp_path):
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path)
    base, variant = _toy(n=30), _toy(n=12)
    rec = run_robustness(ctx, train=base, test=base, shifts="blur", variants={"mine": variant}, C=1.0, max_iter=30)
    rows = {r["shift"]: r for r in rec["shifts"]}
    assert rows["mine"]["kind"] == "variant" and rows["mine"]["n"] == 12
    assert "linear_probe_acc1" in rows["blur"] and "robustness_gap" in rec["metrics"]
    assert rec["metrics"]["mean_zeroshot_drop"] == pytest.approx(
        np.mean([rows["clean"]["zeroshot_acc1"] - rows[s]["zeroshot_acc1"] for s in ("blur", "mine")]))


def test_suite_writes_records_report_and_reuses(micro_vit, tmp_path):
    suite = {"defaults": {"batch_size": 8}, "tasks": [
        {"task": "zeroshot", "dataset": SCENES, "compare_prompts": True},
        {"task": "linear_probe", "dataset": SCENES, "max_iter": 30},
        {"task": "fewshot", "dataset": SCENES, "shots": [1, 2], "seeds": 2, "max_iter": 30},
        {"task": "robustness", "dataset": SCENES, "shifts": ["grayscale"], "C": 1.0, "max_iter": 30},
        {"task": "retrieval", "dataset": "builtin:scenes?n=8&size=32", "split": "test", "name": "scenes-ret"},
    ]}
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path / "cache")
    logs = []
    recs = run_suite(suite, tmp_path / "out", ctx=ctx, log=logs.append)
    assert [r["task"] for r in recs] == ["zeroshot_classification", "linear_probe", "fewshot", "robustness",
                                         "zeroshot_retrieval"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(recs))
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "scenes-counting" in html
    again = run_suite(suite, tmp_path / "out", ctx=ctx, log=logs.append)
    assert sum("already done" in m for m in logs) == 5 and again == saved


def test_suite_validation(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        load_suite({"tasks": []})
    with pytest.raises(ValueError, match=r"tasks\[0\]: unknown task 'bogus'"):
        load_suite({"tasks": [{"task": "bogus"}]})
    with pytest.raises(ValueError, match=r"tasks\[0\] \(zeroshot\): unknown option 'shots'"):
        load_suite({"tasks": [{"task": "zeroshot", "dataset": "x", "shots": [1]}]})
    f = tmp_path / "s.yaml"
    f.write_text("tasks: [\n", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_suite(f)


def test_dataset_identity_tells_contents_apart():
    from clipforge.eval.datasets import Subset, dataset_identity

    a, b = _toy(), _toy()
    b.images = list(b.images)
    b.images[5] = Image.new("RGB", (36, 36))
    assert dataset_identity(a) == dataset_identity(_toy())
    assert dataset_identity(a) != dataset_identity(b)
    assert dataset_identity(Subset(a, np.array([1, 2]))) != dataset_identity(Subset(a, np.array([1, 3])))

    class Opaque:
        labels = np.zeros(2)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Image.new("RGB", (8, 8))

    assert dataset_identity(Opaque()) is None  # unknown content: features are not cached
