"""The index directory both backends (FAISS, Milvus) share: its files, the writer lock, generations
and the one commit point, and reading a collection's vectors and metadata in id order.

Index directory (crash-safe: ``index.json`` is the single commit point)::

    idx/index.json                      parameters, measured recall, the shards it holds, and
                                        ``files``: which generation folder and metadata parts are live
    idx/g000002/index.faiss             the live generation's faiss index
    idx/metadata/part-000001.parquet    metadata rows (row = id), one part per build / ``--add``
    idx/metadata/part-000002.parquet

A build writes a new generation folder (and a new metadata part) beside the live one, then
replaces ``index.json`` by one atomic rename; until then the old index answers unchanged. ``--add``
does the same with the grown index and a part holding only the new rows. Every run first removes
what an interrupted run left (``*.tmp``, generation folders and parts no ``index.json`` names), under
a lock so two writers never meet. Indexes written before generations (``index.faiss`` +
``metadata.parquet`` at the top) are read as they are; the next build replaces them, the next add
writes its index into a generation folder and keeps ``metadata.parquet`` as its first part.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..embeddings import (
    Collection,
    ShardPaths,
    load_embeddings,
    load_metadata,
    normalize_metadata,
)
from ..utils import atomic_write_bytes, read_json


INDEX_FORMAT = "clipforge-index/1"


INDEX_FILE = "index.faiss"


IVFDATA_FILE = "index.ivfdata"           # --on-disk: the inverted lists, memory-mapped at search time


META_FILE = "metadata.parquet"          # pre-generation layout (read, migrated on the next write)


INFO_FILE = "index.json"


LOCK_FILE = ".lock"


META_DIR = "metadata"


@dataclass
class ShardRef:
    """One embedding shard as part of an index: ids ``first_id .. first_id+count-1``."""

    dir: str
    name: str
    count: int
    first_id: int

    def paths(self, kind: str) -> ShardPaths:
        return ShardPaths(Path(self.dir), kind, int(self.name), self.name)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def vectors_at(refs: list[ShardRef], kind: str, ids: np.ndarray) -> np.ndarray:
    """Vectors with the given global ids (sorted), read from memory-mapped shards as float32."""
    out = np.empty((len(ids), 0), np.float32)
    parts: list[np.ndarray] = []
    for ref in refs:
        lo, hi = np.searchsorted(ids, [ref.first_id, ref.first_id + ref.count])
        if hi > lo:
            arr = load_embeddings(ref.paths(kind).emb)
            parts.append(np.asarray(arr[ids[lo:hi] - ref.first_id], dtype=np.float32))
    return np.concatenate(parts) if parts else out


def shard_vectors(ref: ShardRef, kind: str, dim: int) -> np.ndarray:
    arr = load_embeddings(ref.paths(kind).emb, mmap=False)
    if arr.shape != (ref.count, dim):
        raise ValueError(f"{ref.paths(kind).emb}: shape {arr.shape}, expected ({ref.count}, {dim}) "
                         "(shard changed since it was embedded?)")
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass
class BuildReport:
    out_dir: str
    plan: dict[str, Any]
    ntotal: int
    added: int
    recall_at_10: float | None
    nprobe: int | None
    index_bytes: int
    seconds: float
    tuning: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def collection_refs(coll: Collection, first_id: int = 0, exclude: set[tuple[str, str]] | None = None
                     ) -> list[ShardRef]:
    refs = []
    root = str(coll.root.resolve())
    nid = first_id
    for sp in coll.finished_shards():
        if exclude and (root, sp.name) in exclude:
            continue
        count = int(load_embeddings(sp.emb).shape[0])
        refs.append(ShardRef(root, sp.name, count, nid))
        nid += count
    return refs


def sample_ids(n: int, size: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    if exclude is not None and len(exclude):
        pool = np.setdiff1d(np.arange(n), exclude, assume_unique=True)
        return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def live_files(info: dict[str, Any]) -> dict[str, Any]:
    """Live files of an index (relative to its directory); pre-generation indexes have fixed names."""
    return info.get("files") or {"faiss": INDEX_FILE, "metadata": [META_FILE], "generation": 0}


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """One writer per index directory (readers never lock: they only follow ``index.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{out} is being written by another `clipforge index` run "
                               f"(lock held on {out / LOCK_FILE})") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_strays(out: Path) -> list[str]:
    """Delete what no committed ``index.json`` names: ``*.tmp`` files, generation folders and
    metadata parts of interrupted (or superseded) runs. Returns the removed paths (relative)."""
    if not out.is_dir():
        return []
    live: set[str] = {INFO_FILE, LOCK_FILE}
    if (out / INFO_FILE).is_file():
        try:
            f = live_files(read_json(out / INFO_FILE))
            live |= {x for x in (f["faiss"], f.get("ivfdata"), *f["metadata"]) if x}
        except (ValueError, KeyError, TypeError):
            return []  # not ours to clean: read_index_info will say what is wrong
    removed: list[str] = []
    for p in sorted(out.rglob("*.tmp")):
        if any(part.endswith(".db") for part in p.relative_to(out).parts[:-1]):
            continue  # inside a milvus-lite database: its own files, never ours to clean
        if p.is_file():
            p.unlink()
            removed.append(str(p.relative_to(out)))
    for p in sorted(out.iterdir()):
        rel = p.name
        if p.is_dir() and re.fullmatch(r"g\d{6}", rel) and not any(x.startswith(rel + "/") for x in live):
            shutil.rmtree(p)
            removed.append(rel + "/")
        elif p.is_file() and rel in (INDEX_FILE, META_FILE) and rel not in live:
            p.unlink()
            removed.append(rel)
    for p in sorted((out / META_DIR).glob("part-*.parquet")) if (out / META_DIR).is_dir() else []:
        rel = f"{META_DIR}/{p.name}"
        if rel not in live:
            p.unlink()
            removed.append(rel)
    return removed


def next_generation(out: Path, extra: int = 0) -> int:
    """A generation number no file in ``out`` uses yet (live or stray), above ``extra``."""
    used = [0, extra]
    if (out / INFO_FILE).is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            used.append(int(live_files(read_json(out / INFO_FILE)).get("generation", 0)))
    used += [int(p.name[1:]) for p in out.glob("g[0-9]*") if re.fullmatch(r"g\d{6}", p.name)]
    used += [int(m.group(1)) for p in out.glob(f"{META_DIR}/part-*.parquet")
             if (m := re.fullmatch(r"part-(\d{6})\.parquet", p.name))]
    return max(used) + 1


def _shard_metadata(ref: ShardRef, kind: str) -> pa.Table:
    t = load_metadata(ref.paths(kind).metadata, ref.name)
    if t.num_rows != ref.count:
        raise ValueError(f"{ref.paths(kind).metadata}: {t.num_rows} rows but {ref.count} embeddings")
    t = t.append_column("id", pa.array(np.arange(ref.first_id, ref.first_id + ref.count), pa.int64()))
    return t.append_column("shard", pa.array([f"{Path(ref.dir).name}/{ref.name}"] * ref.count, pa.string()))


def metadata_table(refs: list[ShardRef], kind: str) -> pa.Table:
    tables = [_shard_metadata(ref, kind) for ref in refs]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def write_metadata_streaming(refs: list[ShardRef], kind: str, path: Path) -> None:
    """The metadata part of ``refs`` written shard by shard (on-disk builds: the whole table of a
    collection larger than RAM is not built in memory), then renamed into place."""
    tables = (_shard_metadata(ref, kind) for ref in refs)
    schema = pa.unify_schemas([_shard_metadata(ref, kind).schema for ref in refs[:1]] +
                              [pq.read_schema(ref.paths(kind).metadata) for ref in refs[1:]] +
                              [pa.schema([("id", pa.int64()), ("shard", pa.string())])],
                              promote_options="permissive")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            for t in tables:
                cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
                        for f in schema]
                w.write_table(pa.Table.from_arrays(cols, schema=schema))
                del t, cols
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_index_info(index_dir: str | Path) -> dict[str, Any]:
    d = Path(index_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"index directory not found: {d}")
    if not (d / INFO_FILE).is_file():
        raise FileNotFoundError(f"{d} has no {INFO_FILE}: not a (complete) index; run `clipforge index` first")
    info = read_json(d / INFO_FILE)
    if info.get("format") != INDEX_FORMAT:
        raise ValueError(f"{d / INFO_FILE}: format {info.get('format')!r}, expected {INDEX_FORMAT!r}")
    return info


def load_metadata_parts(d: Path, parts: list[str]) -> pa.Table:
    tables = []
    for rel in parts:
        try:
            tables.append(normalize_metadata(pq.read_table(d / rel, memory_map=True)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{d / rel} is missing (named in {d / INFO_FILE})") from None
    return pa.concat_tables(tables, promote_options="default")


__all__ = ["INDEX_FORMAT", "INDEX_FILE", "IVFDATA_FILE", "META_FILE", "INFO_FILE", "LOCK_FILE", "META_DIR", "ShardRef", "vectors_at", "shard_vectors", "BuildReport", "collection_refs", "sample_ids", "live_files", "writer_lock", "remove_strays", "next_generation", "metadata_table", "write_metadata_streaming", "write_parquet", "read_index_info", "load_metadata_parts"]
