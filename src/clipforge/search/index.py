"""FAISS indexes over embedding collections: planning, building, tuning, incremental add, loading.

Small collections get an exact inner-product index (``IndexFlatIP``). Above ``exact_threshold``
vectors (or when the exact index would not fit ``max_memory``) the index is IVF with an HNSW
coarse quantiser and compressed codes: ``SQ8`` when it fits the memory budget, otherwise the
finest ``PQ{m}x8`` that does. ``nlist`` follows the collection size (~4*sqrt(n)); training uses
a random sample. ``nprobe`` is then tuned on held-out queries (collection vectors, whose own id
is excluded from both result lists) to the smallest value reaching the target recall@10 against
exact search. The index directory holds ``index.faiss`` + ``metadata.parquet`` (row = id) +
``index.json`` (parameters, measured recall, memory, the shards it contains); ``index.json`` is
written last, so a directory with one is complete.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..utils import atomic_write_bytes, read_json, write_json
from .store import Collection, ShardPaths, load_embeddings, load_metadata

INDEX_FORMAT = "clipforge-index/1"
INDEX_FILE = "index.faiss"
META_FILE = "metadata.parquet"
INFO_FILE = "index.json"
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
               exact_threshold: int = 100_000) -> IndexPlan:
    """Pick the index type and parameters for ``n`` vectors of ``dim`` within ``max_memory`` bytes."""
    if n < 1:
        raise ValueError("cannot index an empty collection (no embeddings found)")
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
        return ShardPaths(Path(self.dir), kind, int(self.name))

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


def tune_nprobe(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                target: float, nlist: int) -> tuple[int, float, list[dict[str, float]]]:
    """Smallest nprobe reaching ``target`` recall@10 (doubling, then bisection); if no nprobe
    does, the one with the best recall. Returns (nprobe, recall, table of tried settings)."""
    table: dict[int, dict[str, float]] = {}

    def measure(p: int) -> float:
        if p not in table:
            set_search_params(index, p)
            t = time.perf_counter()
            _, ids = index.search(queries, RECALL_K + 1)
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


def _metadata_table(refs: list[ShardRef], kind: str) -> pa.Table:
    tables = []
    for ref in refs:
        t = load_metadata(ref.paths(kind).metadata)
        if t.num_rows != ref.count:
            raise ValueError(f"{ref.paths(kind).metadata}: {t.num_rows} rows but {ref.count} embeddings")
        t = t.append_column("id", pa.array(np.arange(ref.first_id, ref.first_id + ref.count), pa.int64()))
        t = t.append_column("shard", pa.array([f"{Path(ref.dir).name}/{ref.name}"] * ref.count, pa.string()))
        tables.append(t)
    return pa.concat_tables(tables) if tables else pa.table({})


def _write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _exact_topk(refs: list[ShardRef], kind: str, dim: int, queries: np.ndarray, query_ids: np.ndarray,
                k: int, progress: bool) -> np.ndarray:
    """Exact top-k ids (own id excluded) of ``queries`` over all shards, streaming one shard at a time."""
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True)
    for ref in tqdm(refs, desc="exact top-10", unit="shard", disable=not progress or len(refs) < 2):
        if ref.count == 0:  # every item of that shard was unreadable
            continue
        xb = _shard_vectors(ref, kind, dim)
        D, I = faiss.knn(queries, xb, min(k + 1, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        if I.shape[1] < k + 1:  # pad tiny shards
            pad = k + 1 - I.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(D.astype(np.float32), np.where(I >= 0, I + ref.first_id, -1).astype(np.int64))
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


def build_index(embeddings: str | Path, out_dir: str | Path, *, max_memory: int | str | None = None,
                exact_threshold: int = 100_000, target_recall: float = 0.95, n_queries: int = 1000,
                train_size: int | None = None, seed: int = 0, progress: bool = True) -> BuildReport:
    """Build an index of every finished shard in ``embeddings`` into ``out_dir`` (replacing it)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    t0 = time.time()
    coll = Collection.open(embeddings)
    kind, dim = coll.kind, coll.dim
    refs = _collection_refs(coll)
    n = sum(r.count for r in refs)
    plan = plan_index(n, dim, max_memory=parse_memory(max_memory), exact_threshold=exact_threshold)
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if not coll.manifest.get("complete", False):
        notes.append(f"embedding collection {coll.root} is not complete "
                     f"({len(refs)} of {coll.manifest.get('num_shards')} shards finished)")
    nq = min(n_queries, max(1, n // 10))
    query_ids = _sample_ids(n, nq, rng)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivf":
        assert plan.nlist is not None
        ntrain = train_size or min(n - nq, max(40 * plan.nlist, 20_000))
        train_ids = _sample_ids(n, ntrain, rng, exclude=query_ids)
        xt = _rows(refs, kind, train_ids)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 15  # k-means converges well before faiss's 25 on embedding data
        if progress:
            print(f"training {plan.factory} on {len(xt)} vectors", flush=True)
        index.train(xt)
        del xt
    for ref in tqdm(refs, desc="add to index", unit="shard", disable=not progress):
        index.add(_shard_vectors(ref, kind, dim))
    nprobe, recall, table, nq = _measure_and_tune(index, refs, kind, dim, n, plan.nlist, target_recall, nq, rng,
                                                  progress, query_ids=query_ids)
    if plan.kind == "ivf" and recall < target_recall:
        notes.append(f"target recall@10 {target_recall} not reached with {plan.codes} codes "
                     f"(best {recall:.3f} at nprobe={nprobe}); allow more memory for finer codes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)  # directory is incomplete until index.json is back
    nbytes = _write_index_file(index, out / INDEX_FILE)
    _write_parquet(_metadata_table(refs, kind), out / META_FILE)
    info = {
        "format": INDEX_FORMAT, "kind": kind, "type": plan.kind, "factory": plan.factory,
        "metric": "inner_product", "dim": dim, "ntotal": int(index.ntotal),
        "params": {"nlist": plan.nlist, "codes": plan.codes, "nprobe": nprobe,
                   "efSearch": (max(64, 2 * nprobe) if nprobe else None)},
        "exact_threshold": exact_threshold, "max_memory": parse_memory(max_memory),
        "target_recall": target_recall, "recall_at_10": recall, "recall_queries": nq,
        "tuning": table, "index_bytes": nbytes, "estimated_bytes": plan.est_bytes,
        "build_seconds": round(time.time() - t0, 3), "plan_reason": plan.reason,
        "model": coll.manifest.get("model"), "sources": [r.to_dict() for r in refs], "notes": notes,
    }
    write_json(out / INFO_FILE, info)
    return BuildReport(str(out), plan.to_dict(), int(index.ntotal), int(index.ntotal), recall, nprobe, nbytes,
                       time.time() - t0, table, notes)


def add_to_index(embeddings: str | Path, index_dir: str | Path, *, target_recall: float | None = None,
                 n_queries: int = 1000, seed: int = 0, progress: bool = True) -> BuildReport:
    """Add the finished shards of ``embeddings`` that the index does not hold yet; re-measure
    recall (and re-tune nprobe) over the grown collection."""
    t0 = time.time()
    out = Path(index_dir)
    info = read_index_info(out)
    coll = Collection.open(embeddings)
    if coll.kind != info["kind"] or coll.dim != info["dim"]:
        raise ValueError(f"{coll.root} holds {coll.kind} embeddings of dim {coll.dim}, the index at {out} "
                         f"{info['kind']} embeddings of dim {info['dim']}")
    old_hash = (info.get("model") or {}).get("weights_sha256")
    new_hash = (coll.manifest.get("model") or {}).get("weights_sha256")
    if old_hash and new_hash and old_hash != new_hash:
        raise ValueError(f"{coll.root} was embedded with different model weights than the index at {out} "
                         f"({new_hash[:12]} vs {old_hash[:12]}); rebuild the index instead")
    refs = [ShardRef(**r) for r in info["sources"]]
    have = {(r.dir, r.name) for r in refs}
    ntotal = int(info["ntotal"])
    new = _collection_refs(coll, first_id=ntotal, exclude=have)
    notes: list[str] = []
    if not new:
        return BuildReport(str(out), {"kind": info["type"], "factory": info["factory"]}, ntotal, 0,
                           info.get("recall_at_10"), info["params"].get("nprobe"), int(info["index_bytes"]),
                           time.time() - t0, info.get("tuning", []), ["no new shards: index unchanged"])
    index = faiss.read_index(str(out / INDEX_FILE))
    if index.ntotal != ntotal:
        raise ValueError(f"{out / INDEX_FILE} holds {index.ntotal} vectors but index.json says {ntotal}")
    for ref in tqdm(new, desc="add to index", unit="shard", disable=not progress):
        index.add(_shard_vectors(ref, info["kind"], info["dim"]))
    refs += new
    n = int(index.ntotal)
    target = target_recall if target_recall is not None else float(info.get("target_recall", 0.95))
    rng = np.random.default_rng(seed)
    nlist = info["params"].get("nlist")
    missing = [r for r in refs if not r.paths(info["kind"]).emb.is_file()]
    if missing:
        nprobe, recall, table = info["params"].get("nprobe"), None, []
        nq = 0
        notes.append(f"recall not re-measured: {len(missing)} source shards are gone (e.g. {missing[0].dir})")
        if nprobe:
            set_search_params(index, nprobe)
    else:
        nprobe, recall, table, nq = _measure_and_tune(index, refs, info["kind"], info["dim"], n, nlist, target,
                                                      min(n_queries, max(1, n // 10)), rng, progress)
    if info["type"] == "flat" and n > int(info.get("exact_threshold") or 0):
        notes.append(f"the exact index now holds {n} vectors (> threshold {info.get('exact_threshold')}); "
                     "rebuild without --add for an approximate one")
    old_meta = pq.read_table(out / META_FILE)
    (out / INFO_FILE).unlink(missing_ok=True)
    nbytes = _write_index_file(index, out / INDEX_FILE)
    new_meta = _metadata_table(new, info["kind"])
    _write_parquet(pa.concat_tables([old_meta, new_meta.cast(old_meta.schema)]), out / META_FILE)
    info.update({"ntotal": n, "sources": [r.to_dict() for r in refs], "index_bytes": nbytes,
                 "recall_at_10": recall, "recall_queries": nq, "target_recall": target, "tuning": table,
                 "notes": list(info.get("notes", [])) + notes})
    info["params"]["nprobe"] = nprobe
    info["params"]["efSearch"] = max(64, 2 * nprobe) if nprobe else None
    write_json(out / INFO_FILE, info)
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
    """An index ready to search: faiss index (search parameters applied), metadata, info."""

    index: faiss.Index
    metadata: pa.Table
    info: dict[str, Any]
    path: Path
    mmap: bool

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["dim"]:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.info['dim']}")
        return self.index.search(q, min(k, self.ntotal))

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (for compressed codes: decoded) vector of ``item_id``."""
        if not 0 <= item_id < self.ntotal:
            raise KeyError(f"unknown item id {item_id} (index holds ids 0..{self.ntotal - 1})")
        return self.index.reconstruct(int(item_id))

    def row(self, item_id: int) -> dict[str, Any]:
        if not 0 <= item_id < self.metadata.num_rows:
            raise KeyError(f"unknown item id {item_id} (index holds ids 0..{self.metadata.num_rows - 1})")
        return self.metadata.slice(item_id, 1).to_pylist()[0]

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        return self.metadata.take(pa.array(ids, pa.int64())).to_pylist()


MMAP_AUTO_BYTES = 1 << 30


def load_index(index_dir: str | Path, mmap: bool | None = None) -> LoadedIndex:
    """Load an index directory; ``mmap=None`` memory-maps index files over 1 GiB (codes stay on
    disk, paged in on demand) - read-only: :func:`add_to_index` loads its own writable copy."""
    d = Path(index_dir)
    info = read_index_info(d)
    path = d / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_AUTO_BYTES
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP_IFC if info["type"] == "flat" else faiss.IO_FLAG_MMAP
    index = faiss.read_index(str(path), flags)
    if index.ntotal != info["ntotal"]:
        raise ValueError(f"{path} holds {index.ntotal} vectors but {INFO_FILE} says {info['ntotal']}")
    if info["type"] == "ivf":
        set_search_params(index, info["params"]["nprobe"], info["params"].get("efSearch"))
        faiss.extract_index_ivf(index).make_direct_map()  # for reconstruct (search by result)
    meta = pq.read_table(d / META_FILE, memory_map=True)
    if meta.num_rows != index.ntotal:
        raise ValueError(f"{d / META_FILE} has {meta.num_rows} rows but the index holds {index.ntotal} vectors")
    return LoadedIndex(index, meta, info, d, bool(mmap))
