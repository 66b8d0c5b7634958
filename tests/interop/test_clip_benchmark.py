"""clipforge's evaluation against CLIP_benchmark 1.6.2 itself (issue 11, item 2).

- ``clip_benchmark build`` (its own CLI code) aggregates the records ``clipforge eval suite``
  writes into its CSV, unchanged;
- retrieval Recall@K equals ``clip_benchmark.metrics.zeroshot_retrieval.evaluate`` on identical
  features, with duplicate captions (ties), and the tie rule matters there;
- zero-shot class weights equal its ``zero_shot_classifier`` and acc1/acc5/mean_per_class_recall its
  ``accuracy`` + ``balanced_accuracy_score`` on identical logits; the linear probe's lp_* metrics
  likewise on the probe's logits;
- the packaged class lists: equal to its lists where we say so, mapped by name where the order differs.

Run with ``/opt/refenv/bin/python -m pytest tests/interop/test_clip_benchmark.py -p no:cacheprovider``
(skips where clip_benchmark is absent; it is installed with ``--no-deps``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("clip_benchmark")
zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")  # needs scikit-learn
from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from clipforge.cli.main import main as cli_main  # noqa: E402
from clipforge.eval import linear_probe, retrieval_metrics  # noqa: E402
from clipforge.eval.datasets import open_pairs  # noqa: E402
from clipforge.eval.metrics import chunked_topk, metrics_from_topk  # noqa: E402
from clipforge.eval.prompts import builtin_set_info, load_classnames, load_templates, match_by_name  # noqa: E402
from clipforge.eval.retrieval import embed_pairs  # noqa: E402
from clipforge.eval.zeroshot import build_zeroshot_weights  # noqa: E402
from clipforge.tokenizer import get_tokenizer  # noqa: E402

# clip_benchmark.cli imports every dataset/captioning module; `requests` and `pycocoevalcap` are
# not installed with --no-deps and are used only by downloads and captioning, never by `build`.
# Missing ones are replaced by empty modules in the subprocess that runs its CLI.
RUN_CB_CLI = r"""
import importlib.util, sys, types
class _Absent(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})
absent = {top for top in ("requests", "pycocoevalcap") if importlib.util.find_spec(top) is None}
for name in ("requests", "pycocoevalcap", "pycocoevalcap.tokenizer", "pycocoevalcap.tokenizer.ptbtokenizer",
             "pycocoevalcap.bleu", "pycocoevalcap.bleu.bleu", "pycocoevalcap.meteor", "pycocoevalcap.meteor.meteor",
             "pycocoevalcap.rouge", "pycocoevalcap.rouge.rouge", "pycocoevalcap.cider", "pycocoevalcap.cider.cider",
             "pycocoevalcap.spice", "pycocoevalcap.spice.spice"):
    if name.split(".")[0] in absent:
        mod = _Absent(name)
        mod.__path__ = []
        sys.modules[name] = mod
from clip_benchmark.cli import main
sys.argv = ["clip_benchmark"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def tiny():
    import clipforge

    return clipforge.create_model("tiny-vit", seed=0).eval()


def test_clip_benchmark_build_aggregates_suite_records(tmp_path, capsys):
    scenes = "builtin:scenes-counting?n_per_class=5&size=32"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
tasks:
  - {{task: zeroshot, dataset: "{scenes}"}}
  - {{task: zeroshot, dataset: "{scenes}", templates: simple}}
  - {{task: linear_probe, dataset: "{scenes}", max_iter: 30}}
  - {{task: retrieval, dataset: "builtin:scenes?n=12&size=32"}}
""", encoding="utf-8")
    out = tmp_path / "out"
    code = cli_main(["eval", "suite", "--model", "tiny-vit", "--random-init", "--suite", str(suite), "--out", str(out),
                     "--no-cache", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    records = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert len(records) == 4  # two zero-shot tasks on one dataset and model: two files
    csv_path = tmp_path / "benchmark.csv"
    run = subprocess.run([sys.executable, "-c", RUN_CB_CLI, "build", str(out), "--output", str(csv_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(csv_path.open(newline="")))
    assert len(rows) == 4
    for key in ("dataset", "model", "pretrained", "task", "language", "model_fullname", "acc1", "acc5",
                "mean_per_class_recall", "lp_acc1", "lp_acc5", "lp_mean_per_class_recall",
                "image_retrieval_recall@5", "text_retrieval_recall@5"):
        assert key in rows[0], key
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
        assert r["model_fullname"] == "tiny-vit random-init-seed0" and r["language"] == "en"
    assert len(by_task["zeroshot_classification"]) == 2 and len(by_task["linear_probe"]) == 1
    for rec in records.values():
        row = next(r for r in by_task[rec["task"]] if r["templates_set" if "templates_set" in rec else "task"]
                   == str(rec.get("templates_set", rec["task"])))
        for k, v in rec["metrics"].items():
            if isinstance(v, float):
                assert float(row[k]) == v, (rec["task"], k)
            elif v is None:
                assert row[k] == "", (rec["task"], k)  # NaN is stored as null (strict JSON)
    # the linear probe's accuracy sits in its own lp_ column, never in zero-shot's acc1
    assert by_task["linear_probe"][0]["acc1"] == "" and by_task["linear_probe"][0]["lp_acc1"] != ""


class _FeatureModel:
    """CLIP_benchmark's model interface over fixed features: ``encode_image(indices)``,
    ``encode_text(text ids)``; the tokenizer turns caption ``"t<j>"`` into ``j``."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        self.img, self.txt = img, txt

    def encode_image(self, idx: torch.Tensor) -> torch.Tensor:
        return self.img[idx]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.txt[ids]


def _cb_retrieval(img, txt, owner, ks, batch_size=64):
    """clip_benchmark.metrics.zeroshot_retrieval.evaluate on these features."""
    caps: list[list[str]] = [[] for _ in range(img.shape[0])]
    for j, i in enumerate(owner):
        caps[int(i)].append(f"t{j}")
    order = [j for i in range(img.shape[0]) for j in range(len(owner)) if owner[j] == i]
    assert order == list(range(len(owner))), "captions must be grouped by image, in order"
    batches = [(torch.arange(s, min(s + batch_size, img.shape[0])), caps[s:s + batch_size])
               for s in range(0, img.shape[0], batch_size)]
    tok = lambda texts: torch.tensor([int(t[1:]) for t in texts])  # noqa: E731
    return zr.evaluate(_FeatureModel(img, txt), batches, tok, device="cpu", amp=False, recall_k_list=list(ks))


@pytest.fixture(scope="module")
def scene_pairs(tiny):
    """The built-in scenes test split (many duplicate captions) embedded by a tiny model."""
    samples = open_pairs("builtin:scenes?n=200&size=32", split="test").iter_samples()
    pf = embed_pairs(tiny, samples, batch_size=64)
    # CLIP_benchmark normalises what encode_* return; give both sides the same normalised arrays
    return F.normalize(pf.image_features, dim=-1), F.normalize(pf.text_features, dim=-1), pf.text_to_image


@pytest.mark.parametrize("block_elems", [1 << 24, 4096])
def test_retrieval_recall_equals_clip_benchmark_with_duplicate_captions(scene_pairs, block_elems):
    img, txt, owner = scene_pairs
    ks = (1, 5, 10)
    ref = _cb_retrieval(img, txt, owner, ks)
    ours = retrieval_metrics(img, txt, owner, ks=ks, block_elems=block_elems)
    for k in ks:  # it averages in float32: equal up to that rounding, i.e. the same number of hits
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], rel=1e-6), k
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], rel=1e-6), k
    # the case is one where the rule matters: captions tie with other images' identical captions
    assert ours["text_retrieval_tied_queries"] > 0
    optimistic = retrieval_metrics(img, txt, owner, ks=ks, ties="query", block_elems=block_elems)
    assert optimistic["text_retrieval_recall@1"] > ours["text_retrieval_recall@1"]


def test_retrieval_recall_equals_clip_benchmark_without_ties():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(50), rng.integers(1, 6, 50))
    img = F.normalize(torch.tensor(rng.normal(size=(50, 64)), dtype=torch.float32), dim=-1)
    txt = F.normalize(img[owner] + 0.8 * torch.tensor(rng.normal(size=(len(owner), 64)), dtype=torch.float32), dim=-1)
    ref = _cb_retrieval(img, txt, owner, (1, 5, 10), batch_size=16)
    for ties in ("clip_benchmark", "query"):  # without ties both rules are the same number
        ours = retrieval_metrics(img, txt, owner, ks=(1, 5, 10), ties=ties)
        for k in (1, 5, 10):
            assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], rel=1e-6)
            assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], rel=1e-6)


@pytest.fixture(scope="module")
def cifar(shared_data_module, tiny):
    from clipforge.preprocess import image_transform
    from PIL import Image

    z = np.load(shared_data_module / "cifar10_test" / "cifar10_test.npz")
    pick = np.concatenate([np.flatnonzero(z["labels"] == c)[:50] for c in range(10)])  # the file is sorted by class
    images, labels = z["images"][pick], z["labels"][pick].astype(np.int64)
    pre = image_transform(tiny.config.preprocess)
    with torch.no_grad():
        x = torch.stack([pre(Image.fromarray(a)) for a in images])
        feats = F.normalize(tiny.encode_image(x), dim=-1)
    return feats, torch.as_tensor(labels)


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def _cb_accuracy():
    """clip_benchmark's ``accuracy``, run as is except for one shim: it calls ``float()`` on a
    1-element array, which NumPy >= 2.4 refuses (an upstream bug that breaks its zero-shot and
    linear-probe evaluation there); ``float`` accepts such arrays again, nothing else changes."""
    import builtins
    import types

    def _float(x):
        return builtins.float(np.asarray(x).reshape(())) if isinstance(x, np.ndarray) else builtins.float(x)

    return types.FunctionType(zc.accuracy.__code__, {**zc.accuracy.__globals__, "float": _float})


def test_zeroshot_weights_and_metrics_equal_clip_benchmark(tiny, cifar):
    names, templates = load_classnames("cifar10"), load_templates("cifar10")
    tok = get_tokenizer()
    ref_w = zc.zero_shot_classifier(tiny, tok, names, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False)
    ours_w = build_zeroshot_weights(tiny, names, templates)            # [C, D]
    assert (ours_w - ref_w.t()).abs().max() < 1e-5
    feats, labels = cifar
    logits = 100.0 * feats @ ref_w                                     # identical features and weights
    acc1, acc5 = _cb_accuracy()(logits, labels, topk=(1, 5))
    mpcr = balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    top, _ = chunked_topk(feats, ref_w.t(), k=5, scale=100.0)
    ours = metrics_from_topk(top, labels.numpy(), len(names))
    assert ours["acc1"] == pytest.approx(acc1, abs=1e-12) and ours["acc5"] == pytest.approx(acc5, abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(mpcr, abs=1e-12)


def test_linear_probe_metrics_equal_clip_benchmark(cifar):
    feats, labels = cifar
    X, y = feats.numpy(), labels.numpy()
    res = linear_probe(X[0::2], y[0::2], X[1::2], y[1::2], C=1.0, num_classes=10)
    logits = res.model.decision_function(X[1::2]).float()
    target = torch.as_tensor(y[1::2])
    acc1, acc5 = _cb_accuracy()(logits, target.float(), topk=(1, 5))  # as its linear_probe.evaluate calls it
    mpcr = balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy())
    assert res.metrics["acc1"] == pytest.approx(acc1, abs=1e-12)
    assert res.metrics["acc5"] == pytest.approx(acc5, abs=1e-12)
    assert res.metrics["mean_per_class_recall"] == pytest.approx(mpcr, abs=1e-12)


def _cb_classnames():
    import clip_benchmark

    path = resources.files(clip_benchmark) / "datasets" / "en_classnames.json"
    return json.loads(path.read_text(encoding="utf-8"))


CB_NAMES = {"pets": "pets", "eurosat": "eurosat", "fer2013": "fer2013", "clevr_counts": "clevr_count_all",
            "caltech101": "caltech101", "flowers102": "flowers", "gtsrb": "gtsrb", "mnist": "mnist", "pcam": "pcam",
            "kitti": "kitti_closest_vehicle_distance", "imagenet": "imagenet1k"}


@pytest.mark.parametrize("ours", sorted(CB_NAMES))
def test_shipped_class_order_against_clip_benchmark(ours):
    theirs = _cb_classnames()[CB_NAMES[ours]]
    info = builtin_set_info(ours)
    names = load_classnames(ours)
    perm = match_by_name(theirs, names, info.get("label_names"))
    if info.get("order_differs_from_clip_benchmark"):
        # its labels (torchvision order) map onto ours by name, every name once: a different
        # order, and no mislabelling when a dataset names its labels this way
        assert perm is not None and sorted(perm) == list(range(len(names)))
        assert perm != list(range(len(names)))
    else:  # "identical, position by position" (digits and duplicate names cannot be matched by name)
        key = lambda n: "".join(ch for ch in (n if isinstance(n, str) else n[0]).lower() if ch.isalnum())  # noqa: E731
        assert [key(n) for n in names] == [key(t) for t in theirs]
        assert perm in (None, list(range(len(names))))
