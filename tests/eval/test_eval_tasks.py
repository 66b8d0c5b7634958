"""Feature caching, bad input handling, every task's record (JSON schema), suite + HTML report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.eval import EvalContext, InMemoryLabelled, extract_features, run_suite
from clipforge.eval.records import CLIP_BENCHMARK_KEYS, TASKS, records_table
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
    assert set(CLIP_BENCHMARK_KEYS) <= set(rec)  # every key clip_benchmark eval writes
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
    assert rec["templates_set"] == "imagenet" and rec["templates_source"] == "given" and len(rec["templates"]) == 80
    assert rec["templates"][0] == "a bad photo of a {c}."  # CLIP_benchmark's spelling


def test_all_tasks_on_builtin_scenes(micro_vit, tmp_path):
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path, batch_size=16)
    zs = run_zeroshot(ctx, SCENES)
    _check_record(zs, "zeroshot_classification")
    assert zs["templates_set"] == "dataset"              # the scenes task defines its own templates
    assert zs["dataset"] == "scenes-counting" and zs["n_samples"] == 18
    lp = run_linear_probe(ctx, SCENES, test_fraction=0.5, max_iter=50)
    _check_record(lp, "linear_probe")
    assert lp["n_train"] + lp["n_test"] == 18 and lp["C"] > 0 and lp["C_search"]
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} <= set(lp["metrics"]) and "acc1" not in lp["metrics"]
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
    saved = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert saved == json.loads(json.dumps(recs))
    assert len(list((tmp_path / "out").glob("*.json"))) == 5  # one record file per task
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


# --- CLIP_benchmark compatibility: templates said and recorded, class order, its folder layouts ------

def _named(name, n=12, k=3):
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return InMemoryLabelled(imgs, np.arange(n) % k, ["zebra", "violin", "pizza"][:k] if k <= 3 else [], name=name)


def test_template_choice_is_printed_and_recorded(micro_vit, tmp_path):
    said = []
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path, log=said.append)
    guessed = run_zeroshot(ctx, _named("cifar10_zs500"))
    assert guessed["templates_set"] == "cifar10" and len(guessed["templates"]) == 18
    assert "guessed from the dataset name 'cifar10_zs500'" in guessed["templates_source"]
    assert said[-1].startswith("zero-shot templates: cifar10 (18)") and "guessed" in said[-1]
    # a dataset nothing is known about gets the generic single template, never ImageNet's 80
    unknown = run_zeroshot(ctx, _named("cifar500"))
    assert unknown["templates_set"] == "generic" and unknown["templates"] == ["a photo of a {c}."]
    assert "no template set known for dataset 'cifar500'" in said[-1]
    # a built-in class-name set brings its own templates; explicit templates are "given"
    assert run_zeroshot(ctx, _named("x", n=20, k=10), classnames="cifar10")["templates_set"] == "cifar10"
    given = run_zeroshot(ctx, _named("cifar500"), templates="imagenet_top7")
    assert given["templates_source"] == "given" and len(given["templates"]) == 7


def test_suite_records_never_overwrite_each_other(micro_vit, tmp_path):
    suite = {"tasks": [{"task": "zeroshot", "dataset": SCENES},
                       {"task": "zeroshot", "dataset": SCENES, "templates": "simple"},
                       {"task": "zeroshot", "dataset": SCENES, "templates": "none", "name": "bare"}]}
    ctx = EvalContext(micro_vit, model_name="micro", cache_dir=tmp_path / "cache", log=None)
    run_suite(suite, tmp_path / "out", ctx=ctx, log=lambda m: None, report=False)
    files = sorted((tmp_path / "out").glob("*.json"))
    assert len(files) == 3 and files[-1].name.endswith("__002-bare.json")
    assert [json.loads(f.read_text())["templates_set"] for f in files] == ["dataset", "simple", "none"]


def _oracle_folder(root, folder_names, oracle_classes, kit, per_class=4):
    """One folder per class; folder ``f`` holds images of oracle class ``oracle_classes[f]``."""
    for f, c in zip(folder_names, oracle_classes):
        (root / f).mkdir(parents=True)
        for i in range(per_class):
            kit.class_image(c, seed=i).save(root / f / f"{i}.png")
    return root


def test_class_names_are_mapped_to_named_labels_by_name(oracle_kit, tmp_path):
    # Folders sort as pizza, violin, zebra (labels 0, 1, 2); the class-name file lists them in
    # another order. Applied by position, every image would be mislabelled.
    names = tmp_path / "names.txt"
    names.write_text("zebra\nviolin\npizza\n", encoding="utf-8")
    folder = _oracle_folder(tmp_path / "animals", ["pizza", "violin", "zebra"], [2, 1, 0], oracle_kit)
    said = []
    ctx = EvalContext(oracle_kit.OracleCLIP(), model_name="oracle", cache_dir=tmp_path / "c", log=said.append)
    rec = run_zeroshot(ctx, str(folder), classnames=str(names), templates="simple")
    assert rec["metrics"]["acc1"] == 1.0 and rec["classnames"] == ["pizza", "violin", "zebra"]
    assert any("matched to dataset 'animals'" in s and "by name" in s for s in said)
    # Unnamed-looking folders cannot be matched: the names apply by position (here: the right order).
    plain = _oracle_folder(tmp_path / "plain", ["c0", "c1", "c2"], [0, 1, 2], oracle_kit)
    assert run_zeroshot(ctx, str(plain), classnames=str(names), templates="simple")["metrics"]["acc1"] == 1.0


def _tar_add(tf, name, data):
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _webp(img):
    import io

    buf = io.BytesIO()
    img.save(buf, format="webp", lossless=True)
    return buf.getvalue()


def test_clip_benchmark_webdataset_classification_layout(oracle_kit, tmp_path):
    """<root>/test/0.tar (s0000000.webp + .cls) + nshards.txt, classnames.txt and
    zeroshot_classification_templates.txt ({c}) in <root>, as clip_benchmark_export_wds writes."""
    import tarfile

    root = tmp_path / "wds_animals"
    (root / "test").mkdir(parents=True)
    labels = [i % 3 for i in range(9)]
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for i, c in enumerate(labels):
            _tar_add(tf, f"s{i:07d}.webp", _webp(oracle_kit.class_image(c, seed=i)))
            _tar_add(tf, f"s{i:07d}.cls", str(c).encode())
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("zebra\nviolin\npizza\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nitap of a {c}.\n")
    said = []
    ctx = EvalContext(oracle_kit.OracleCLIP(), model_name="oracle", cache_dir=tmp_path / "c", log=said.append)
    rec = run_zeroshot(ctx, str(root))
    assert rec["dataset"] == "wds_animals" and rec["n_samples"] == 9 and rec["metrics"]["acc1"] == 1.0
    assert rec["classnames"] == ["zebra", "violin", "pizza"]
    assert rec["templates_set"] == "dataset" and rec["templates"] == ["a photo of a {c}.", "itap of a {c}."]
    assert "zero-shot templates: dataset (2)" in said[0]


def test_clip_benchmark_webdataset_retrieval_layout(micro_vit, tmp_path):
    """Retrieval sets keep all captions of an image in one ``txt`` member, one per line."""
    import tarfile

    root = tmp_path / "wds_pairs"
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for i in range(5):
            img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            _tar_add(tf, f"s{i:07d}.webp", _webp(img))
            _tar_add(tf, f"s{i:07d}.txt", f"picture {i}\nanother caption of {i}\nthird {i}".encode())
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    rec = run_retrieval(EvalContext(micro_vit, model_name="micro", log=None), str(root))
    assert rec["dataset"] == "wds_pairs" and rec["n_images"] == 5 and rec["n_texts"] == 15
    assert rec["tie_rule"] == "clip_benchmark"


def test_oracle_model_scores_high_on_every_task(oracle_kit, tmp_path):
    """A stand-in whose features encode the class: each task must find (near) perfect accuracy,
    far above chance (1/5), so a wiring error cannot hide behind a value in [0, 1]."""
    labels = np.arange(60) % 5
    ds = InMemoryLabelled([oracle_kit.class_image(int(c), noise=1, seed=i) for i, c in enumerate(labels)], labels,
                          oracle_kit.CLASSES[:5], name="oracle")
    ctx = EvalContext(oracle_kit.OracleCLIP(), model_name="oracle", cache_dir=tmp_path, log=None)
    lp = run_linear_probe(ctx, ds, max_iter=100)
    assert lp["metrics"]["lp_acc1"] == 1.0 and lp["metrics"]["lp_mean_per_class_recall"] == 1.0
    fs = run_fewshot(ctx, ds, shots=[1, 4], seeds=2, C=10.0, templates="simple", max_iter=100)
    assert fs["metrics"]["zeroshot_acc1"] == 1.0 and fs["metrics"]["acc1_4shot"] >= 0.95
    rb = run_robustness(ctx, ds, shifts="blur", C=10.0, templates="simple", max_iter=100)
    assert rb["metrics"]["clean_zeroshot_acc1"] == 1.0 and rb["metrics"]["clean_linear_probe_acc1"] == 1.0


def test_robustness_variant_with_its_own_class_order(oracle_kit, tmp_path):
    """A variant whose labels number the classes differently (named) is scored in the test set's
    label space by name: the oracle stays perfect instead of scoring 0 on permuted labels."""
    classes = oracle_kit.CLASSES[:3]
    labels = np.arange(12) % 3
    base = InMemoryLabelled([oracle_kit.class_image(int(c), seed=i) for i, c in enumerate(labels)], labels,
                            classes, name="base")
    order = [2, 0, 1]                                  # variant label k is oracle class order[k]
    vlabels = np.arange(9) % 3
    variant = InMemoryLabelled([oracle_kit.class_image(order[int(k)], seed=i) for i, k in enumerate(vlabels)],
                               vlabels, [classes[c] for c in order], name="variant")
    ctx = EvalContext(oracle_kit.OracleCLIP(), model_name="oracle", cache_dir=tmp_path, log=None)
    rec = run_robustness(ctx, train=base, test=base, shifts=[], variants={"mine": variant}, templates="simple",
                         linear_probe_on=False)
    rows = {r["shift"]: r for r in rec["shifts"]}
    assert rows["clean"]["zeroshot_acc1"] == 1.0 and rows["mine"]["zeroshot_acc1"] == 1.0
