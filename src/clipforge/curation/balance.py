"""Query balancing (WIT: "we approximately class balance the results by including up to
20,000 (image, text) pairs per query").

A first pass matches every caption against the query list and counts, per query, the pairs
matching it in the whole pool. Each pair is then charged to the *rarest* query it matches
(fewest matching pairs; ties to the earlier query), so rare concepts fill their quota first and
a pair about "a pangolin on a beach" is not crowded out by the millions of "beach" pairs. Up to
``max_per_query`` pairs are kept per query, chosen in pool order (``order="first"``) or by a
seeded hash of the key (``order="hash"``, a uniform sample). Pairs matching no query are
dropped as ``no_query``; pairs beyond their query's cap as ``over_cap``.
"""

from __future__ import annotations

import csv
import hashlib
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..data.base import stable_seed
from ..utils import atomic_open, write_json
from .matcher import QueryMatcher, csr
from .records import Unit
from .runner import Decision, Item, Step, StepRun


def count_summary(counts: np.ndarray) -> dict[str, Any]:
    """Skew statistics of a per-query histogram (over queries with at least one pair)."""
    c = np.asarray(counts, dtype=np.int64)
    nz = np.sort(c[c > 0])
    out: dict[str, Any] = {"queries": int(len(c)), "queries_with_pairs": int(len(nz)), "matches": int(c.sum())}
    if len(nz):
        cum = np.cumsum(nz, dtype=np.float64)
        n = len(nz)
        gini = float((n + 1 - 2 * (cum / cum[-1]).sum()) / n)
        top = max(1, int(np.ceil(0.01 * n)))
        out.update(min=int(nz[0]), max=int(nz[-1]), mean=round(float(nz.mean()), 3), median=float(np.median(nz)),
                   p90=float(np.percentile(nz, 90)), p99=float(np.percentile(nz, 99)), gini=round(gini, 4),
                   top1pct_share=round(float(nz[-top:].sum() / cum[-1]), 4))
    return out


class BalanceStep(Step):
    name = "balance"
    needs_samples = False  # the match pass decodes (and drops bad samples); writing copies raw bytes
    batch_size = 256

    def __init__(self, queries: list[str], *, max_per_query: int = 20000, order: str = "first", seed: int = 0,
                 top_n: int = 20) -> None:
        if max_per_query < 1:
            raise ValueError(f"max_per_query must be >= 1, got {max_per_query}")
        if order not in ("first", "hash"):
            raise ValueError(f"order must be 'first' or 'hash', got {order!r}")
        self.matcher = QueryMatcher(queries)
        if not len(self.matcher):
            raise ValueError("no usable query (every query is empty after tokenisation)")
        self.max_per_query, self.order, self.seed, self.top_n = max_per_query, order, seed, top_n
        self.plan: dict[str, dict[str, np.ndarray]] = {}
        self.counts = np.zeros(len(self.matcher), dtype=np.int64)

    def config(self) -> dict[str, Any]:
        qhash = hashlib.sha1("\n".join(self.matcher.queries).encode("utf-8")).hexdigest()
        return {"queries": len(self.matcher), "queries_sha1": qhash, "max_per_query": self.max_per_query,
                "order": self.order, "seed": self.seed}

    # -- pass 1: match ---------------------------------------------------------------------
    def _match_unit(self, run: StepRun, unit: Unit, bar: tqdm) -> dict[str, np.ndarray]:
        keys: list[str] = []
        bad: list[str] = []
        matched: list[list[int]] = []
        for it in run.iter_items(unit, decode=True, bar=bar):
            keys.append(it.record.key)
            bad.append(it.bad.reason if it.bad is not None else "")
            matched.append(self.matcher.match(it.sample.captions) if it.sample is not None else [])
        offsets, qids = csr(matched)
        return {"keys": np.array(keys, dtype=str), "bad": np.array(bad, dtype=str), "offsets": offsets, "qids": qids}

    # -- global plan -----------------------------------------------------------------------
    def prepare(self, run: StepRun) -> None:
        load = run.map_units("match", self._match_unit, desc="balance: matching queries")
        data = [load(u) for u in run.units]
        nq = len(self.matcher)
        counts = np.zeros(nq, dtype=np.int64)
        for d in data:
            counts += np.bincount(d["qids"], minlength=nq)
        self.counts = counts
        # rarest matched query per pair: minimise (count, query id) with one int64 key
        assigned_all, sortkey_all = [], []
        pos = 0
        for d in data:
            n = len(d["keys"])
            off, q = d["offsets"], d["qids"]
            assigned = np.full(n, -1, dtype=np.int64)
            has = np.diff(off) > 0
            if q.size:
                rank_key = counts[q] * nq + q
                mins = np.minimum.reduceat(rank_key, off[:-1][has])
                assigned[has] = mins % nq
            assigned_all.append(assigned)
            if self.order == "first":
                sortkey_all.append(np.arange(pos, pos + n, dtype=np.uint64))
            else:
                sortkey_all.append(np.fromiter((stable_seed("balance", self.seed, k) for k in d["keys"]),
                                               dtype=np.uint64, count=n))
            pos += n
        assigned = np.concatenate(assigned_all) if assigned_all else np.zeros(0, np.int64)
        sortkey = np.concatenate(sortkey_all) if sortkey_all else np.zeros(0, np.uint64)
        keep = np.zeros(len(assigned), dtype=bool)
        idx = np.flatnonzero(assigned >= 0)
        if idx.size:
            order = idx[np.lexsort((sortkey[idx], assigned[idx]))]
            grp = assigned[order]
            starts = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
            rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
            keep[order[rank < self.max_per_query]] = True
        pos = 0
        for u, d, a in zip(run.units, data, assigned_all):
            n = len(a)
            self.plan[u.name] = {"keys": d["keys"], "bad": d["bad"], "offsets": d["offsets"], "qids": d["qids"],
                                 "assigned": a, "keep": keep[pos:pos + n]}
            pos += n

    # -- pass 2: write ---------------------------------------------------------------------
    def decide(self, run: StepRun, unit: Unit, items: list[Item]) -> list[Decision]:
        p = self.plan[unit.name]
        out = []
        for it in items:
            i = it.index
            if i >= len(p["keys"]) or p["keys"][i] != it.record.key:
                raise RuntimeError(f"{unit.name}: record {i} is {it.record.key!r} but the matching pass saw "
                                   f"{p['keys'][i] if i < len(p['keys']) else 'nothing'!r}: the input changed; re-run with --force")
            if p["bad"][i]:
                out.append(Decision(False, str(p["bad"][i])))
                continue
            a = int(p["assigned"][i])
            n_match = int(p["offsets"][i + 1] - p["offsets"][i])
            if a < 0:
                out.append(Decision(False, "no_query"))
                continue
            extra = {"query": self.matcher.queries[a], "query_pairs": int(self.counts[a]), "matched_queries": n_match}
            out.append(Decision(bool(p["keep"][i]), "over_cap", extra))
        return out

    # -- report ----------------------------------------------------------------------------
    def histograms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per query: pairs matching it before and after; pairs charged to it (as their rarest
        query) before the cap and kept after it."""
        nq = len(self.matcher)
        after = np.zeros(nq, dtype=np.int64)
        charged = np.zeros(nq, dtype=np.int64)
        charged_before = np.zeros(nq, dtype=np.int64)
        for p in self.plan.values():
            a = p["assigned"]
            charged_before += np.bincount(a[a >= 0], minlength=nq)
            keep = p["keep"]
            if not keep.any():
                continue
            per_pair = np.diff(p["offsets"])
            kept_q = p["qids"][np.repeat(keep, per_pair)]
            after += np.bincount(kept_q, minlength=nq)
            charged += np.bincount(p["assigned"][keep], minlength=nq)
        return self.counts, after, charged_before, charged

    def global_outputs(self, run: StepRun) -> list:
        return [run.out / "query_histogram.json", run.out / "query_histogram.csv"]

    def summarize(self, run: StepRun, report: dict[str, Any]) -> dict[str, Any]:
        before, after, charged_before, charged = self.histograms()
        q = self.matcher.queries
        rows = [{"query": q[i], "pairs_before": int(before[i]), "pairs_after": int(after[i]),
                 "rarest_before": int(charged_before[i]), "kept_as_rarest": int(charged[i])} for i in range(len(q))]
        write_json(run.out / "query_histogram.json", rows, indent=0)
        with atomic_open(run.out / "query_histogram.csv", "w", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(list(rows[0]))
            for r in rows:
                w.writerow(list(r.values()))

        def top(arr: np.ndarray) -> list[dict[str, Any]]:
            idx = np.lexsort((np.arange(len(arr)), -arr))[: self.top_n]
            return [{"query": q[i], "pairs": int(arr[i])} for i in idx if arr[i] > 0]

        # before/after: pairs *matching* each query; charged_*: pairs counted toward each query's cap
        return {"queries": len(q), "queries_ignored": self.matcher.ignored, "max_per_query": self.max_per_query,
                "queries_at_cap": int((charged >= self.max_per_query).sum()),
                "before": count_summary(before), "after": count_summary(after),
                "charged_before": count_summary(charged_before), "charged_after": count_summary(charged),
                "top_before": top(before), "top_after": top(after),
                "histogram": {"json": str(run.out / "query_histogram.json"), "csv": str(run.out / "query_histogram.csv")}}
