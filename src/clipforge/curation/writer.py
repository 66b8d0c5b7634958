"""Writing WebDataset shards in img2dataset's layout, to a path, a ``file://`` / fsspec URL
(``s3://``, ``gs://``, ``memory://`` ...) or a ``pipe:CMD`` command.

Per shard (as img2dataset 1.47 ``writer.py`` / ``logger.py`` write them):

- ``{name}.tar``: members ``{key}.{ext}``, extensions sorted (webdataset's ``TarWriter`` order),
  one ``{key}.json`` per sample with the sample's metadata;
- ``{name}.parquet``: one row per written sample: the input columns (``url``, ``caption``, any
  other JSON field) then ``key``, ``status``, ``error_message``, ``width``, ``height``,
  ``original_width``, ``original_height`` (written when pyarrow is importable; not for ``pipe:``);
- ``{name}_stats.json``: ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``,
  ``duration``, ``start_time``, ``end_time``, ``status_dict`` (:func:`stats_record`; the curation
  runner writes it as its per-shard done-marker, see :mod:`clipforge.curation.runner`).

Local and ``file://`` targets are written to a temporary sibling renamed into place only when
the shard is complete, so a killed run never leaves a truncated shard that a later step or
the training loader would read; fsspec targets are discarded on error.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from contextlib import ExitStack
from functools import lru_cache
from typing import Any

from ..data.remote import create_stream, scheme, write_small
from ..data.shards import IMAGE_EXTS, shard_base

logger = logging.getLogger("clipforge.curation")

#: Columns img2dataset's downloader appends after the input columns (``downloader.py``).
I2D_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height")
_INT_COLUMNS = ("width", "height", "original_width", "original_height")


def member_order(files: dict[str, bytes | None]) -> list[str]:
    """Extensions sorted by name, as webdataset's ``TarWriter`` (img2dataset's writer) orders them."""
    return sorted(e for e, b in files.items() if b is not None)


def side_files(shard: str | os.PathLike) -> list[str]:
    """The img2dataset side files of a ``.tar`` shard: ``.parquet`` and ``_stats.json``."""
    base = shard_base(os.fspath(shard))
    return [base + ".parquet", base + "_stats.json"]


def stats_record(*, count: int, successes: int, start_time: float, end_time: float,
                 status_dict: dict[str, int], failed_to_download: int = 0, failed_to_resize: int = 0) -> dict[str, Any]:
    """The fields of img2dataset's ``{shard}_stats.json`` (``logger.write_stats``)."""
    return {"count": int(count), "successes": int(successes), "failed_to_download": int(failed_to_download),
            "failed_to_resize": int(failed_to_resize), "duration": end_time - start_time,
            "start_time": start_time, "end_time": end_time, "status_dict": dict(status_dict)}


@lru_cache(maxsize=1)
def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        logger.warning("pyarrow is not installed: shards are written without img2dataset's .parquet "
                       "side file (pip install pyarrow)")
        return None
    return pa, pq


class ShardWriter:
    """Context manager writing samples to one tar shard (+ its ``.parquet``); creates nothing
    when no sample was written.

    Members get mtime 0 and uid/gid 0, so re-running a step produces byte-identical shards.
    ``write_stats`` (default off: the curation runner writes the stats file itself) also writes
    ``{name}_stats.json`` on a clean exit.
    """

    def __init__(self, path: str | os.PathLike, *, parquet: bool = True, write_stats: bool = False) -> None:
        self.path = os.fspath(path)
        if not self.path.lower().endswith(".tar") and scheme(self.path) != "pipe":
            raise ValueError(f"{self.path}: a shard name must end in .tar")
        self.count = 0
        self.parquet = parquet and scheme(self.path) != "pipe"
        self.write_stats = write_stats and scheme(self.path) != "pipe"
        self.rows: list[dict[str, Any]] = []
        self._stack: ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._start = time.time()

    def __enter__(self) -> "ShardWriter":
        return self

    def _open(self) -> None:
        self._stack = ExitStack()
        f = self._stack.enter_context(create_stream(self.path))
        # stream mode: no tell()/seek(), so pipes and object stores work too
        self._tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT)

    def write(self, key: str, files: dict[str, bytes | None], meta: dict[str, Any] | None = None) -> None:
        """Add one sample. Its parquet row comes from ``meta``, else its ``json`` member."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext in member_order(files):
            data = files[ext]
            assert data is not None
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.parquet or self.write_stats:
            self.rows.append(parquet_row(key, files, meta))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._stack is None:
            return
        try:
            if exc_type is None and self._tar is not None:
                self._tar.close()
            elif self._tar is not None and isinstance(self._tar.fileobj, tarfile._Stream):
                self._tar.fileobj.closed = True  # the target is discarded: do not flush the buffered tail later
        finally:
            self._stack.__exit__(exc_type, exc, tb)  # renames on success, deletes the temp file on error
        if exc_type is not None:
            return
        parquet, stats = side_files(self.path)
        if self.parquet:
            write_parquet(parquet, self.rows)
        if self.write_stats:
            status = {"success": self.count}
            record = stats_record(count=self.count, successes=self.count, start_time=self._start,
                                  end_time=time.time(), status_dict=status)
            write_small(stats, json.dumps(record, indent=4).encode("utf-8"))


def parquet_row(key: str, files: dict[str, bytes | None], meta: dict[str, Any] | None) -> dict[str, Any]:
    """img2dataset's parquet row of a written sample: ``meta`` (or the ``json`` member), with
    ``key`` / ``status`` / sizes filled in when the metadata lacks them."""
    if meta is None:
        meta = {}
        raw = files.get("json")
        if raw:
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                meta = obj
    row = dict(meta)
    row["key"] = key
    row.setdefault("status", "success")
    row.setdefault("error_message", None)
    if "caption" not in row and files.get("txt") is not None:
        row["caption"] = files["txt"].decode("utf-8", errors="replace")  # type: ignore[union-attr]
    if row.get("width") is None or row.get("height") is None:
        size = _image_size(files)
        if size is not None:
            row["width"], row["height"] = size
    row.setdefault("original_width", row.get("width"))
    row.setdefault("original_height", row.get("height"))
    return row


def _image_size(files: dict[str, bytes | None]) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    data = next((files[e] for e in IMAGE_EXTS if files.get(e) is not None), None)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def write_parquet(name: str, rows: list[dict[str, Any]]) -> bool:
    """Write img2dataset's per-shard parquet (column order: input columns, then
    :data:`I2D_COLUMNS`). Returns False (nothing written) without pyarrow or rows."""
    mods = _pyarrow()
    if mods is None or not rows:
        return False
    pa, pq = mods
    extra: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in I2D_COLUMNS:
                extra.setdefault(k)
    front = [c for c in ("url", "caption") if c in extra]
    names = front + [c for c in extra if c not in front] + list(I2D_COLUMNS)
    arrays, fields = [], []
    for c in names:
        values = [r.get(c) for r in rows]
        if c in _INT_COLUMNS:
            typ: Any = pa.int32()
            values = [None if v is None else int(v) for v in values]
        elif c in I2D_COLUMNS or c in ("url", "caption"):
            typ = pa.string()
            values = [None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                      for v in values]
        else:
            typ = None
        try:
            arr = pa.array(values, type=typ)
        except (pa.ArrowException, TypeError, ValueError):  # mixed types: keep them as JSON text
            arr = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                           type=pa.string())
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        arrays.append(arr)
        fields.append(pa.field(c, arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_small(name, buf.getvalue())
    return True
