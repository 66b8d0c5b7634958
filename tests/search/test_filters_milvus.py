"""Filtered search pushed down to Milvus (milvus-lite) as its filter expression: equal to exact
filtered search over the same vectors."""

from __future__ import annotations

import operator

import numpy as np
import pytest
from search.searchutil import clustered_vectors, micro_model
from search.test_filters import DIM, FILTERS, exact_filtered, write_tagged

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from clipforge.search.index import load_index
from clipforge.search.milvus import build_milvus_index
from clipforge.search.searcher import Searcher


def test_milvus_filtered_search_equals_exact(tmp_path):
    n = 600
    x = clustered_vectors(n, DIM, seed=3)
    write_tagged(tmp_path / "emb", x)
    build_milvus_index(tmp_path / "emb", tmp_path / "mv", progress=False, n_queries=5)
    index = load_index(tmp_path / "mv")
    try:
        s = Searcher(index, micro_model(), check_model=False, max_k=50)
        base = np.stack([index.vector(i) for i in range(n)])
        rows = index.rows(range(n))
        queries = clustered_vectors(5, DIM, seed=9)
        recalls = []
        for spec in FILTERS:
            preds = s.parse_filter(spec)
            allowed = np.array([all(_holds(r[p.column], p) for p in preds) for r in rows])
            for q in queries:
                hits, report = s.search_filtered(q, 10, preds)
                assert report["pushed_down"] is True
                want = exact_filtered(base, q, allowed, 10)
                got = [h.id for h in hits]
                assert all(allowed[i] for i in got) and len(got) == len(want)
                recalls.append(len(set(got) & set(want)) / max(len(want), 1))
        print(f"Milvus filtered recall@10: {np.mean(recalls):.3f}")
        assert np.mean(recalls) >= 0.99  # a FLAT Milvus index: exact up to ties
    finally:
        index.close()


OPS = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gte": operator.ge, "lt": operator.lt,
       "lte": operator.le, "in": lambda v, values: v in values}


def _holds(v, p) -> bool:
    return v is not None and OPS[p.op](v, p.value)
