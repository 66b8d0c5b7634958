"""Labelled image datasets for zero-shot / linear-probe evaluation: image folders, CSV/JSONL
manifests, WebDataset shards with ``cls`` members, ``.npz`` arrays and the built-in scene tasks.
Images are decoded lazily (``ds[i]``), so opening a dataset is cheap and a corrupt image
only fails (with :class:`~clipforge.preprocess.ImageLoadError`) when it is read."""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..preprocess import ImageLoadError, load_image
from ..utils import text_name
from .files import walk_files
from .scenes import parse_scenes_query, scene_tasks
from .remote import is_remote, local_path, read_small, scheme
from .shards import IMAGE_EXTS, read_shard, resolve_shards, split_member_name
from .tables import IMAGE_COLUMNS, LABEL_COLUMNS, find_column, is_manifest, read_rows

logger = logging.getLogger("clipforge.data")

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
CLASSNAME_COLUMNS = ("classname", "class_name", "clip_classname", "label_name")
TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # CLIP_benchmark's, one template per line ({c})


@dataclass
class LabelledDataset:
    """Map-style: ``len(ds)``, ``ds[i]`` -> PIL image; ``labels[i]`` indexes ``classnames``."""

    name: str
    labels: np.ndarray
    classnames: list[str]
    loader: Callable[[int], Image.Image] = field(repr=False)
    keys: list[str] | None = field(default=None, repr=False)
    templates: list[str] | None = None  # prompt templates when the dataset defines its own

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Image.Image:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} images)")
        return self.loader(i % n)

    def __iter__(self) -> Iterator[Image.Image]:
        for i in range(len(self)):
            yield self[i]


class _FileLoader:
    """Image files by index (a class, not a closure, so datasets pickle into worker processes)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __call__(self, i: int) -> Image.Image:
        return load_image(self.paths[i])


class _ArrayLoader:
    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class _TarMemberLoader:
    """Members of uncompressed tar shards read by offset (random access without extraction)."""

    def __init__(self, entries: list[tuple[str, int, int, str]]) -> None:
        self.entries = entries

    def __call__(self, i: int) -> Image.Image:
        shard, offset, size, member = self.entries[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ImageLoadError(f"cannot decode image {shard}:{member}: truncated shard")
        return load_image(data, name=f"{shard}:{member}")


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (trailing blank lines ignored, blank lines inside are an error)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"classnames file not found: {p}")
    return parse_classnames(p.read_text(encoding="utf-8"), str(p))


def parse_classnames(text: str, source: str) -> list[str]:
    """The class names of a ``classnames.txt`` text (see :func:`read_classnames`)."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for k, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{source}: line {k} is blank (one class name per line expected)")
    return [line.strip() for line in lines]


def _classnames(given: list[str] | str | os.PathLike | None, n_classes: int, default: Sequence[str],
                where: str) -> list[str]:
    if given is None:
        return list(default)
    if isinstance(given, (str, os.PathLike)):
        names, src = read_classnames(given), f"classnames file {given}"
    else:
        names, src = [str(c) for c in given], "classnames list"
    if len(names) != n_classes:
        raise ValueError(f"{src} has {len(names)} names but {where} has {n_classes} classes")
    return names


def _check_label_range(labels: np.ndarray, where: str) -> None:
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: negative label {int(labels.min())}")


def open_labelled(spec: str, *, split: str | None = None, classnames: list[str] | str | None = None) -> LabelledDataset:
    """Open a labelled dataset: an image folder (one subfolder per class, ``_`` -> space in
    names; ``split`` picks a ``<root>/<split>`` subfolder), a CSV/TSV/JSONL manifest with image
    and label columns (label = int or class name; ``split`` filters a split column), WebDataset
    shards with ``cls`` members, an ``.npz`` (``images`` uint8 NHWC/NHW, ``labels``, optional
    ``class_names``) or ``builtin:scenes-<task>[?seed=0&n_per_class=50&size=64]``.

    ``classnames`` (a list or a file with one per line) overrides the names; its length must
    equal the number of classes.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty dataset spec: {spec!r}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return _open_scenes(spec, classnames)
    p = Path(spec)
    if p.is_dir() and (p / (split or "test") / "nshards.txt").is_file():
        # CLIP_benchmark's WebDataset layout: <root>/<split>/{0..n-1}.tar + nshards.txt, with
        # classnames.txt and zeroshot_classification_templates.txt in <root>
        ds = _open_shards(str(p / (split or "test")), classnames)
        ds.name = p.name
        return ds
    if p.is_dir() and not any(x.name.lower().endswith(".tar") for x in p.iterdir() if x.is_file()):
        return _open_folder(p, split, classnames)
    if spec.lower().endswith(".npz"):
        return _open_npz(p, classnames)
    if is_manifest(spec):
        return _open_manifest(p, split, classnames)
    return _open_shards(spec, classnames)


def _open_scenes(spec: str, classnames) -> LabelledDataset:
    name = spec[len("builtin:"):].partition("?")[0]
    if not name.startswith("scenes-"):
        raise ValueError(f"unknown builtin labelled dataset {spec!r}; use builtin:scenes-<task>")
    q = parse_scenes_query(spec)
    unknown = set(q) - {"seed", "n_per_class", "size"}
    if unknown:
        raise ValueError(f"{spec!r}: unknown option(s) {sorted(unknown)}; known: seed, n_per_class, size")
    try:
        kw = dict(seed=int(q.get("seed", 0)), n_per_class=int(q.get("n_per_class", 50)),
                  image_size=int(q.get("size", 64)))
    except ValueError as e:
        raise ValueError(f"{spec!r}: options must be integers ({e})") from None
    task = scene_tasks(**kw, names=[name[len("scenes-"):]])[name[len("scenes-"):]]
    images = task.images
    return LabelledDataset(name=name, labels=task.labels,
                           classnames=_classnames(classnames, len(task.classnames), task.classnames, spec),
                           loader=images.__getitem__, keys=[f"{name}/{i}" for i in range(len(images))],
                           templates=list(task.templates))


def _open_folder(root: Path, split: str | None, classnames) -> LabelledDataset:
    if split:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"image folder {root} has no {split!r} subfolder")
        root = root / split
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders")
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(classes):
        found = walk_files(d, FOLDER_IMAGE_EXTS)  # regular files only; each directory once
        files.extend(found)
        labels.extend([k] * len(found))
    if not files:
        raise ValueError(f"image folder {root}: no images ({', '.join(FOLDER_IMAGE_EXTS)}) "
                         f"in {len(classes)} class folders")
    names = _classnames(classnames, len(classes), [d.name.replace("_", " ") for d in classes], f"image folder {root}")
    return LabelledDataset(name=root.name, labels=np.asarray(labels, dtype=np.int64), classnames=names,
                           loader=_FileLoader(files), keys=[text_name(str(f.relative_to(root))) for f in files])


def _open_npz(path: Path, classnames) -> LabelledDataset:
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path) as z:
        missing = [k for k in ("images", "labels") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; arrays found: {z.files}")
        images, labels = z["images"], z["labels"]
        stored = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
    bad_channels = images.ndim == 4 and images.shape[-1] not in (1, 3, 4)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or bad_channels:
        raise ValueError(f"{path}: 'images' must be uint8 NHWC (C=1,3,4) or NHW, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be 1-D integers, one per image; got {labels.dtype} {labels.shape} "
                         f"for {len(images)} images")
    labels = labels.astype(np.int64)
    _check_label_range(labels, str(path))
    n_classes = len(stored) if stored is not None else int(labels.max()) + 1
    if stored is not None and labels.size and labels.max() >= n_classes:
        raise ValueError(f"{path}: label {int(labels.max())} out of range for {n_classes} class_names")
    names = _classnames(classnames, n_classes, stored or [str(i) for i in range(n_classes)], str(path))
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    return LabelledDataset(name=path.stem, labels=labels, classnames=names, loader=_ArrayLoader(images),
                           keys=[f"{path.name}[{i}]" for i in range(len(labels))])


def _open_manifest(path: Path, split: str | None, classnames) -> LabelledDataset:
    columns, rows = read_rows(path)
    img_col = find_column(path, columns, IMAGE_COLUMNS, "image")
    lab_col = find_column(path, columns, LABEL_COLUMNS, "label")
    split_col = next((c for c in columns if c.lower() == "split"), None)
    if split and split_col:
        kept = [(n, r) for n, r in rows if str(r.get(split_col, "")).strip() == split]
        if not kept:
            raise ValueError(f"{path}: no rows with {split_col}={split!r}")
        rows = kept
    if not rows:
        raise ValueError(f"{path}: no rows")
    raw: list[str] = []
    for lineno, r in rows:
        v = r.get(lab_col)
        if v is None or str(v).strip() == "":
            raise ValueError(f"{path}: line {lineno}: empty {lab_col!r}")
        if not str(r.get(img_col) or "").strip():
            raise ValueError(f"{path}: line {lineno}: empty {img_col!r}")
        raw.append(str(v).strip())
    is_int = all(v.lstrip("-").isdigit() for v in raw)
    if is_int:
        labels = np.asarray([int(v) for v in raw], dtype=np.int64)
        _check_label_range(labels, str(path))
        n_classes = int(labels.max()) + 1
        default = [str(i) for i in range(n_classes)]
        name_col = next((c for c in columns if c.lower() in CLASSNAME_COLUMNS), None)
        if name_col:
            for lab, (_, r) in zip(labels, rows):
                default[lab] = str(r.get(name_col, default[lab])).strip() or default[lab]
        names = _classnames(classnames, n_classes, default, str(path))
    else:
        if classnames is None:
            names = sorted(set(raw))
        else:
            names = read_classnames(classnames) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
            unknown = sorted(set(raw) - set(names))
            if unknown:
                line = next(n for (n, _), v in zip(rows, raw) if v == unknown[0])
                raise ValueError(f"{path}: line {line}: label {unknown[0]!r} is not one of the {len(names)} class "
                                 f"names ({len(unknown)} unknown label(s))")
        index = {c: k for k, c in enumerate(names)}
        labels = np.asarray([index[v] for v in raw], dtype=np.int64)
    root = path.parent
    paths = [Path(str(r[img_col]).strip()) for _, r in rows]
    paths = [p if p.is_absolute() else root / p for p in paths]
    return LabelledDataset(name=path.stem, labels=labels, classnames=names, loader=_FileLoader(paths),
                           keys=[str(r[img_col]).strip() for _, r in rows])


class _BytesLoader:
    """Encoded images held in memory (shards streamed from URLs or commands cannot be seeked)."""

    def __init__(self, images: list[bytes], names: list[str]) -> None:
        self.images, self.names = images, names

    def __call__(self, i: int) -> Image.Image:
        return load_image(self.images[i], name=self.names[i])


def _stream_labelled(shards: list[str]) -> tuple[_BytesLoader, list[str], list[int], int]:
    """Images (encoded bytes, held in memory), keys and ``cls`` labels of remote / ``pipe:``
    shards, read as streams. An unreadable shard is an error: an eval set missing a shard would
    change the metric."""
    images: list[bytes] = []
    keys: list[str] = []
    labels: list[int] = []
    unlabelled = 0
    for shard in shards:
        for rec in read_shard(shard, frozenset(IMAGE_EXTS) | {"cls"}):
            if rec.error:
                raise ValueError(f"cannot read eval shard: {rec.detail}")
            ext = next((e for e in IMAGE_EXTS if rec.files.get(e) is not None), None)
            if ext is None:
                continue
            raw = rec.files.get("cls")
            if raw is None:
                unlabelled += 1
                continue
            text = raw.decode("utf-8", errors="replace").strip()
            try:
                labels.append(int(text))
            except ValueError:
                raise ValueError(f"{shard}: {rec.key}.cls: label {text!r} is not an integer") from None
            images.append(rec.files[ext])  # type: ignore[arg-type]
            keys.append(f"{shard.rsplit('/', 1)[-1]}:{rec.key}.{ext}")
    return _BytesLoader(images, keys), keys, labels, unlabelled


def _index_local(shards: list[str]) -> tuple[_TarMemberLoader, list[str], list[int], int]:
    """Offsets of the images and the ``cls`` labels of local uncompressed shards (images are
    read later by offset: random access without extraction)."""
    entries: list[tuple[str, int, int, str]] = []
    labels: list[int] = []
    unlabelled = 0
    for shard in shards:
        try:
            with tarfile.open(shard, mode="r:") as tf:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                order: list[str] = []
                for m in tf.getmembers():
                    parts = split_member_name(m.name) if m.isfile() else None
                    if parts is None:
                        continue
                    if parts[0] not in groups:
                        groups[parts[0]] = {}
                        order.append(parts[0])
                    groups[parts[0]][parts[1]] = m
                for key in order:
                    g = groups[key]
                    img = next((g[e] for e in IMAGE_EXTS if e in g), None)
                    if img is None:
                        continue
                    if "cls" not in g:
                        unlabelled += 1
                        continue
                    raw = tf.extractfile(g["cls"]).read().decode("utf-8", errors="replace").strip()
                    try:
                        lab = int(raw)
                    except ValueError:
                        raise ValueError(f"{shard}: {g['cls'].name}: label {raw!r} is not an integer") from None
                    entries.append((shard, img.offset_data, img.size, img.name))
                    labels.append(lab)
        except tarfile.ReadError as e:
            raise ValueError(f"{shard}: cannot index tar shard ({e}); "
                             "labelled shards must be uncompressed .tar") from None
    return _TarMemberLoader(entries), [f"{Path(e[0]).name}:{e[3]}" for e in entries], labels, unlabelled


def _side_folders(shard: str) -> list[str]:
    """The shard's folder and the one above it, where CLIP_benchmark keeps ``classnames.txt``
    and the templates file (none for ``pipe:`` commands)."""
    local = local_path(shard)
    if local is not None:
        return [str(Path(local).parent), str(Path(local).parent.parent)]
    if scheme(shard) == "pipe":
        return []
    out: list[str] = []
    head = shard
    for _ in range(2):
        head = head.rpartition("/")[0]
        if not head or head.endswith(":/"):  # reached "scheme://"
            break
        out.append(head)
    return out


def _open_shards(spec: str, classnames) -> LabelledDataset:
    shards = resolve_shards(spec)
    if any(is_remote(s) for s in shards):
        loader, keys, labels, unlabelled = _stream_labelled(shards)
    else:
        loader, keys, labels, unlabelled = _index_local(shards)
    if unlabelled:
        logger.warning("%s: %d image(s) without a cls member ignored", spec, unlabelled)
    if not labels:
        raise ValueError(f"{spec}: no image with a cls member in {len(shards)} shard(s)")
    arr = np.asarray(labels, dtype=np.int64)
    _check_label_range(arr, spec)
    n_classes = int(arr.max()) + 1
    default = [str(i) for i in range(n_classes)]
    templates = None
    for d in _side_folders(shards[0]):  # beside the shards, or one up
        if classnames is None and (raw := read_small(f"{d}/classnames.txt")) is not None:
            classnames = parse_classnames(raw.decode("utf-8"), f"{d}/classnames.txt")
        if templates is None and (raw := read_small(f"{d}/{TEMPLATES_FILE}")) is not None:
            templates = [t.strip() for t in raw.decode("utf-8").splitlines() if t.strip()]
    names = _classnames(classnames, n_classes, default, spec)
    folders = _side_folders(shards[0])
    name = "" if not folders else folders[0].rsplit("/", 1)[-1] if is_remote(shards[0]) else Path(folders[0]).name
    return LabelledDataset(name=name or "shards", labels=arr, classnames=names, loader=loader, keys=keys,
                           templates=templates or None)
