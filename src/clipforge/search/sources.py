"""What a collection is made of: image folders, text files, and manifests / WebDataset shards
(through :mod:`clipforge.data`). Every source yields :class:`Item` records in a fixed order,
so item ``i`` always lands in the same output shard and a re-run can skip finished shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from PIL import Image

from ..data import SkipStats, open_pairs
from ..data.files import walk_files
from ..data.shards import IMAGE_EXTS
from ..data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS, find_column, read_rows
from ..preprocess import load_image
from ..utils import text_name

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclass
class Item:
    """One member of a collection. Images are decoded lazily (``load()``), so items of shards
    that are already finished, or belong to another rank, cost nothing to pass over."""

    key: str
    path: str | None = None
    member: str | None = None
    caption: str | None = None
    loader: Callable[[], Any] | None = None  # -> PIL image or clipforge.data Sample

    def load(self) -> Image.Image:
        """The decoded image (raises ImageLoadError / BadSample naming the item)."""
        if self.loader is not None:
            got = self.loader()
            if isinstance(got, Image.Image):
                return got
            # a clipforge.data Sample: take the image, and fill in where it came from
            meta = getattr(got, "meta", None) or {}
            self.key = str(getattr(got, "key", self.key))
            if self.path is None:
                self.path, self.member = _locate(meta)
            if self.caption is None and getattr(got, "captions", None):
                self.caption = got.captions[0]
            return got.image
        if self.path is None:
            raise ValueError(f"item {self.key!r} has no image")
        return load_image(self.path, name=self.path)


class Source(Protocol):
    kind: str  # "image" or "text"

    def __iter__(self) -> Iterator[Item]: ...

    def __len__(self) -> int: ...  # may raise TypeError when unknown (streams)

    def describe(self) -> dict[str, Any]: ...


def list_image_files(root: Path, stats: SkipStats | None = None) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by their relative POSIX path; FIFOs, devices,
    dangling links and directories reached twice are counted in ``stats`` (:func:`clipforge.data.files.walk_files`)."""
    return walk_files(root, IMAGE_EXTENSIONS, stats)


class ImageFolderSource:
    """Every image under a folder; key = path relative to the folder. A sibling ``.txt`` file
    with the same stem, if any, is taken as the caption (clip-retrieval's convention)."""

    kind = "image"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.stats = SkipStats(log_first=0)
        self.files = list_image_files(self.root, self.stats)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Item]:
        for p in self.files:
            cap_file = p.with_suffix(".txt")
            caption = None
            if cap_file.is_file():
                try:
                    caption = cap_file.read_text(encoding="utf-8", errors="replace").strip() or None
                except OSError:
                    caption = None
            yield Item(key=p.relative_to(self.root).as_posix(), path=str(p), caption=caption)

    def skip_stats(self) -> dict[str, Any] | None:
        """Entries left out while listing the folder (FIFOs, devices, dangling links, loops), by reason."""
        return self.stats.to_dict() if self.stats.total else None

    def describe(self) -> dict[str, Any]:
        return {"type": "image-folder", "root": text_name(str(self.root)), "count": len(self.files)}


class TextFileSource:
    """One text per line (UTF-8); key = ``line:<n>`` (1-based). Blank lines are skipped and logged."""

    kind = "text"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        try:
            self.lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text (byte {e.start})") from None

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self) -> Iterator[Item]:
        for i, line in enumerate(self.lines, 1):
            yield Item(key=f"line:{i}", caption=line.strip())

    def describe(self) -> dict[str, Any]:
        return {"type": "text-file", "path": str(self.path), "count": len(self.lines)}


class ImageManifestSource:
    """The images of a manifest that has no caption column (e.g. ``image,label``): embedding
    images needs no captions. Key = the image cell; rows naming the same image count once."""

    kind = "image"

    def __init__(self, path: str | Path, columns: list[str], rows: list[tuple[int, dict[str, Any]]],
                 split: str | None = None) -> None:
        self.path = Path(path)
        image_col = find_column(self.path, columns, IMAGE_COLUMNS, "image")
        split_col = next((c for c in columns if c.lower() == "split"), None)
        if split_col is not None and split is not None:
            rows = [(n, r) for n, r in rows if str(r.get(split_col, "")).strip() == split]
        self.keys: list[str] = []
        seen: set[str] = set()
        for _, row in rows:
            rel = str(row.get(image_col) or "").strip()
            if rel and rel not in seen:
                seen.add(rel)
                self.keys.append(rel)

    @classmethod
    def if_captionless(cls, path: str, split: str | None) -> "ImageManifestSource | None":
        columns, rows = read_rows(path)
        if any(c.lower() in CAPTION_COLUMNS for c in columns):
            return None
        return cls(path, columns, rows, split)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Item]:
        root = self.path.parent
        for key in self.keys:
            p = Path(key)
            yield Item(key=key, path=str(p if p.is_absolute() else root / p))

    def describe(self) -> dict[str, Any]:
        return {"type": "image-manifest", "path": str(self.path.resolve()), "count": len(self.keys)}


class PairDataSource:
    """Manifests (.csv/.tsv/.jsonl), WebDataset shards and ``builtin:`` sources through
    :func:`clipforge.data.open_pairs`, read in their natural order without shuffling.

    ``kind='image'``: one item per sample (first caption kept as metadata); images are decoded
    only for the shards being embedded (map-style ``get(i)``, or a shard record's ``decode``).
    ``kind='text'``: one item per caption, key ``<sample key>#<i>``.
    A bad sample (missing file, undecodable, no caption) is skipped and logged with its reason.
    """

    def __init__(self, spec: str, kind: str = "image", split: str | None = None) -> None:
        if kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
        self.spec, self.kind, self.split = spec, kind, split
        self.pairs = open_pairs(spec, split=split)

    def __len__(self) -> int:
        if self.kind == "text" or not getattr(self.pairs, "is_map_style", False):
            raise TypeError("number of items unknown before reading")
        return len(self.pairs)

    def __iter__(self) -> Iterator[Item]:
        p = self.pairs
        if getattr(p, "is_map_style", False):
            for i in range(len(p)):
                if self.kind == "text":
                    caps = p.captions(i) if hasattr(p, "captions") else _safe_captions(p, i)
                    key = p.key(i) if hasattr(p, "key") else str(i)
                    yield from (Item(key=f"{key}#{j}", caption=c) for j, c in enumerate(caps))
                elif hasattr(p, "key"):
                    yield Item(key=p.key(i), loader=(lambda i=i: p.get(i)))
                else:
                    yield Item(key=str(i), loader=(lambda i=i: p.get(i)))
            return
        # streams (WebDataset shards): raw records in shard order, decoded on demand
        for rec in p.epoch_records(rank=0, world_size=1, shuffle=False, warn=False):
            shard = str(Path(rec.shard).resolve())
            ext = next((e for e in IMAGE_EXTS if rec.files.get(e) is not None), None)
            member = f"{rec.key}.{ext}" if ext else None
            if self.kind == "text":
                try:
                    sample = p.decode(rec)
                except ValueError:
                    continue  # counted by the source's own stats below
                yield from (Item(key=f"{rec.key}#{j}", path=shard, member=member, caption=c)
                            for j, c in enumerate(sample.captions))
            else:
                yield Item(key=rec.key, path=shard, member=member, loader=(lambda rec=rec: p.decode(rec)))

    def skip_stats(self) -> dict[str, Any] | None:
        stats = getattr(self.pairs, "stats", None)
        if stats is None or not getattr(stats, "total", 0):
            return None
        return stats.to_dict() if hasattr(stats, "to_dict") else None

    def describe(self) -> dict[str, Any]:
        return {"type": "pairs", "spec": self.spec, "split": self.split,
                "num_samples": getattr(self.pairs, "num_samples", None)}


def _safe_captions(p: Any, i: int) -> list[str]:
    try:
        return list(p.get(i).captions)
    except ValueError:
        return []


def _locate(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """Where the original image lives, from a sample's metadata: (file or tar shard, tar member)."""
    for k in ("path", "image_path", "file", "filepath"):
        v = meta.get(k)
        if isinstance(v, str) and v:
            p = Path(v)
            return (str(p.resolve()) if p.exists() else v), None
    shard = meta.get("shard") or meta.get("url") or meta.get("__url__")
    member = meta.get("member") or meta.get("image_member")
    if isinstance(shard, str) and shard:
        p = Path(shard)
        return (str(p.resolve()) if p.exists() else shard), (member if isinstance(member, str) else None)
    return None, None


def open_source(*, images: str | None = None, data: str | None = None, texts: str | None = None,
                split: str | None = None) -> Source:
    """Build the source a CLI invocation names (exactly one of ``images``/``data``/``texts``).

    ``texts`` is a ``.txt`` file (one text per line) or a manifest/shard spec whose captions
    are embedded."""
    given = [n for n, v in (("images", images), ("data", data), ("texts", texts)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one input (an image folder, a data spec or a text file), got {given or 'none'}")
    if images:
        return ImageFolderSource(images)
    if texts:
        if texts.endswith(MANIFEST_SUFFIXES) or "{" in texts or texts.endswith(".tar"):
            return PairDataSource(texts, kind="text", split=split)
        return TextFileSource(texts)
    assert data is not None
    if data.lower().endswith(MANIFEST_SUFFIXES) and Path(data).is_file():
        only_images = ImageManifestSource.if_captionless(data, split)
        if only_images is not None:  # image,label manifests: captions are only metadata here
            return only_images
    p = Path(data)
    if p.is_dir() and not any(p.glob("*.tar")) and not any(p.glob("*.csv")) and not any(p.glob("*.tsv")) \
            and not any(p.glob("*.jsonl")):
        return ImageFolderSource(p)
    return PairDataSource(data, kind="image", split=split)
