"""Evaluation tasks end to end: dataset spec in, CLIP_benchmark-style record out.

The CLI commands and the YAML suite both call these functions, so a task computes the same
thing whichever way it is launched. An :class:`EvalContext` carries the model and the shared
caches: image features are extracted once per model x dataset x shift and zero-shot heads are
built once per model x class names x templates, then reused by every later task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from ..models.heads import objective_of
from ..preprocess import image_transform
from ..tokenizer import DEFAULT_OVERLAP
from .cache import default_cache_dir, image_tower_fingerprint, json_hash
from .datasets import Subset, dataset_identity, dataset_name, open_labelled, open_pairs, resolve_classnames, short_names
from .features import FeatureSet, extract_features
from .fewshot import DEFAULT_SHOTS, fewshot_curve
from .linear_probe import linear_probe, stratified_split
from .metrics import confusion_matrix, metrics_from_topk, per_class_recall
from .prompts import GENERIC_TEMPLATE, builtin_set_info, load_templates, match_by_name, match_prompt_set
from .records import make_record, slug
from .retrieval import DEFAULT_KS, embed_pairs, retrieval_metrics
from .shifts import Shift, parse_shifts
from .zeroshot import ZeroShotClassifier

CONFUSION_MAX_CLASSES = 100  # records carry the full confusion matrix up to this many classes


@dataclass
class EvalContext:
    """A model under evaluation plus run-wide settings and caches."""

    model: nn.Module
    preprocess: Callable | None = None
    model_name: str = "model"               # display name / checkpoint path (the loader's third value)
    batch_size: int = 64
    text_batch_size: int = 256
    cache_dir: str | Path | None = None     # root of the caches; None -> default_cache_dir()
    use_cache: bool = True
    progress: bool = False
    arch: str | None = None                 # records' "model" (CLIP_benchmark: the architecture)
    pretrained: str | None = None           # records' "pretrained" (checkpoint path or tag)
    log: Callable[[str], None] | None = print  # notes the user must see (template choice, class order)
    long_text: str | None = None            # prompts/captions past the context: error|truncate|chunks (None: cut silently)
    long_text_overlap: int = DEFAULT_OVERLAP
    _image_fp: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.preprocess is None:
            self.preprocess = image_transform(self.model.config.preprocess)
        self.model.eval()
        if self.arch is None:
            self.arch = str(getattr(getattr(self.model, "config", None), "name", None) or self.model_name)
        if self.pretrained is None:
            self.pretrained = "" if self.model_name == self.arch else self.model_name

    def note(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def record(self, dataset: str, task: str, metrics: dict[str, Any], **extras: Any) -> dict[str, Any]:
        """A result record for this model (CLIP_benchmark's keys + ``extras``)."""
        if self.long_text == "chunks":  # the one mode that changes text embeddings: keep results reproducible
            extras.setdefault("long_text", {"mode": "chunks", "overlap": self.long_text_overlap})
        return make_record(dataset, str(self.arch), task, metrics, pretrained=str(self.pretrained or ""), **extras)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def image_fingerprint(self) -> str:
        if self._image_fp is None:
            self._image_fp = image_tower_fingerprint(self.model, self.preprocess)
        return self._image_fp

    def features(self, ds: Any, ident: dict[str, Any] | None, shift: Shift | None = None,
                 desc: str = "features") -> FeatureSet:
        """Features of every item of ``ds`` (optionally shifted), cached on disk by content hash
        (not cached when ``ident`` is None: the dataset's content cannot be identified)."""
        path = None
        if self.use_cache and ident is not None:
            key = json_hash({"v": 1, "image": self.image_fingerprint(), "data": ident,
                             "shift": None if shift is None else [shift.name, shift.param, shift.seed]})
            path = self.cache_root / "features" / f"{slug(ident.get('name', 'data'), 40)}-{key}"
        return extract_features(self.model, ds, getattr(ds, "labels", None), preprocess=self.preprocess,
                                transform=shift, batch_size=self.batch_size, cache_path=path,
                                progress=self.progress, desc=desc)

    def zeroshot(self, classnames: Any, templates: Any) -> ZeroShotClassifier:
        return ZeroShotClassifier(self.model, classnames, templates, preprocess=self.preprocess,
                                  cache_dir=self.cache_root / "zeroshot", use_cache=self.use_cache,
                                  batch_size=self.text_batch_size, progress=self.progress,
                                  long_text=self.long_text, long_text_overlap=self.long_text_overlap)


# --- shared helpers --------------------------------------------------------------------------------

@dataclass
class _Split:
    """Train/test feature sets for probes, plus what is needed to re-extract shifted test images."""

    train: FeatureSet
    test: FeatureSet
    test_ds: Any
    test_ident: dict[str, Any] | None
    name: str
    classnames: list[Any]
    protocol: str
    skipped: int
    source: Any = None  # the dataset the class names came from (for dataset-defined templates)


def _labelled(spec: Any, split: str | None) -> tuple[Any, dict[str, Any] | None]:
    ds = open_labelled(spec, split)
    return ds, dataset_identity(ds, spec, split)


@dataclass
class TemplateChoice:
    """Which templates a zero-shot head uses and why (recorded, and printed by the tasks)."""

    set: str
    templates: list[str]
    source: str

    def record_extras(self) -> dict[str, Any]:
        """``templates`` in CLIP_benchmark's ``{c}`` spelling (its ``--dump_templates`` key)."""
        return {"templates": [t.replace("{}", "{c}") for t in self.templates], "templates_set": self.set,
                "templates_source": self.source}

    def message(self) -> str:
        return f"zero-shot templates: {self.set} ({len(self.templates)}) - {self.source}"


def resolve_templates(templates: Any, ds_name: str | None, ds: Any = None, classnames: Any = None) -> TemplateChoice:
    """The templates for a zero-shot head. ``"auto"`` takes, in order: the templates the dataset
    defines itself (``ds.templates``: the built-in scenes, CLIP_benchmark WebDataset folders);
    those of a built-in class-name set named by ``classnames``; the built-in set whose name the
    dataset's name starts with (a guess, said so in ``source``); else the single generic template
    ``"a photo of a {}."`` - never ImageNet's 80 for a dataset nothing is known about."""
    if templates not in (None, "auto"):
        label = templates if isinstance(templates, str) else f"custom ({len(templates)})"
        return TemplateChoice(str(label), load_templates(templates), "given")
    own = getattr(ds, "templates", None)
    if own:
        return TemplateChoice("dataset", load_templates(list(own)), f"the templates dataset {ds_name!r} defines")
    if isinstance(classnames, str) and not Path(classnames).is_file():
        info = builtin_set_info(classnames)
        if info is not None and info.get("templates"):
            return TemplateChoice(info["set"], load_templates(info["set"]),
                                  f"the templates of class-name set {classnames!r}")
    match = match_prompt_set(ds_name)
    if match is not None:
        try:
            return TemplateChoice(match, load_templates(match),
                                  f"guessed from the dataset name {ds_name!r}; pass --templates to choose")
        except ValueError:
            pass
    return TemplateChoice("generic", [GENERIC_TEMPLATE],
                          f"no template set known for dataset {ds_name!r}: the generic single template; "
                          "pass --templates (imagenet, a built-in set, or a file) to choose")


def _templates(ctx: EvalContext, templates: Any, ds_name: str | None, ds: Any = None,
               classnames: Any = None) -> TemplateChoice:
    choice = resolve_templates(templates, ds_name, ds, classnames)
    ctx.note(choice.message())
    return choice


def _num_classes(classnames: Sequence[Any], *label_arrays: np.ndarray) -> int:
    top = max([len(classnames)] + [int(a.max()) + 1 for a in label_arrays if a is not None and len(a)])
    return top


def _train_test(ctx: EvalContext, dataset: Any = None, *, train: Any = None, test: Any = None,
                split: str | None = None, train_split: str | None = None, test_split: str | None = None,
                test_fraction: float = 0.5, seed: int = 0, classnames: Any = None) -> _Split:
    if train is not None or test is not None:
        if train is None or test is None:
            raise ValueError("give both a train and a test dataset (or one dataset to split)")
        tr_ds, tr_id = _labelled(train, train_split)
        te_ds, te_id = _labelled(test, test_split)
        tr = ctx.features(tr_ds, tr_id, desc="features (train)")
        te = ctx.features(te_ds, te_id, desc="features (test)")
        names = _maybe_classnames(te_ds, classnames, ctx.log)
        return _Split(tr, te, te_ds, te_id, dataset_name(te_ds, test), names, "given train/test",
                      tr.skipped + te.skipped, te_ds)
    if dataset is None:
        raise ValueError("no dataset given")
    if train_split or test_split:
        tr_ds, tr_id = _labelled(dataset, train_split or "train")
        te_ds, te_id = _labelled(dataset, test_split or "test")
        tr = ctx.features(tr_ds, tr_id, desc="features (train)")
        te = ctx.features(te_ds, te_id, desc="features (test)")
        names = _maybe_classnames(te_ds, classnames, ctx.log)
        return _Split(tr, te, te_ds, te_id, dataset_name(te_ds, dataset), names,
                      f"splits {train_split or 'train'}/{test_split or 'test'}", tr.skipped + te.skipped, te_ds)
    ds, ident = _labelled(dataset, split)
    fs = ctx.features(ds, ident)
    if fs.labels is None or len(fs) < 2:
        raise ValueError(f"dataset {dataset_name(ds, dataset)!r}: need labelled images to split into train/test")
    tr_pos, te_pos = stratified_split(fs.labels, test_fraction, seed)
    te_idx = fs.indices[te_pos]
    te_ident = None if ident is None else {**ident, "subset": json_hash(te_idx.tolist(), 16)}
    names = _maybe_classnames(ds, classnames, ctx.log)
    return _Split(fs.subset(tr_pos), fs.subset(te_pos), Subset(ds, te_idx), te_ident, dataset_name(ds, dataset),
                  names, f"stratified split, test_fraction={test_fraction}, seed={seed}", fs.skipped, ds)


def _maybe_classnames(ds: Any, override: Any, log: Callable[[str], None] | None = None) -> list[Any]:
    try:
        return resolve_classnames(ds, override, log)
    except ValueError:
        if override is not None:
            raise
        return []


def _zeroshot_scores(ctx: EvalContext, clf: ZeroShotClassifier, fs: FeatureSet) -> tuple[dict[str, float], np.ndarray, float]:
    t0 = time.perf_counter()
    top = clf.topk(fs.features, k=5)
    m = metrics_from_topk(top, fs.labels, clf.num_classes)
    return m, top[:, 0], time.perf_counter() - t0


def _class_extras(pred: np.ndarray, labels: np.ndarray, classnames: Sequence[Any], k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"classnames": short_names(classnames) if classnames else [str(i) for i in range(k)],
                           "per_class_recall": per_class_recall(pred, labels, k)}
    if k <= CONFUSION_MAX_CLASSES:
        out["confusion_matrix"] = confusion_matrix(pred, labels, k)
    return out


# --- tasks -------------------------------------------------------------------------------------------

def run_zeroshot(ctx: EvalContext, dataset: Any, *, split: str | None = None, classnames: Any = None,
                 templates: Any = "auto", compare_prompts: bool = False,
                 save_classifier: str | Path | None = None) -> dict[str, Any]:
    """Zero-shot classification: top-1/top-5/mean per-class recall (+ prompt comparison);
    ``save_classifier`` also writes the built head (:meth:`ZeroShotClassifier.save`)."""
    t0 = time.perf_counter()
    ds, ident = _labelled(dataset, split)
    name = dataset_name(ds, dataset)
    names = resolve_classnames(ds, classnames, ctx.log)
    choice = _templates(ctx, templates, name, ds, classnames)
    tmpl = choice.templates
    t1 = time.perf_counter()
    clf = ctx.zeroshot(names, tmpl)
    if save_classifier:
        clf.save(save_classifier)
    t2 = time.perf_counter()
    fs = ctx.features(ds, ident)
    t3 = time.perf_counter()
    metrics, pred, t_score = _zeroshot_scores(ctx, clf, fs)
    if clf.scorer.token_prior:  # bow: also without the token prior, which can make one class win everywhere
        clf.bow_prior = "scored"
        calibrated = _zeroshot_scores(ctx, clf, fs)[0]
        clf.bow_prior = "none"
        metrics["acc1_token_prior_removed"] = calibrated["acc1"]
        metrics["mean_per_class_recall_token_prior_removed"] = calibrated["mean_per_class_recall"]
    extras: dict[str, Any] = {
        "split": split, "n_samples": len(fs), "skipped": fs.skipped, "skipped_examples": fs.skipped_messages[:5],
        "num_classes": clf.num_classes, **choice.record_extras(),
        "timings": {"load": t1 - t0, "classifier_build": t2 - t1, "classifier_cache_hit": clf.cache_hit,
                    "features": t3 - t2, "features_cached": fs.cached, "scoring": t_score},
    }
    if compare_prompts:
        comp: dict[str, Any] = {}
        for label, spec in (("classname_only", "none"), ("single_template", "simple"), ("ensemble", tmpl)):
            c = clf if label == "ensemble" else ctx.zeroshot(names, spec)
            m, _, _ = _zeroshot_scores(ctx, c, fs)
            comp[label] = {"templates": len(c.templates), **m}
        extras["prompt_comparison"] = comp
        metrics["acc1_classname_only"] = comp["classname_only"]["acc1"]
        metrics["acc1_single_template"] = comp["single_template"]["acc1"]
        metrics["ensemble_gain_over_classname"] = comp["ensemble"]["acc1"] - comp["classname_only"]["acc1"]
        metrics["ensemble_gain_over_single_template"] = comp["ensemble"]["acc1"] - comp["single_template"]["acc1"]
    extras.update(_class_extras(pred, fs.labels, names, clf.num_classes))
    extras["timings"]["total"] = time.perf_counter() - t0
    return ctx.record(name, "zeroshot_classification", metrics, **extras)


def run_retrieval(ctx: EvalContext, dataset: Any, *, split: str | None = None, ks: Sequence[int] = DEFAULT_KS,
                  ties: str = "clip_benchmark", block_elems: int = 1 << 24) -> dict[str, Any]:
    """Image<->text Recall@K (any-of-its-captions for image queries); ``ties``: the tie rule
    (:mod:`clipforge.eval.retrieval`), recorded as ``tie_rule``."""
    objective = objective_of(ctx.model)
    if objective != "contrastive":  # its text tower was never trained to match images
        raise ValueError(f"retrieval compares image and text embeddings; a model trained with objective "
                         f"{objective!r} has no aligned text embedding (use zero-shot classification)")
    t0 = time.perf_counter()
    samples = open_pairs(dataset, split)
    stats = getattr(samples, "stats", None)
    before = getattr(stats, "total", 0) if stats is not None else 0
    if hasattr(samples, "iter_samples"):  # a clipforge.data PairSource: bad samples are skipped and counted there
        total = getattr(samples, "num_samples", None)
        stream: Any = samples.iter_samples()
    else:
        total = len(samples) if hasattr(samples, "__len__") else None
        stream = samples
    pf = embed_pairs(ctx.model, stream, preprocess=ctx.preprocess, batch_size=ctx.batch_size,
                     text_batch_size=ctx.text_batch_size, progress=ctx.progress, total=total,
                     long_text=ctx.long_text, long_text_overlap=ctx.long_text_overlap)
    if stats is not None:
        pf.skipped += int(getattr(stats, "total", 0)) - int(before)
    t1 = time.perf_counter()
    metrics = retrieval_metrics(pf.image_features, pf.text_features, pf.text_to_image, ks=ks, ties=ties,
                                block_elems=block_elems, progress=ctx.progress)
    name = getattr(samples, "name", None) or dataset_name(samples, dataset)
    return ctx.record(str(name), "zeroshot_retrieval", metrics, split=split, tie_rule=ties,
                       n_images=len(pf.keys), n_texts=len(pf.text_to_image), skipped=pf.skipped,
                       skipped_examples=pf.skipped_keys[:5],
                       timings={**pf.seconds, "ranking": time.perf_counter() - t1, "total": time.perf_counter() - t0})


def run_linear_probe(ctx: EvalContext, dataset: Any = None, *, train: Any = None, test: Any = None,
                     split: str | None = None, train_split: str | None = None, test_split: str | None = None,
                     test_fraction: float = 0.5, seed: int = 0, C: float | None = None, val_fraction: float = 0.2,
                     max_iter: int = 1000, classnames: Any = None) -> dict[str, Any]:
    """Logistic regression on frozen features; C chosen on a validation split unless given."""
    t0 = time.perf_counter()
    sp = _train_test(ctx, dataset, train=train, test=test, split=split, train_split=train_split,
                     test_split=test_split, test_fraction=test_fraction, seed=seed, classnames=classnames)
    t1 = time.perf_counter()
    k = _num_classes(sp.classnames, sp.train.labels, sp.test.labels)
    res = linear_probe(sp.train.features, sp.train.labels, sp.test.features, sp.test.labels, num_classes=k,
                       C=C, val_fraction=val_fraction, seed=seed, max_iter=max_iter, progress=ctx.progress)
    # CLIP_benchmark's names (lp_ prefix) and its protocol keys: all training data (fewshot_k=-1),
    # unit-norm features; C (inverse L2 strength, L-BFGS) replaces its AdamW weight_decay/epochs.
    metrics: dict[str, Any] = {f"lp_{k}": v for k, v in res.metrics.items()}
    metrics.update({"fewshot_k": -1, "seed": seed, "normalized": True})
    extras = {"protocol": sp.protocol, "n_train": len(sp.train), "n_test": len(sp.test), "skipped": sp.skipped,
              "num_classes": k, "C": res.C, "C_search": res.search,
              "timings": {"features": t1 - t0, **res.seconds, "total": time.perf_counter() - t0}}
    extras.update(_class_extras(res.predictions, sp.test.labels, sp.classnames, k))
    return ctx.record(sp.name, "linear_probe", metrics, **extras)


def run_fewshot(ctx: EvalContext, dataset: Any = None, *, train: Any = None, test: Any = None,
                split: str | None = None, train_split: str | None = None, test_split: str | None = None,
                test_fraction: float = 0.5, seed: int = 0, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 3,
                C: float | str = "auto", classnames: Any = None, templates: Any = "auto",
                max_iter: int = 1000) -> dict[str, Any]:
    """k-shot linear probes (mean/std over seeds) against zero-shot on the same test set."""
    t0 = time.perf_counter()
    sp = _train_test(ctx, dataset, train=train, test=test, split=split, train_split=train_split,
                     test_split=test_split, test_fraction=test_fraction, seed=seed, classnames=classnames)
    k = _num_classes(sp.classnames, sp.train.labels, sp.test.labels)
    zs_acc, choice = None, None
    if sp.classnames:
        choice = _templates(ctx, templates, sp.name, sp.source if classnames is None else None, classnames)
        clf = ctx.zeroshot(sp.classnames, choice.templates)
        zs_acc = _zeroshot_scores(ctx, clf, sp.test)[0]["acc1"]
    res = fewshot_curve(sp.train.features, sp.train.labels, sp.test.features, sp.test.labels, shots=shots,
                        seeds=seeds, num_classes=k, C=C, zeroshot_acc=zs_acc, progress=ctx.progress, max_iter=max_iter)
    metrics: dict[str, Any] = {f"acc1_{s}shot": res.mean(s) for s in res.shots}
    metrics.update({f"acc1_{s}shot_std": res.std(s) for s in res.shots})
    metrics["zeroshot_acc1"] = zs_acc
    metrics["shots_to_match_zeroshot"] = res.matching_k
    return ctx.record(sp.name, "fewshot", metrics, protocol=sp.protocol, n_train=len(sp.train),
                      n_test=len(sp.test), skipped=sp.skipped, num_classes=k, seeds=seeds, curve=res.curve(),
                      matching_note=res.matching_note, **(choice.record_extras() if choice else {}),
                      timings={"total": time.perf_counter() - t0, "fits": res.seconds})


def run_robustness(ctx: EvalContext, dataset: Any = None, *, train: Any = None, test: Any = None,
                   split: str | None = None, train_split: str | None = None, test_split: str | None = None,
                   test_fraction: float = 0.5, seed: int = 0, shifts: Any = "all",
                   variants: dict[str, Any] | None = None, classnames: Any = None, templates: Any = "auto",
                   linear_probe_on: bool = True, C: float | None = None, max_iter: int = 1000) -> dict[str, Any]:
    """Accuracy on the clean test set and on shifted copies, zero-shot next to a linear probe
    fitted on the clean train set; the drop from clean is the robustness measure."""
    t0 = time.perf_counter()
    sp = _train_test(ctx, dataset, train=train, test=test, split=split, train_split=train_split,
                     test_split=test_split, test_fraction=test_fraction, seed=seed, classnames=classnames)
    if not sp.classnames:
        raise ValueError(f"dataset {sp.name!r} has no class names; pass --classnames FILE")
    k = _num_classes(sp.classnames, sp.train.labels, sp.test.labels)
    choice = _templates(ctx, templates, sp.name, sp.source if classnames is None else None, classnames)
    clf = ctx.zeroshot(sp.classnames, choice.templates)
    probe = None
    if linear_probe_on:
        probe = linear_probe(sp.train.features, sp.train.labels, sp.test.features, sp.test.labels,
                             num_classes=k, C=C, seed=seed, max_iter=max_iter, progress=ctx.progress)

    def evaluate(label: str, fs: FeatureSet, kind: str) -> dict[str, Any]:
        row: dict[str, Any] = {"shift": label, "kind": kind, "n": len(fs), "skipped": fs.skipped}
        row["zeroshot_acc1"] = _zeroshot_scores(ctx, clf, fs)[0]["acc1"]
        if probe is not None:
            row["linear_probe_acc1"] = probe.model.score(fs.features, fs.labels)
        return row

    rows = [evaluate("clean", sp.test, "clean")]
    for sh in parse_shifts(shifts, seed):
        fs = ctx.features(sp.test_ds, sp.test_ident, shift=sh, desc=f"features ({sh.label})")
        rows.append(evaluate(sh.label, fs, "built-in"))
    for label, spec in (variants or {}).items():
        vds, vid = _labelled(spec, None)
        resolve_classnames(vds, sp.classnames)  # same label space or a clear error
        vfs = ctx.features(vds, vid, desc=f"features ({label})")
        own = [str(n) for n in (getattr(vds, "classnames", None) or [])]
        perm = match_by_name(own, sp.classnames, source=f"variant {label!r}") if own else None
        if perm is not None and vfs.labels is not None:  # its label k is class perm[k] of the test set
            vfs.labels = np.asarray(perm, dtype=np.int64)[vfs.labels]
        rows.append(evaluate(label, vfs, "variant"))
    clean = rows[0]
    for r in rows:
        r["zeroshot_drop"] = clean["zeroshot_acc1"] - r["zeroshot_acc1"]
        if probe is not None:
            r["linear_probe_drop"] = clean["linear_probe_acc1"] - r["linear_probe_acc1"]
    shifted = rows[1:]
    metrics: dict[str, Any] = {"clean_zeroshot_acc1": clean["zeroshot_acc1"]}
    if probe is not None:
        metrics["clean_linear_probe_acc1"] = clean["linear_probe_acc1"]
    if shifted:
        metrics["mean_shift_zeroshot_acc1"] = float(np.mean([r["zeroshot_acc1"] for r in shifted]))
        metrics["mean_zeroshot_drop"] = float(np.mean([r["zeroshot_drop"] for r in shifted]))
        if probe is not None:
            metrics["mean_shift_linear_probe_acc1"] = float(np.mean([r["linear_probe_acc1"] for r in shifted]))
            metrics["mean_linear_probe_drop"] = float(np.mean([r["linear_probe_drop"] for r in shifted]))
            # > 0: zero-shot loses less accuracy under shift than the probe adapted to the clean set.
            metrics["robustness_gap"] = metrics["mean_linear_probe_drop"] - metrics["mean_zeroshot_drop"]
    for r in shifted:
        metrics[f"{r['shift']}_zeroshot_acc1"] = r["zeroshot_acc1"]
        if probe is not None:
            metrics[f"{r['shift']}_linear_probe_acc1"] = r["linear_probe_acc1"]
    return ctx.record(sp.name, "robustness", metrics, protocol=sp.protocol, shifts=rows,
                      num_classes=k, **choice.record_extras(),
                      linear_probe_C=None if probe is None else probe.C, skipped=sp.skipped,
                      timings={"total": time.perf_counter() - t0})


TASK_RUNNERS: Mapping[str, Callable[..., dict[str, Any]]] = MappingProxyType({
    "zeroshot": run_zeroshot, "zeroshot_classification": run_zeroshot,
    "retrieval": run_retrieval, "zeroshot_retrieval": run_retrieval,
    "linear_probe": run_linear_probe, "linear-probe": run_linear_probe,
    "fewshot": run_fewshot, "few-shot": run_fewshot,
    "robustness": run_robustness,
})
