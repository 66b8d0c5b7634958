"""FAISS indexes over embedding collections: planning, building, tuning, incremental add, loading.

Small collections get an exact inner-product index (``IndexFlatIP``). Above ``exact_threshold``
vectors (or when the exact index would not fit ``max_memory``) the index is IVF with an HNSW
coarse quantiser and compressed codes: ``SQ8`` when it fits the memory budget, otherwise the
finest ``PQ{m}x8`` that does. ``nlist`` follows the collection size (~4*sqrt(n)); training uses
a random sample. ``nprobe`` is then tuned on held-out queries (collection vectors, whose own id
is excluded from both result lists) to the smallest value reaching the target recall@10 against
exact search.

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
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..embeddings import (
    Collection,
    ShardPaths,
    load_embeddings,
    load_metadata,
    normalize_metadata,
)
from ..utils import atomic_write_bytes, read_json, write_json

if TYPE_CHECKING:
    from .backend import SearchBackend

INDEX_FORMAT = "clipforge-index/1"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"           # --on-disk: the inverted lists, memory-mapped at search time
META_FILE = "metadata.parquet"          # pre-generation layout (read, migrated on the next write)
INFO_FILE = "index.json"
LOCK_FILE = ".lock"
META_DIR = "metadata"
RECALL_K = 10
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str | int | None) -> int | None:
    """``'4G'``, ``'512M'``, ``'1.5GB'``, ``'800000000'`` -> bytes (binary units)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"cannot parse memory size {text!r}: use e.g. 512M, 4G, 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- planning ---------------------------------------------------------------------------------


@dataclass
class IndexPlan:
    """What to build: ``kind`` 'flat' or 'ivf', the faiss factory string and its memory estimate."""

    kind: str
    factory: str
    dim: int
    n: int
    nlist: int | None = None
    codes: str | None = None
    est_bytes: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def choose_nlist(n: int) -> int:
    """~4*sqrt(n) inverted lists (a power of two), capped so each list trains on >= 39 points."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    nlist = min(nlist, 65536, max(1, n // 39))
    return max(1, 2 ** int(math.log2(nlist)))


def code_options(dim: int) -> list[tuple[str, int]]:
    """Compressed code types from finest to coarsest with their bytes per vector."""
    opts = [("SQ8", dim)]
    for div in (4, 8, 16, 32):
        m = dim // div
        if m >= 4 and dim % m == 0:
            opts.append((f"PQ{m}x8", m))
    return opts


def ivf_bytes(n: int, dim: int, nlist: int, code_bytes: int) -> int:
    """Estimate: codes + 64-bit ids + centroids + HNSW links of the coarse quantiser."""
    return n * (code_bytes + 8) + nlist * dim * 4 + nlist * 64 * 4 + 4096


def plan_index(n: int, dim: int, *, max_memory: int | None = None,
               exact_threshold: int = 100_000, on_disk: bool = False) -> IndexPlan:
    """Pick the index type and parameters for ``n`` vectors of ``dim`` within ``max_memory`` bytes.
    ``on_disk``: IVF whose codes stay on disk, so only centroids, HNSW links and the id map count."""
    if n < 1:
        raise ValueError("cannot index an empty collection (no embeddings found)")
    if on_disk:
        nlist = choose_nlist(n)
        codes, code_bytes = code_options(dim)[0]  # SQ8: disk is cheap, the finest codes
        # centroids + HNSW links + id map, and k-means' distance block (faiss: 4096 x 1024 floats at most)
        ram = nlist * dim * 4 + nlist * 64 * 4 + n * 8 + 4096 * min(nlist, 1024) * 4
        if max_memory is not None and ram > max_memory:
            raise ValueError(f"{n} vectors of dim {dim}: even on disk, centroids and the id map need "
                             f"{human_bytes(ram)} of RAM, more than --max-memory {human_bytes(max_memory)}")
        return IndexPlan("ivf", f"IVF{nlist}_HNSW32,{codes}", dim, n, nlist=nlist, codes=codes, est_bytes=ram,
                         reason=f"--on-disk: {codes} inverted lists ({human_bytes(n * (code_bytes + 8))}) on disk, "
                                f"memory-mapped; centroids and id map ({human_bytes(ram)}) in RAM")
    flat = n * dim * 4
    if n <= exact_threshold and (max_memory is None or flat <= max_memory):
        return IndexPlan("flat", "Flat", dim, n, est_bytes=flat,
                         reason=f"{n} <= exact threshold {exact_threshold}: exact search")
    nlist = choose_nlist(n)
    tried = []
    for codes, code_bytes in code_options(dim):
        est = ivf_bytes(n, dim, nlist, code_bytes)
        tried.append(f"{codes}: {human_bytes(est)}")
        if max_memory is None or est <= max_memory:
            factory = f"IVF{nlist}_HNSW32,{codes}" + ("np" if codes.startswith("PQ") else "")
            why = (f"{n} > exact threshold {exact_threshold}" if n > exact_threshold
                   else f"exact index ({human_bytes(flat)}) exceeds --max-memory {human_bytes(max_memory or 0)}")
            return IndexPlan("ivf", factory, dim, n, nlist=nlist, codes=codes, est_bytes=est,
                             reason=f"{why}; {codes} codes fit the memory budget")
    raise ValueError(f"{n} vectors of dim {dim} do not fit in --max-memory {human_bytes(max_memory or 0)}: "
                     f"smallest option needs {tried[-1]} (tried {', '.join(tried)})")


# --- reading a collection in id order ------------------------------------------------------------


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


def _rows(refs: list[ShardRef], kind: str, ids: np.ndarray) -> np.ndarray:
    """Vectors with the given global ids (sorted), read from memory-mapped shards as float32."""
    out = np.empty((len(ids), 0), np.float32)
    parts: list[np.ndarray] = []
    for ref in refs:
        lo, hi = np.searchsorted(ids, [ref.first_id, ref.first_id + ref.count])
        if hi > lo:
            arr = load_embeddings(ref.paths(kind).emb)
            parts.append(np.asarray(arr[ids[lo:hi] - ref.first_id], dtype=np.float32))
    return np.concatenate(parts) if parts else out


def _shard_vectors(ref: ShardRef, kind: str, dim: int) -> np.ndarray:
    arr = load_embeddings(ref.paths(kind).emb, mmap=False)
    if arr.shape != (ref.count, dim):
        raise ValueError(f"{ref.paths(kind).emb}: shape {arr.shape}, expected ({ref.count}, {dim}) "
                         "(shard changed since it was embedded?)")
    return np.ascontiguousarray(arr, dtype=np.float32)


# --- recall measurement and tuning -------------------------------------------------------------


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Per row, remove the query's own id (or the last column when absent), keep ``k``."""
    out = np.empty((ids.shape[0], k), dtype=ids.dtype)
    for i in range(ids.shape[0]):
        row = ids[i][ids[i] != self_ids[i]]
        out[i] = row[:k] if len(row) >= k else np.pad(row, (0, k - len(row)), constant_values=-1)
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (-1 = padding)."""
    hits = 0
    total = 0
    for a, e in zip(approx, exact):
        e_set = {int(x) for x in e if x >= 0}
        hits += len(e_set & {int(x) for x in a if x >= 0})
        total += len(e_set)
    return hits / max(total, 1)


def set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None = None) -> None:
    if nprobe is None:
        return
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = int(nprobe)
    q = faiss.downcast_index(ivf.quantizer)
    if isinstance(q, faiss.IndexHNSW):
        q.hnsw.efSearch = int(ef_search or max(64, 2 * nprobe))


def tune_nprobe(index: faiss.Index | None, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                target: float, nlist: int, search: Callable[[np.ndarray, int, int], np.ndarray] | None = None
                ) -> tuple[int, float, list[dict[str, float]]]:
    """Smallest nprobe reaching ``target`` recall@10 (doubling, then bisection); if no nprobe
    does, the one with the best recall. Returns (nprobe, recall, table of tried settings).
    ``search(queries, k, nprobe) -> ids`` runs another backend (Milvus) instead of ``index``."""
    table: dict[int, dict[str, float]] = {}

    def faiss_search(q: np.ndarray, k: int, p: int) -> np.ndarray:
        assert index is not None
        set_search_params(index, p)
        return index.search(q, k)[1]

    run = search or faiss_search

    def measure(p: int) -> float:
        if p not in table:
            t = time.perf_counter()
            ids = run(queries, RECALL_K + 1, p)
            dt = time.perf_counter() - t
            r = recall_at_k(_drop_self(ids, query_ids, RECALL_K), truth)
            table[p] = {"nprobe": p, "recall_at_10": r, "ms_per_query_batched": 1000 * dt / len(queries)}
        return table[p]["recall_at_10"]

    p, prev = 1, 0
    while True:
        if measure(p) >= target or p >= nlist:
            break
        prev, p = p, min(2 * p, nlist)
    if table[p]["recall_at_10"] >= target:
        lo, hi = prev, p  # recall(lo) < target <= recall(hi)
        while hi - lo > 1 and hi - lo > hi // 8:  # ~12% resolution: enough, and few extra passes
            mid = (lo + hi) // 2
            if measure(mid) >= target:
                hi = mid
            else:
                lo = mid
        best = hi
    else:
        top = max(v["recall_at_10"] for v in table.values())
        best = min(k for k, v in table.items() if v["recall_at_10"] >= top - 0.002)
    if search is None:
        set_search_params(index, best)
    return best, table[best]["recall_at_10"], [table[k] for k in sorted(table)]


# --- building -----------------------------------------------------------------------------------


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


def _collection_refs(coll: Collection, first_id: int = 0, exclude: set[tuple[str, str]] | None = None
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


def _sample_ids(n: int, size: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    if exclude is not None and len(exclude):
        pool = np.setdiff1d(np.arange(n), exclude, assume_unique=True)
        return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


# --- the index directory: generations, commit, cleanup --------------------------------------------


def _files(info: dict[str, Any]) -> dict[str, Any]:
    """Live files of an index (relative to its directory); pre-generation indexes have fixed names."""
    return info.get("files") or {"faiss": INDEX_FILE, "metadata": [META_FILE], "generation": 0}


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
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
            f = _files(read_json(out / INFO_FILE))
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


def _next_generation(out: Path, extra: int = 0) -> int:
    """A generation number no file in ``out`` uses yet (live or stray), above ``extra``."""
    used = [0, extra]
    if (out / INFO_FILE).is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            used.append(int(_files(read_json(out / INFO_FILE)).get("generation", 0)))
    used += [int(p.name[1:]) for p in out.glob("g[0-9]*") if re.fullmatch(r"g\d{6}", p.name)]
    used += [int(m.group(1)) for p in out.glob(f"{META_DIR}/part-*.parquet")
             if (m := re.fullmatch(r"part-(\d{6})\.parquet", p.name))]
    return max(used) + 1


def _write_index_file(index: faiss.Index, path: Path) -> int:
    """faiss writes by file name: write to a temporary sibling, fsync, rename (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def _shard_metadata(ref: ShardRef, kind: str) -> pa.Table:
    t = load_metadata(ref.paths(kind).metadata, ref.name)
    if t.num_rows != ref.count:
        raise ValueError(f"{ref.paths(kind).metadata}: {t.num_rows} rows but {ref.count} embeddings")
    t = t.append_column("id", pa.array(np.arange(ref.first_id, ref.first_id + ref.count), pa.int64()))
    return t.append_column("shard", pa.array([f"{Path(ref.dir).name}/{ref.name}"] * ref.count, pa.string()))


def _metadata_table(refs: list[ShardRef], kind: str) -> pa.Table:
    tables = [_shard_metadata(ref, kind) for ref in refs]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def _write_metadata_streaming(refs: list[ShardRef], kind: str, path: Path) -> None:
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


def _write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


_EXACT_CHUNK = 8192


def _exact_topk(refs: list[ShardRef], kind: str, dim: int, queries: np.ndarray, query_ids: np.ndarray,
                k: int, progress: bool) -> np.ndarray:
    """Exact top-k ids (own id excluded) of ``queries`` over all shards, streaming one shard at a time."""
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True)
    for ref in tqdm(refs, desc="exact top-10", unit="shard", disable=not progress or len(refs) < 2):
        if ref.count == 0:  # every item of that shard was unreadable
            continue
        arr = load_embeddings(ref.paths(kind).emb)
        if arr.shape != (ref.count, dim):
            raise ValueError(f"{ref.paths(kind).emb}: shape {arr.shape}, expected ({ref.count}, {dim}) "
                             "(shard changed since it was embedded?)")
        for lo in range(0, ref.count, _EXACT_CHUNK):  # bounded memory whatever the shard size
            xb = np.ascontiguousarray(arr[lo:lo + _EXACT_CHUNK], dtype=np.float32)
            D, I = faiss.knn(queries, xb, min(k + 1, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
            if I.shape[1] < k + 1:  # pad tiny shards
                pad = k + 1 - I.shape[1]
                D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
                I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
            heap.add_result(D.astype(np.float32), np.where(I >= 0, I + ref.first_id + lo, -1).astype(np.int64))
            del xb
    heap.finalize()
    return _drop_self(heap.I, query_ids, k)


def _measure_and_tune(index: faiss.Index, refs: list[ShardRef], kind: str, dim: int, n: int, nlist: int | None,
                      target: float, n_queries: int, rng: np.random.Generator, progress: bool,
                      query_ids: np.ndarray | None = None) -> tuple[int | None, float, list[dict[str, float]], int]:
    if query_ids is None:
        query_ids = _sample_ids(n, n_queries, rng)
    queries = _rows(refs, kind, query_ids)
    truth = _exact_topk(refs, kind, dim, queries, query_ids, RECALL_K, progress)
    if nlist is None:  # exact index: measure anyway (it is the ground truth, so 1.0 up to ties)
        _, ids = index.search(queries, RECALL_K + 1)
        return None, recall_at_k(_drop_self(ids, query_ids, RECALL_K), truth), [], len(query_ids)
    nprobe, recall, table = tune_nprobe(index, queries, query_ids, truth, target, nlist)
    return nprobe, recall, table, len(query_ids)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists print progress with printf to stdout, which would corrupt ``--json``
    output: point file descriptor 1 at stderr meanwhile."""
    import sys

    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)  # C's stdout is block-buffered on a pipe: empty it while it still points at stderr
        os.dup2(saved, 1)
        os.close(saved)


def _block_rows(budget: int | None, plan: IndexPlan) -> int:
    """Vectors per in-RAM block of an on-disk build: a quarter of what the budget leaves (float32
    input + codes + ids), at least 1,000; 250,000 without a budget."""
    per_row = plan.dim * 4 + plan.dim + 8
    if budget is None:
        return 250_000
    return max(1_000, (budget - plan.est_bytes) // 4 // per_row)


def _fill_on_disk(trained: faiss.Index, refs: list[ShardRef], kind: str, dim: int, ivfdata: Path,
                  block_rows: int, progress: bool) -> faiss.Index:
    """Add the collection to ``trained`` with its inverted lists in ``ivfdata`` (faiss
    ``OnDiskInvertedLists``: a file mapped shared, so codes go to the page cache and disk, not to
    process memory), ``block_rows`` vectors at a time read from the memory-mapped shards. Lists
    grow by doubling while filled, so they are then merged into a compact file (as faiss's
    ``merge_ondisk`` does) and the filling file is deleted."""
    ivfdata.parent.mkdir(parents=True, exist_ok=True)
    filling = ivfdata.with_name(ivfdata.name + ".fill.tmp")
    index = trained
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(filling))
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns it now
    with _stdout_to_stderr(), tqdm(total=sum(r.count for r in refs), desc="add to on-disk index", unit="vec",
                                   disable=not progress) as bar:
        for ref in refs:
            arr = load_embeddings(ref.paths(kind).emb)  # memory-mapped: one block in RAM at a time
            if arr.shape != (ref.count, dim):
                raise ValueError(f"{ref.paths(kind).emb}: shape {arr.shape}, expected ({ref.count}, {dim})")
            for lo in range(0, ref.count, block_rows):
                hi = min(ref.count, lo + block_rows)
                x = np.ascontiguousarray(arr[lo:hi], dtype=np.float32)
                index.add_with_ids(x, np.arange(ref.first_id + lo, ref.first_id + hi, dtype=np.int64))
                bar.update(hi - lo)
                del x
        compact = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
        sources = faiss.InvertedListsPtrVector()
        sources.push_back(ivf.invlists)
        compact.merge_from_multiple(sources.data(), 1, False)
        ivf.replace_invlists(compact, True)  # frees (unmaps) the filling lists
        compact.this.disown()
    filling.unlink()
    return index


def build_index(embeddings: str | Path, out_dir: str | Path, *, max_memory: int | str | None = None,
                exact_threshold: int = 100_000, target_recall: float = 0.95, n_queries: int = 1000,
                train_size: int | None = None, seed: int = 0, progress: bool = True,
                kind: str | None = None, on_disk: bool = False) -> BuildReport:
    """Build an index of every finished shard in ``embeddings`` into ``out_dir``, replacing what
    it holds only once the new index is complete (``kind``: image/text, for folders holding both).
    ``on_disk``: IVF with inverted lists in a file beside the index, memory-mapped when searched,
    built in blocks sized to ``max_memory`` (a collection larger than RAM stays searchable)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    t0 = time.time()
    coll = Collection.open(embeddings, kind)
    kind, dim = coll.kind, coll.dim
    refs = _collection_refs(coll)
    n = sum(r.count for r in refs)
    budget = parse_memory(max_memory)
    plan = plan_index(n, dim, max_memory=budget, exact_threshold=exact_threshold, on_disk=on_disk)
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    notes.extend(coll.manifest.get("notes", []) if coll.foreign else [])
    if not coll.manifest.get("complete", False):
        notes.append(f"embedding collection {coll.root} is not complete "
                     f"({len(refs)} of {coll.manifest.get('num_shards')} shards finished)")
    nq = min(n_queries, max(1, n // 10))
    query_ids = _sample_ids(n, nq, rng)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivf":
        assert plan.nlist is not None
        ntrain = train_size or min(n - nq, max(40 * plan.nlist, 20_000))
        if on_disk and budget is not None and train_size is None:  # the sample is the largest array built
            ntrain = min(ntrain, max(4 * plan.nlist, (budget - plan.est_bytes) // (4 * dim * 4)))
        train_ids = _sample_ids(n, ntrain, rng, exclude=query_ids)
        xt = _rows(refs, kind, train_ids)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 15  # k-means converges well before faiss's 25 on embedding data
        if progress:
            print(f"training {plan.factory} on {len(xt)} vectors", flush=True)
        index.train(xt)
        del xt
    if not on_disk:
        for ref in tqdm(refs, desc="add to index", unit="shard", disable=not progress):
            index.add(_shard_vectors(ref, kind, dim))
        nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, plan.nlist, target_recall, nq,
                                                      rng, progress, query_ids=query_ids)
    out = Path(out_dir)
    with _writer_lock(out):
        strays = remove_strays(out)
        if strays:
            notes.append(f"removed {len(strays)} leftover file(s) of an interrupted run (e.g. {strays[0]})")
        old = read_json(out / INFO_FILE) if (out / INFO_FILE).is_file() else {}
        if old.get("backend") == "milvus":
            notes.append(f"replaces a Milvus-backed index: collection {old.get('collection')} at {old.get('uri')} "
                         "is left in place")
        gen = _next_generation(out)
        faiss_rel, meta_rel = f"g{gen:06d}/{INDEX_FILE}", f"{META_DIR}/part-{gen:06d}.parquet"
        ivf_rel = None
        if on_disk:
            ivf_rel = f"g{gen:06d}/{IVFDATA_FILE}"
            index = _fill_on_disk(index, refs, kind, dim, out / ivf_rel, _block_rows(budget, plan), progress)
            nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, plan.nlist, target_recall, nq,
                                                          rng, progress, query_ids=query_ids)
        if plan.kind == "ivf" and recall < target_recall:
            notes.append(f"target recall@10 {target_recall} not reached with {plan.codes} codes "
                         f"(best {recall:.3f} at nprobe={nprobe}); allow more memory for finer codes")
        nbytes = _write_index_file(index, out / faiss_rel) + ((out / ivf_rel).stat().st_size if ivf_rel else 0)
        if on_disk:
            _write_metadata_streaming(refs, kind, out / meta_rel)
        else:
            _write_parquet(_metadata_table(refs, kind), out / meta_rel)
        info = {
            "format": INDEX_FORMAT, "kind": kind, "type": plan.kind, "factory": plan.factory,
            "metric": "inner_product", "dim": dim, "ntotal": int(index.ntotal),
            "params": {"nlist": plan.nlist, "codes": plan.codes, "nprobe": nprobe,
                       "efSearch": (max(64, 2 * nprobe) if nprobe else None), "on_disk": on_disk},
            "exact_threshold": exact_threshold, "max_memory": parse_memory(max_memory),
            "target_recall": target_recall, "recall_at_10": recall, "recall_queries": nq,
            "tuning": table, "index_bytes": nbytes, "estimated_bytes": plan.est_bytes,
            "build_seconds": round(time.time() - t0, 3), "plan_reason": plan.reason,
            "model": coll.manifest.get("model"), "embeddings_format": coll.manifest.get("format"),
            "sources": [r.to_dict() for r in refs], "notes": notes,
            "files": {"generation": gen, "faiss": faiss_rel, "metadata": [meta_rel], "ivfdata": ivf_rel},
            "deleted": [], "count": int(index.ntotal),
        }
        write_json(out / INFO_FILE, info)  # the commit: one atomic rename
        remove_strays(out)  # the superseded generation
    return BuildReport(str(out), plan.to_dict(), int(index.ntotal), int(index.ntotal), recall, nprobe, nbytes,
                       time.time() - t0, table, notes)


def add_to_index(embeddings: str | Path, index_dir: str | Path, *, target_recall: float | None = None,
                 n_queries: int = 1000, seed: int = 0, progress: bool = True) -> BuildReport:
    """Add the finished shards of ``embeddings`` that the index does not hold yet; re-measure
    recall (and re-tune nprobe) over the grown collection. The grown index and a metadata part
    with the new rows are written beside the live ones and committed by renaming ``index.json``."""
    t0 = time.time()
    out = Path(index_dir)
    read_index_info(out)  # a clear error before anything is created or locked
    with _writer_lock(out):
        notes: list[str] = []
        strays = remove_strays(out)
        if strays:
            notes.append(f"removed {len(strays)} leftover file(s) of an interrupted run (e.g. {strays[0]})")
        info = read_index_info(out)
        kind, dim = info["kind"], info["dim"]
        coll = Collection.open(embeddings, kind)
        if coll.kind != kind or coll.dim != dim:
            raise ValueError(f"{coll.root} holds {coll.kind} embeddings of dim {coll.dim}, the index at {out} "
                             f"{kind} embeddings of dim {dim}")
        old_hash = (info.get("model") or {}).get("weights_sha256")
        new_hash = (coll.manifest.get("model") or {}).get("weights_sha256")
        if old_hash and new_hash and old_hash != new_hash:
            raise ValueError(f"{coll.root} was embedded with different model weights than the index at {out} "
                             f"({new_hash[:12]} vs {old_hash[:12]}); rebuild the index instead")
        refs = [ShardRef(**r) for r in info["sources"]]
        have = {(r.dir, r.name) for r in refs}
        ntotal = int(info["ntotal"])
        new = _collection_refs(coll, first_id=ntotal, exclude=have)
        if not new:
            return BuildReport(str(out), {"kind": info["type"], "factory": info["factory"]}, ntotal, 0,
                               info.get("recall_at_10"), info["params"].get("nprobe"), int(info["index_bytes"]),
                               time.time() - t0, info.get("tuning", []), notes + ["no new shards: index unchanged"])
        if info.get("backend") == "milvus":
            from .milvus import add_milvus  # milvus.py imports this module (cycle)

            target = target_recall if target_recall is not None else float(info.get("target_recall", 0.95))
            return add_milvus(out, info, refs, new, kind, dim, target=target, n_queries=n_queries, seed=seed,
                              progress=progress, notes=notes, t0=t0)
        if info["params"].get("on_disk"):
            raise ValueError(f"{out} is an on-disk FAISS index: --add is not supported for it; "
                             "rebuild it (without --add) over the grown collection")
        files = _files(info)
        index = faiss.read_index(str(out / files["faiss"]))
        if index.ntotal != ntotal:
            raise ValueError(f"{out / files['faiss']} holds {index.ntotal} vectors but index.json says {ntotal}")
        for ref in tqdm(new, desc="add to index", unit="shard", disable=not progress):
            index.add(_shard_vectors(ref, kind, dim))
        refs += new
        n = int(index.ntotal)
        target = target_recall if target_recall is not None else float(info.get("target_recall", 0.95))
        rng = np.random.default_rng(seed)
        nlist = info["params"].get("nlist")
        missing = [r for r in refs if not r.paths(kind).emb.is_file()]
        if missing:
            nprobe, recall, table = info["params"].get("nprobe"), None, []
            nq = 0
            notes.append(f"recall not re-measured: {len(missing)} source shards are gone (e.g. {missing[0].dir})")
            if nprobe:
                set_search_params(index, nprobe)
        else:
            nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, nlist, target,
                                                          min(n_queries, max(1, n // 10)), rng, progress)
        if info["type"] == "flat" and n > int(info.get("exact_threshold") or 0):
            notes.append(f"the exact index now holds {n} vectors (> threshold {info.get('exact_threshold')}); "
                         "rebuild without --add for an approximate one")
        gen = _next_generation(out)
        faiss_rel, meta_rel = f"g{gen:06d}/{INDEX_FILE}", f"{META_DIR}/part-{gen:06d}.parquet"
        nbytes = _write_index_file(index, out / faiss_rel)
        _write_parquet(_metadata_table(new, kind), out / meta_rel)
        info.update({"ntotal": n, "sources": [r.to_dict() for r in refs], "index_bytes": nbytes,
                     "count": n - len(info.get("deleted", [])),
                     "recall_at_10": recall, "recall_queries": nq, "target_recall": target, "tuning": table,
                     "notes": list(info.get("notes", [])) + notes,
                     "files": {"generation": gen, "faiss": faiss_rel, "metadata": list(files["metadata"]) + [meta_rel]}})
        info["params"]["nprobe"] = nprobe
        info["params"]["efSearch"] = max(64, 2 * nprobe) if nprobe else None
        write_json(out / INFO_FILE, info)  # the commit: one atomic rename
        remove_strays(out)
    return BuildReport(str(out), {"kind": info["type"], "factory": info["factory"]}, n, n - ntotal, recall,
                       nprobe, nbytes, time.time() - t0, table, notes)


# --- loading ------------------------------------------------------------------------------------


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


@dataclass
class LoadedIndex:
    """A FAISS index ready to search (a :class:`.backend.SearchBackend`): faiss index (search
    parameters applied), metadata, info. Deleted ids are skipped by an id selector at search time
    (their vectors stay in the file until the next build)."""

    index: faiss.Index
    metadata: pa.Table
    info: dict[str, Any]
    path: Path
    mmap: bool
    deleted: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self._params: Any = None
        if self.deleted:
            ids = np.array(sorted(self.deleted), dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            sel = faiss.IDSelectorNot(batch)
            if self.info["type"] == "ivf":
                p = self.info["params"]
                params = faiss.SearchParametersIVF(sel=sel, nprobe=int(p["nprobe"] or 1))
                q = faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer)
                if isinstance(q, faiss.IndexHNSW):
                    params.quantizer_params = qp = faiss.SearchParametersHNSW(
                        efSearch=int(p.get("efSearch") or max(64, 2 * int(p["nprobe"] or 1))))
                    self._keep_qp = qp
            else:
                params = faiss.SearchParameters(sel=sel)
            self._params, self._keep = params, (ids, batch, sel)  # the selector does not own what it points to

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def count(self) -> int:
        return self.ntotal - len(self.deleted)

    def has(self, item_id: int) -> bool:
        return 0 <= item_id < self.ntotal and item_id not in self.deleted

    def close(self) -> None:
        """Nothing to release (the Milvus backend has a connection)."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["dim"]:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.info['dim']}")
        if self._params is not None:
            return self.index.search(q, min(k, self.ntotal), params=self._params)
        return self.index.search(q, min(k, self.ntotal))

    def _check(self, item_id: int) -> None:
        if not self.has(item_id):
            raise KeyError(f"unknown item id {item_id} (index holds ids 0..{self.ntotal - 1}"
                           + (", some deleted)" if self.deleted else ")"))

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (for compressed codes: decoded) vector of ``item_id``."""
        self._check(item_id)
        return self.index.reconstruct(int(item_id))

    def row(self, item_id: int) -> dict[str, Any]:
        self._check(item_id)
        return self.metadata.slice(item_id, 1).to_pylist()[0]

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        return self.metadata.take(pa.array(ids, pa.int64())).to_pylist()


MMAP_AUTO_BYTES = 1 << 30


def _load_metadata_parts(d: Path, parts: list[str]) -> pa.Table:
    tables = []
    for rel in parts:
        try:
            tables.append(normalize_metadata(pq.read_table(d / rel, memory_map=True)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{d / rel} is missing (named in {d / INFO_FILE})") from None
    return pa.concat_tables(tables, promote_options="default")


def load_index(index_dir: str | Path, mmap: bool | None = None) -> "SearchBackend":
    """Load an index directory: FAISS (:class:`LoadedIndex`) or, when ``index.json`` says
    ``backend: milvus``, a connection to its collection (:class:`.milvus.MilvusIndex`; close it).
    ``mmap=None`` memory-maps FAISS files over 1 GiB (codes stay on disk, paged in on demand);
    on-disk indexes always read their inverted lists from disk - read-only: :func:`add_to_index`
    loads its own writable copy.
    A writer committing meanwhile may delete the generation just read: then read again."""
    for attempt in range(3):
        try:
            return _load_index(Path(index_dir), mmap)
        except FileNotFoundError:
            if attempt == 2 or not (Path(index_dir) / INFO_FILE).is_file():
                raise
    raise AssertionError("unreachable")


def _load_index(d: Path, mmap: bool | None) -> "SearchBackend":
    info = read_index_info(d)
    if info.get("backend") == "milvus":
        from .milvus import MilvusIndex  # milvus.py imports this module (cycle)

        return MilvusIndex(d, info)
    files = _files(info)
    path = d / files["faiss"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (named in {d / INFO_FILE})")
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_AUTO_BYTES
    flags = 0
    if info["params"].get("on_disk"):
        mmap, flags = True, faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists file beside it, memory-mapped
        if not (d / files["ivfdata"]).is_file():
            raise FileNotFoundError(f"{d / files['ivfdata']} is missing (named in {d / INFO_FILE})")
    elif mmap:
        flags = faiss.IO_FLAG_MMAP_IFC if info["type"] == "flat" else faiss.IO_FLAG_MMAP
    with _stdout_to_stderr() if flags == faiss.IO_FLAG_ONDISK_SAME_DIR else contextlib.nullcontext():
        index = faiss.read_index(str(path), flags)
    if index.ntotal != info["ntotal"]:
        raise ValueError(f"{path} holds {index.ntotal} vectors but {INFO_FILE} says {info['ntotal']}")
    if info["type"] == "ivf":
        set_search_params(index, info["params"]["nprobe"], info["params"].get("efSearch"))
        faiss.extract_index_ivf(index).make_direct_map()  # for reconstruct (search by result)
    meta = _load_metadata_parts(d, list(files["metadata"]))
    if meta.num_rows != index.ntotal:
        raise ValueError(f"{d}: metadata has {meta.num_rows} rows but the index holds {index.ntotal} vectors")
    return LoadedIndex(index, meta, info, d, bool(mmap), frozenset(int(i) for i in info.get("deleted", [])))


def delete_from_index(index_dir: str | Path, ids: Iterable[int]) -> dict[str, Any]:
    """Delete items by id. Milvus: the rows are deleted. FAISS: the ids are recorded in
    ``index.json`` and every search skips them (vectors and metadata stay in the files until
    the next build). Returns ``{"deleted": [...], "not_found": [...], "count": live items}``."""
    out = Path(index_dir)
    read_index_info(out)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise ValueError("no ids to delete")
    with _writer_lock(out):
        remove_strays(out)
        info = read_index_info(out)
        ntotal = int(info["ntotal"])
        bad = [i for i in ids if not 0 <= i < ntotal]
        if bad:
            raise ValueError(f"unknown item id(s) {bad[:5]}: the index at {out} holds ids 0..{ntotal - 1}")
        if info.get("backend") == "milvus":
            from .milvus import delete_milvus  # milvus.py imports this module (cycle)

            done, absent = delete_milvus(out, info, ids)
        else:
            prev = {int(i) for i in info.get("deleted", [])}
            done, absent = [i for i in ids if i not in prev], [i for i in ids if i in prev]
            info["deleted"] = sorted(prev | set(done))
            info["count"] = ntotal - len(info["deleted"])
            write_json(out / INFO_FILE, info)  # the commit: one atomic rename
    return {"deleted": done, "not_found": absent, "count": int(info["count"])}
