"""Similarity search for de-duplication: all pairs of rows with cosine >= threshold.

FAISS range search (``faiss-cpu``) when importable: an exact ``IndexFlatIP`` for pools up to
``flat_max`` rows, an ``IndexIVFFlat`` (inner product, ``nlist ~ 4 sqrt(n)``, ``nprobe``
probed lists; approximate: a pair in unprobed lists is missed) beyond. Without FAISS, an
exact blocked numpy matmul. Queries are processed in batches so memory stays bounded.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger("clipforge.curation")

_EPS = 1e-4  # FAISS range search keeps scores > radius: search a bit wider, then filter exactly


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def choose_index(n: int, index: str = "auto", flat_max: int = 30000) -> str:
    if index not in ("auto", "flat", "ivf", "numpy"):
        raise ValueError(f"index must be auto, flat, ivf or numpy, got {index!r}")
    if _faiss() is None:
        if index in ("flat", "ivf"):
            raise ValueError(f"--index {index} needs faiss-cpu (pip install faiss-cpu)")
        return "numpy"
    if index == "auto":
        return "flat" if n <= flat_max else "ivf"
    return index


def range_pairs(x: np.ndarray, threshold: float, *, index: str = "auto", nprobe: int = 16, flat_max: int = 30000,
                batch: int = 2048, seed: int = 0, progress: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For each row ``i`` of ``x`` (L2-normalised float32), in order: ``(i, neighbours, sims)``
    with every other row ``j`` whose inner product with row i is >= ``threshold``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    kind = choose_index(n, index, flat_max)
    bar = tqdm(total=n, desc=f"near-duplicate search ({kind})", unit="row", disable=not progress)
    try:
        if kind == "numpy":
            for s in range(0, n, batch):
                sims = x[s:s + batch] @ x.T
                for r in range(len(sims)):
                    j = np.flatnonzero(sims[r] >= threshold)
                    j = j[j != s + r]
                    yield s + r, j, sims[r, j]
                bar.update(len(sims))
            return
        faiss = _faiss()
        d = x.shape[1]
        if kind == "flat":
            idx = faiss.IndexFlatIP(d)
        else:
            nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(d)
            idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = x[rng.choice(n, size=min(n, nlist * 256), replace=False)]
            idx.train(train)
            idx.nprobe = min(nprobe, nlist)
        idx.add(x)
        for s in range(0, n, batch):
            lims, dist, ids = idx.range_search(x[s:s + batch], float(threshold) - _EPS)
            for r in range(len(lims) - 1):
                j, sim = ids[lims[r]:lims[r + 1]], dist[lims[r]:lims[r + 1]]
                keep = (sim >= threshold) & (j != s + r)
                order = np.argsort(j[keep], kind="stable")
                yield s + r, j[keep][order].astype(np.int64), sim[keep][order]
            bar.update(min(batch, n - s))
    finally:
        bar.close()


def best_match(queries: np.ndarray, base: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest row of ``base`` (by inner product) for each query: (index, similarity);
    index -1 when ``base`` is empty."""
    q = np.asarray(queries, dtype=np.float32)
    if len(base) == 0:
        return np.full(len(q), -1, dtype=np.int64), np.full(len(q), -np.inf, dtype=np.float32)
    idx = np.empty(len(q), dtype=np.int64)
    sim = np.empty(len(q), dtype=np.float32)
    for s in range(0, len(q), batch):
        sims = q[s:s + batch] @ base.T
        idx[s:s + batch] = sims.argmax(axis=1)
        sim[s:s + batch] = sims[np.arange(len(sims)), idx[s:s + batch]]
    return idx, sim
