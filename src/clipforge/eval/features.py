"""Frozen image features, extracted once and cached on disk as float16 ``.npy``.

Linear probes, few-shot sweeps and robustness runs all reuse the same features, so extraction
(the only step that runs the image tower) happens once per model x dataset x image shift. The
cache file is written through a memory map (a 1M x 1024 float16 matrix is 2 GB and never has
to be held twice) and renamed into place when complete; a sidecar JSON records the skipped
items. An unreadable image is skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.skip import BadSample
from ..inference import embed_images
from ..preprocess import ImageLoadError, image_transform
from ..utils import read_json, write_json
from ..utils.io import current_umask

MAX_SKIP_MESSAGES = 20


def skippable_errors() -> tuple[type[BaseException], ...]:
    """Per-item errors that mean "this sample is unusable": skipped and counted, not fatal."""
    return (ImageLoadError, OSError, BadSample)


@dataclass
class FeatureSet:
    """``features[i]`` is the unit-norm embedding of dataset item ``indices[i]``."""

    features: np.ndarray                 # [M, D] float16 (may be a read-only memmap)
    indices: np.ndarray                  # [M] int64 dataset indices that loaded
    labels: np.ndarray | None = None     # [M] labels of those items (if labels were given)
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, positions: np.ndarray) -> "FeatureSet":
        """Rows ``positions`` (positions in this set, not dataset indices)."""
        positions = np.asarray(positions, dtype=np.int64)
        return FeatureSet(np.asarray(self.features[positions]), self.indices[positions],
                          None if self.labels is None else self.labels[positions], 0, [], 0.0, self.cached)

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.features, dtype=np.float32))


def _cache_files(cache_path: Path) -> tuple[Path, Path]:
    cache_path = Path(cache_path)
    return cache_path.with_suffix(".npy"), cache_path.with_suffix(".json")


def _load_cached(cache_path: Path, n: int, labels: np.ndarray | None) -> FeatureSet | None:
    npy, meta_path = _cache_files(cache_path)
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        feats = np.load(npy, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if meta.get("n") != n or feats.shape[0] != n:
        return None
    skipped = np.asarray(meta.get("skipped_indices", []), dtype=np.int64)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), skipped)
    out = feats if len(keep) == n else np.asarray(feats[keep])
    return FeatureSet(out, keep, None if labels is None else labels[keep], int(len(skipped)),
                      list(meta.get("skipped_messages", [])), 0.0, True)


def extract_features(model: Any, images: Sequence[Any], labels: Sequence[int] | np.ndarray | None = None, *,
                     preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
                     transform: Callable[[Image.Image, int], Image.Image] | None = None,
                     batch_size: int = 64, cache_path: str | Path | None = None, progress: bool = False,
                     desc: str = "features") -> FeatureSet:
    """Embed every item of a map-style ``images`` sequence (PIL images or ``[3,S,S]`` tensors;
    ``images[i]`` may raise ``ImageLoadError``, which skips and counts the item).

    ``transform(img, index)`` is applied to PIL images before preprocessing (image shifts).
    With ``cache_path`` (extension ignored) the features are read from / written to
    ``<cache_path>.npy`` + ``<cache_path>.json``; the caller puts a model/data hash in the name.
    """
    n = len(images)
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    if lab is not None and len(lab) != n:
        raise ValueError(f"{len(lab)} labels for {n} images")
    if cache_path is not None:
        hit = _load_cached(Path(cache_path), n, lab)
        if hit is not None:
            return hit
    pre = preprocess or image_transform(model.config.preprocess)
    t0 = time.perf_counter()
    skipped: list[int] = []
    messages: list[str] = []
    buf: np.ndarray | None = None
    tmp: str | None = None
    npy_path = meta_path = None
    if cache_path is not None:
        npy_path, meta_path = _cache_files(Path(cache_path))
        npy_path.parent.mkdir(parents=True, exist_ok=True)

    pending: list[torch.Tensor] = []
    pending_idx: list[int] = []
    bad = skippable_errors()

    def flush() -> None:
        nonlocal buf, tmp
        if not pending:
            return
        f = embed_images(model, pending, batch_size=len(pending)).numpy()
        if buf is None:
            if npy_path is not None:
                fd, tmp = tempfile.mkstemp(prefix=f".{npy_path.name}.", suffix=".tmp", dir=npy_path.parent)
                os.fchmod(fd, 0o666 & ~current_umask())  # like any other file, not mkstemp's 0600
                os.close(fd)
                buf = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, f.shape[1]))
            else:
                buf = np.zeros((n, f.shape[1]), dtype=np.float16)
        buf[np.asarray(pending_idx)] = f.astype(np.float16)
        pending.clear()
        pending_idx.clear()

    try:
        bar = tqdm(range(n), desc=desc, unit="img", disable=not progress, mininterval=1.0)
        for i in bar:
            try:
                img = images[i]
                if transform is not None:
                    img = transform(img, i)
                x = img if isinstance(img, torch.Tensor) else pre(img)
            except bad as e:
                skipped.append(i)
                if len(messages) < MAX_SKIP_MESSAGES:
                    messages.append(f"item {i}: {e}")
                continue
            pending.append(x)
            pending_idx.append(i)
            if len(pending) >= batch_size:
                flush()
        flush()
        bar.close()
        if buf is None:  # nothing loaded at all
            d = int(getattr(getattr(model, "config", None), "embed_dim", 0) or 0)
            buf = np.zeros((n, d), dtype=np.float16)
        if npy_path is not None and tmp is not None:
            assert isinstance(buf, np.memmap)
            buf.flush()
            del buf
            os.replace(tmp, npy_path)
            tmp = None
            write_json(meta_path, {"n": n, "skipped_indices": skipped, "skipped_messages": messages})
            buf = np.load(npy_path, mmap_mode="r")
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), np.asarray(skipped, dtype=np.int64))
    feats = buf if len(keep) == n else np.asarray(buf[keep])
    return FeatureSet(feats, keep, None if lab is None else lab[keep], len(skipped), messages,
                      time.perf_counter() - t0, False)
