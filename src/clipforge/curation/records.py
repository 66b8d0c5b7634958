"""The input of a curation step: a pool of pairs cut into *units* whose raw records can be
copied to the output unchanged.

A unit is one input WebDataset shard (read member by member with
:func:`clipforge.data.shards.read_shard`, keeping *every* member's original bytes), or a
fixed-size chunk of a map-style source (a manifest or ``builtin:scenes``), whose samples are
turned into img2dataset-style records (``{key}.<img>`` + ``{key}.txt`` + ``{key}.json``).
Units are the grain of resumability and of the rank split (unit ``i`` belongs to rank
``i % world_size``), and each writes one output shard.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ..data import PairSource, Sample, ShardSource, open_pairs
from ..data.remote import is_remote
from ..data.shards import IMAGE_EXTS, PORTABLE_IMAGE_EXTS, TAR_SUFFIXES, ShardRecord, read_shard, shard_sample_count
from ..data.skip import BadSample
from ..data.tables import as_caption_list
from ..preprocess import ImageLoadError, load_image


@dataclass
class RawRecord(ShardRecord):
    """A record synthesised from a map-style source; ``sample`` is its already decoded form."""

    source_key: str | None = None
    sample: Sample | None = field(default=None, repr=False)


def image_ext(files: dict[str, bytes | None]) -> str | None:
    return next((e for e in IMAGE_EXTS if files.get(e) is not None), None)


class Unit:
    """One grain of work: yields raw records in a fixed order and decodes them to samples."""

    index: int
    name: str

    def records(self) -> Iterator[ShardRecord]:
        raise NotImplementedError

    def decode(self, rec: ShardRecord) -> Sample:
        """The record as a :class:`Sample`; raises :class:`BadSample` naming the reason."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the unit reads (for the run fingerprint: a changed input invalidates results)."""
        raise NotImplementedError

    def approx_len(self) -> int | None:
        return None


class ShardUnit(Unit):
    def __init__(self, index: int, name: str, path: str, source: ShardSource) -> None:
        self.index, self.name, self.path, self._source = index, name, path, source

    def records(self) -> Iterator[ShardRecord]:
        yield from read_shard(self.path, None)  # every member: curation copies whole samples

    def decode(self, rec: ShardRecord) -> Sample:
        return self._source.decode(rec)

    def identity(self) -> dict[str, Any]:
        if is_remote(self.path):  # URLs and pipe: commands are identified by name only
            return {"path": self.path}
        st = os.stat(self.path)
        return {"path": os.path.abspath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def approx_len(self) -> int | None:
        return shard_sample_count(self.path)


class ChunkUnit(Unit):
    """Samples ``start..stop-1`` of a map-style source, keyed img2dataset-style
    (``{unit:05d}{position}``) because source keys (file paths) are not valid tar keys."""

    def __init__(self, index: int, source: PairSource, start: int, stop: int, width: int, identity: dict) -> None:
        self.index, self._source, self.start, self.stop, self._width = index, source, start, stop, width
        self.name = f"{index:05d}"
        self._identity = identity

    def records(self) -> Iterator[ShardRecord]:
        for pos, i in enumerate(range(self.start, self.stop)):
            key = f"{self.index:05d}{pos:0{self._width}d}"
            try:
                s = self._source.get(i)
            except BadSample as e:
                yield RawRecord(key=key, shard=self._source.spec, error=e.reason, detail=str(e), source_key=e.key)
                continue
            yield sample_record(key, s, self._source.spec)

    def decode(self, rec: ShardRecord) -> Sample:
        if rec.error:
            raise BadSample(rec.error, rec.key, rec.detail)
        s = getattr(rec, "sample", None)
        if s is not None:
            return s
        return decode_generic(rec)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity, start=self.start, stop=self.stop)

    def approx_len(self) -> int | None:
        return self.stop - self.start


def sample_record(key: str, s: Sample, origin: str) -> RawRecord:
    """A decoded sample as WebDataset members: the original file bytes when the sample came
    from a file (manifest rows), else the pixels encoded as PNG (lossless)."""
    path = s.meta.get("path")
    data: bytes | None = None
    ext = "png"
    if path:
        try:
            data = Path(path).read_bytes()
            suffix = Path(path).suffix.lower().lstrip(".")
            ext = "jpg" if suffix == "jpeg" else suffix
            if ext not in PORTABLE_IMAGE_EXTS:  # e.g. .bmp / .gif: re-encode to a WebDataset image type
                data = None
                ext = "png"
        except OSError:
            data = None
    if data is None:
        buf = io.BytesIO()
        s.image.convert("RGB" if s.image.mode not in ("RGB", "RGBA", "L") else s.image.mode).save(buf, format="PNG")
        data = buf.getvalue()
    caps = list(s.captions)
    txt = caps[0] if len(caps) == 1 else json.dumps(caps, ensure_ascii=False)  # a JSON list = several captions
    # img2dataset's per-sample JSON fields (url: the source file, if any), plus our source_key
    meta = {"url": str(path) if path else None, "caption": caps[0] if len(caps) == 1 else caps, "key": key,
            "status": "success", "error_message": None, "width": s.image.width, "height": s.image.height,
            "original_width": s.image.width, "original_height": s.image.height, "source_key": s.key}
    files = {ext: data, "txt": txt.encode("utf-8"), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    return RawRecord(key=key, shard=origin, files=files, source_key=s.key, sample=s)


def decode_generic(rec: ShardRecord) -> Sample:
    """Decode a record written by :func:`sample_record` (``txt`` caption, JSON-list aware)."""
    ext = image_ext(rec.files)
    if ext is None:
        raise BadSample("missing_image", rec.key, f"members {sorted(rec.files)}")
    raw = rec.files.get("txt")
    caps = as_caption_list(raw.decode("utf-8", errors="replace")) if raw is not None else []
    if not caps:
        raise BadSample("empty_caption", rec.key)
    try:
        img = load_image(rec.files[ext], name=f"{rec.shard}:{rec.key}.{ext}")
    except ImageLoadError as e:
        raise BadSample("decode_error", rec.key, str(e)) from None
    return Sample(key=rec.key, image=img, captions=caps, meta={"width": img.width, "height": img.height})


def shard_stem(path: str) -> str:
    name = os.path.basename(path)
    for suf in TAR_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


@dataclass
class Pool:
    """A data spec opened as an ordered list of units."""

    spec: str
    units: list[Unit]
    kind: str  # "shards" | "map"

    @property
    def paths(self) -> list[str]:
        return [u.path for u in self.units if isinstance(u, ShardUnit)]


def open_pool(spec: str, *, caption_key: str | None = None, split: str | None = None,
              samples_per_unit: int = 10000) -> Pool:
    """Open ``spec`` (shards, manifest or ``builtin:scenes``) for a curation step.

    Raises FileNotFoundError / ValueError before any work starts when the input is missing.
    """
    if samples_per_unit < 1:
        raise ValueError(f"samples_per_unit must be >= 1, got {samples_per_unit}")
    src = open_pairs(spec, split=split or "train", caption_key=caption_key)
    if isinstance(src, ShardSource):
        stems = [shard_stem(p) for p in src.shards]
        clash = len(set(stems)) != len(stems)
        units: list[Unit] = [ShardUnit(i, f"{i:05d}_{s}" if clash else s, p, src)
                             for i, (p, s) in enumerate(zip(src.shards, stems))]
        return Pool(spec, units, "shards")
    if not src.is_map_style:
        raise ValueError(f"{spec!r}: unsupported source type {type(src).__name__} for curation")
    n = len(src)
    ident: dict[str, Any] = {"spec": spec, "split": split, "n": n}
    if os.path.isfile(spec):
        st = os.stat(spec)
        ident.update(path=os.path.abspath(spec), size=st.st_size, mtime_ns=st.st_mtime_ns)
    width = max(4, len(str(samples_per_unit - 1)))
    units = [ChunkUnit(k, src, a, min(n, a + samples_per_unit), width, ident)
             for k, a in enumerate(range(0, n, samples_per_unit))]
    return Pool(spec, units, "map")


def pil_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")
