"""Choosing an index for a collection and tuning it: the plan (exact, or IVF with compressed codes)
for a size and memory budget, and nprobe tuned to a target recall@10 against exact search.

Small collections get an exact inner-product index (``IndexFlatIP``). Above ``exact_threshold``
vectors (or when the exact index would not fit ``max_memory``) the index is IVF with an HNSW
coarse quantiser and compressed codes: ``SQ8`` when it fits the memory budget, otherwise the
finest ``PQ{m}x8`` that does. ``nlist`` follows the collection size (~4*sqrt(n)); training uses
a random sample. ``nprobe`` is then tuned on held-out queries (collection vectors, whose own id
is excluded from both result lists) to the smallest value reaching the target recall@10 against
exact search.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..embeddings import (
    load_embeddings,
)

from .store import ShardRef


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


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
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
            r = recall_at_k(drop_self(ids, query_ids, RECALL_K), truth)
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


_EXACT_CHUNK = 8192


def exact_topk(refs: list[ShardRef], kind: str, dim: int, queries: np.ndarray, query_ids: np.ndarray,
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
    return drop_self(heap.I, query_ids, k)


__all__ = ["RECALL_K", "parse_memory", "human_bytes", "IndexPlan", "choose_nlist", "code_options", "ivf_bytes", "plan_index", "drop_self", "recall_at_k", "set_search_params", "tune_nprobe", "exact_topk"]
