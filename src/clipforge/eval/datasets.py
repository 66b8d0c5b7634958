"""The seam between evaluation and data: resolve dataset specs through ``clipforge.data``,
wrap in-memory data in the same interface, and check class names against labels.

Evaluation only needs a map-style labelled dataset: ``len(ds)``, ``ds[i]`` -> PIL image
(may raise ``ImageLoadError``), ``.labels`` (int array), ``.classnames`` and ``.name``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..data import open_labelled as _open_labelled
from ..data import open_pairs as _open_pairs
from .prompts import ClassName, builtin_set_info, display_name, load_classnames, match_by_name


@dataclass
class InMemoryLabelled:
    """Images (PIL or ``[3,S,S]`` tensors) + labels in memory, with the labelled-dataset interface."""

    images: Sequence[Any]
    labels: np.ndarray
    classnames: list[ClassName] = field(default_factory=list)
    name: str = "in-memory"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return self.images[i]


class Subset:
    """Items ``positions`` of a labelled dataset (no copying)."""

    def __init__(self, base: Any, positions: np.ndarray, name: str | None = None) -> None:
        self.base, self.positions = base, np.asarray(positions, dtype=np.int64)
        self.labels = np.asarray(base.labels)[self.positions]
        self.classnames = list(getattr(base, "classnames", []) or [])
        self.name = name or getattr(base, "name", "subset")

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.positions[i])]


def open_labelled(spec: Any, split: str | None = None) -> Any:
    """A labelled dataset from a spec (via :func:`clipforge.data.open_labelled`) or an object
    that already has the interface (returned as is)."""
    if not isinstance(spec, (str, os.PathLike)):
        for attr in ("labels", "__getitem__", "__len__"):
            if not hasattr(spec, attr):
                raise TypeError(f"dataset object {type(spec).__name__} lacks {attr!r}")
        return spec
    return _open_labelled(str(spec), split=split)


class LineCaptions:
    """A pair source whose ``txt`` members hold several captions, one per line: CLIP_benchmark's
    retrieval WebDataset layout (read as its reader does, ``str.splitlines``)."""

    def __init__(self, source: Any, name: str) -> None:
        self.source, self.name = source, name
        self.stats = getattr(source, "stats", None)
        self.num_samples = getattr(source, "num_samples", None)

    def iter_samples(self, **kw: Any) -> Iterator[Any]:
        for s in self.source.iter_samples(shuffle=False, **kw):
            caps = [ln.strip() for c in s.captions for ln in c.splitlines()]
            yield replace(s, captions=[c for c in caps if c])


def _clip_benchmark_root(spec: Any, split: str | None) -> Path | None:
    """``spec`` if it is a CLIP_benchmark WebDataset folder (``<root>/<split>/nshards.txt``)."""
    p = Path(str(spec))
    return p if p.is_dir() and (p / (split or "test") / "nshards.txt").is_file() else None


def open_pairs(spec: Any, split: str | None = None) -> Any:
    """Image-caption samples for retrieval (via :func:`clipforge.data.open_pairs`), or ``spec``
    itself when it is already an iterable of samples. Evaluation defaults the built-in scenes
    to their ``test`` split (the data source's own default is ``train``, for training). A
    CLIP_benchmark WebDataset folder is read from ``<root>/<split or test>/`` with its captions
    split into lines, as CLIP_benchmark reads them."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if split is None and str(spec).startswith("builtin:"):
        split = "test"
    root = _clip_benchmark_root(spec, split)
    if root is not None:
        return LineCaptions(_open_pairs(str(root / (split or "test")), split=split), root.name)
    return _open_pairs(str(spec), split=split)


def dataset_name(ds: Any, spec: Any = None) -> str:
    name = getattr(ds, "name", None)
    if name:
        return str(name)
    if isinstance(spec, (str, os.PathLike)):
        return Path(str(spec).rstrip("/")).name or str(spec)
    return type(ds).__name__


def _hash_strings(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(str(x).encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:16]


def _content_hash(images: Sequence[Any]) -> str:
    """Hash of in-memory pixels (PIL images or tensors/arrays): cheap next to embedding them."""
    h = hashlib.sha256()
    for im in images:
        if hasattr(im, "tobytes") and hasattr(im, "mode"):
            h.update(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
        else:
            a = np.ascontiguousarray(np.asarray(im.detach().cpu() if hasattr(im, "detach") else im))
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def dataset_identity(ds: Any, spec: Any = None, split: str | None = None) -> dict[str, Any] | None:
    """What distinguishes this dataset's content, for feature caching; ``None`` when it cannot be
    told (then features are not cached). Spec strings contribute the spec (+ file size/mtime),
    map-style datasets their item keys, in-memory data a hash of its pixels, subsets their positions."""
    ident: dict[str, Any] = {"name": dataset_name(ds, spec), "split": split, "n": len(ds)}
    labels = getattr(ds, "labels", None)
    if labels is not None:
        ident["labels"] = hashlib.sha256(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes()).hexdigest()[:16]
    keys = getattr(ds, "keys", None)
    if isinstance(keys, (list, tuple)) and len(keys) == len(ds):
        ident["keys"] = _hash_strings(keys)
    if isinstance(spec, (str, os.PathLike)):
        ident["spec"] = str(spec)
        p = Path(str(spec))
        if p.exists():
            st = p.stat()
            ident["stat"] = [st.st_size, int(st.st_mtime)]
        return ident
    if isinstance(ds, Subset):
        base = dataset_identity(ds.base)
        if base is None:
            return None
        return {**ident, "base": base, "positions": _hash_strings(map(str, ds.positions.tolist()))}
    if "keys" in ident:
        return ident
    if isinstance(ds, InMemoryLabelled):
        return {**ident, "content": _content_hash(ds.images)}
    return None


def resolve_classnames(ds: Any, override: Any = None, log: Callable[[str], None] | None = None) -> list[ClassName]:
    """Class names for ``ds``'s labels: ``override`` (built-in set name, file or list) or the
    dataset's own. When the dataset names its labels (image folders, class-name files, manifests
    with names) an override is matched to them by name, so a list in another label order cannot
    silently mislabel (:func:`~clipforge.eval.prompts.match_by_name`); otherwise it applies by
    position, and a built-in list says which label order it assumes. Raises ``ValueError`` if the
    number of names does not fit the labels."""
    source = "the dataset"
    if override is not None:
        names = load_classnames(override)
        source = str(override) if isinstance(override, (str, os.PathLike)) else "the class-name list"
    else:
        names = list(getattr(ds, "classnames", None) or [])
        if not names:
            raise ValueError(f"dataset {dataset_name(ds)!r} has no class names; pass --classnames FILE")
    labels = np.asarray(getattr(ds, "labels", []), dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"{source}: {len(names)} class names, but dataset {dataset_name(ds)!r} has labels "
                         f"in [{labels.min()}, {labels.max()}] (needs at least {labels.max() + 1} names)")
    own = [str(n) for n in (getattr(ds, "classnames", None) or [])]
    if override is None:
        return names
    if own and len(own) != len(names):
        raise ValueError(f"{source}: {len(names)} class names, but dataset {dataset_name(ds)!r} "
                         f"defines {len(own)} classes")
    info = builtin_set_info(override)
    perm = match_by_name(own, names, (info or {}).get("label_names"), source=source) if own else None
    if perm is not None:
        if perm != list(range(len(perm))) and log is not None:
            log(f"note: class names {source} matched to dataset {dataset_name(ds)!r}'s labels by name "
                "(their orders differ)")
        return [names[c] for c in perm]
    if info is not None and log is not None and info.get("order_differs_from_clip_benchmark"):
        log(f"note: class names {source!r} applied by position; they assume this label order: {info['label_order']}")
    return names


def short_names(names: Iterable[ClassName]) -> list[str]:
    return [display_name(n) for n in names]
