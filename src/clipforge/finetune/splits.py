"""The labelled data of a fine-tuning run: train and test positions, class names and templates.

Train and test come from ``dataset`` / ``test_dataset`` (with their splits); when they would be the
same images, a stratified fraction is held out, so the fine-tuned model is never scored on the
images it was trained on. Batches are a pure function of ``(seed, step)``, so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data import open_labelled
from ..eval import load_templates, resolve_classnames, stratified_split
from ..preprocess import ImageLoadError
from .config import FinetuneConfig

logger = logging.getLogger("clipforge.finetune")
GENERIC_TEMPLATE = "a photo of a {}."


class Positions:
    """Items ``positions`` of a labelled dataset, map-style (what feature extraction reads)."""

    def __init__(self, base: Any, positions: np.ndarray) -> None:
        self.base = base
        self.positions = np.asarray(positions, dtype=np.int64)
        self.labels = np.asarray(base.labels, dtype=np.int64)[self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.positions[i])]


@dataclass
class Splits:
    train: Positions
    test: Positions
    classnames: list[Any]
    templates: list[str]
    name: str                 # the test dataset's name, for records
    protocol: str             # how train and test were obtained, for records

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def resolve_templates(templates: str | Sequence[str] | None, ds: Any, classnames: Any) -> list[str]:
    """Given templates; else the dataset's own (built-in scenes, CLIP_benchmark folders); else
    those of a built-in class-name set named by ``classnames``; else ``"a photo of a {}."``."""
    if templates not in (None, "auto"):
        return load_templates(templates)  # type: ignore[arg-type]
    own = getattr(ds, "templates", None)
    if own:
        return load_templates(list(own))
    if isinstance(classnames, str) and not Path(classnames).is_file():
        try:
            return load_templates(classnames)
        except (ValueError, FileNotFoundError):
            pass
    return [GENERIC_TEMPLATE]


def open_splits(cfg: FinetuneConfig, log: Callable[[str], None] | None = None) -> Splits:
    if cfg.test_dataset is None and cfg.test_split is not None and cfg.train_split is None:
        raise ValueError("--test-split without --train-split would train on every split of --dataset; "
                         "give --train-split too (or --test-dataset)")
    train_ds = open_labelled(cfg.dataset, split=cfg.train_split)
    names = resolve_classnames(train_ds, cfg.classnames, log)
    if cfg.test_dataset is None and cfg.test_split is None:
        tr, te = stratified_split(train_ds.labels, cfg.test_fraction, cfg.split_seed)
        test_ds = train_ds
        protocol = f"stratified hold-out of {cfg.dataset}: test_fraction={cfg.test_fraction}, seed={cfg.split_seed}"
    else:
        test_spec = cfg.test_dataset or cfg.dataset
        test_ds = open_labelled(test_spec, split=cfg.test_split)
        test_names = resolve_classnames(test_ds, cfg.classnames, log)
        if cfg.classnames is None and [str(c) for c in test_names] != [str(c) for c in names]:
            raise ValueError(f"train dataset {cfg.dataset!r} and test dataset {test_spec!r} name their classes "
                             f"differently ({[str(c) for c in names][:4]}... vs {[str(c) for c in test_names][:4]}...); "
                             "pass --classnames to fix one label space")
        tr, te = np.arange(len(train_ds)), np.arange(len(test_ds))
        protocol = (f"train {cfg.dataset}" + (f" [{cfg.train_split}]" if cfg.train_split else "") +
                    f", test {test_spec}" + (f" [{cfg.test_split}]" if cfg.test_split else ""))
    if cfg.max_test is not None and cfg.max_test < len(te):
        _, keep = stratified_split(np.asarray(test_ds.labels)[te], cfg.max_test / len(te), cfg.split_seed)
        te = np.sort(np.asarray(te)[keep])
        protocol += f", test subsampled to {len(te)} (stratified)"
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"dataset {cfg.dataset!r}: {len(tr)} train and {len(te)} test images; need both")
    templates = resolve_templates(cfg.templates, train_ds, cfg.classnames)
    name = str(getattr(test_ds, "name", None) or Path(str(cfg.test_dataset or cfg.dataset).rstrip("/")).name)
    return Splits(Positions(train_ds, tr), Positions(test_ds, te), names, templates, name, protocol)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per pass over ``n`` items (the last partial batch is dropped; at least one)."""
    return max(1, n // batch_size)


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    return max(1, int(round(float(cfg.epochs or 0) * steps_per_epoch(n_train, cfg.batch_size))))


def batch_positions(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Positions (into the train set) of 0-based step ``step``'s batch: epoch ``e`` is a
    permutation drawn from ``(seed, e)``, cut into full batches."""
    spe = steps_per_epoch(n, batch_size)
    epoch, b = divmod(step, spe)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[b * batch_size:(b + 1) * batch_size]


def load_batch(ds: Positions, positions: np.ndarray, preprocess: Callable[[Any], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Preprocessed images and labels; unreadable images are skipped (their messages returned)."""
    xs, ys, bad = [], [], []
    for p in positions:
        try:
            xs.append(preprocess(ds[int(p)]))
            ys.append(int(ds.labels[int(p)]))
        except (ImageLoadError, OSError) as e:
            bad.append(f"train item {int(ds.positions[int(p)])}: {e}")
    if not xs:
        raise ValueError(f"every image of a training batch failed to load (first: {bad[0] if bad else '?'})")
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), bad


__all__ = ["Positions", "Splits", "open_splits", "resolve_templates", "batch_positions", "load_batch",
           "steps_per_epoch", "total_steps"]
