"""Matching captions against a large query list (the paper used 500,000 queries).

A pair matches a query when the query's words occur in its caption as whole words, in order
and adjacent (case-folded; punctuation between words is ignored, so "hot-dog" matches the
query "hot dog"). Single-word queries are a dict lookup per caption token; multi-word queries
are found through a dictionary keyed by their first word that lists the phrase lengths
starting with it, so the cost per caption is O(tokens x distinct phrase lengths), independent
of the number of queries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .text import words


class QueryMatcher:
    """Queries (deduplicated after normalisation, first occurrence wins) and their matcher."""

    def __init__(self, queries: Iterable[str]) -> None:
        self.queries: list[str] = []
        self._single: dict[str, int] = {}
        self._multi: dict[tuple[str, ...], int] = {}
        lengths: dict[str, set[int]] = {}
        self.ignored = 0
        for q in queries:
            toks = words(q)
            if not toks:
                self.ignored += 1
                continue
            norm = " ".join(toks)
            if len(toks) == 1:
                if toks[0] in self._single:
                    self.ignored += 1
                    continue
                self._single[toks[0]] = len(self.queries)
            else:
                t = tuple(toks)
                if t in self._multi:
                    self.ignored += 1
                    continue
                self._multi[t] = len(self.queries)
                lengths.setdefault(toks[0], set()).add(len(toks))
            self.queries.append(norm)
        self._lengths = {w: tuple(sorted(ls)) for w, ls in lengths.items()}

    def __len__(self) -> int:
        return len(self.queries)

    def match_tokens(self, toks: list[str], found: set[int]) -> None:
        single, multi, lengths = self._single, self._multi, self._lengths
        n = len(toks)
        for i, w in enumerate(toks):
            q = single.get(w)
            if q is not None:
                found.add(q)
            ls = lengths.get(w)
            if ls:
                for L in ls:
                    if i + L > n:
                        break
                    q = multi.get(tuple(toks[i:i + L]))
                    if q is not None:
                        found.add(q)

    def match(self, captions: str | list[str]) -> list[int]:
        """Sorted ids of the queries matched by any of the captions."""
        found: set[int] = set()
        for c in [captions] if isinstance(captions, str) else captions:
            self.match_tokens(words(c), found)
        return sorted(found)


def read_queries(path: str | os.PathLike) -> list[str]:
    """Queries, one per line (text after a tab, e.g. a count, is ignored; blank lines and
    lines starting with ``#`` are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"queries file not found: {p}")
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            q = line.rstrip("\n").split("\t", 1)[0].strip()
            if q and not q.startswith("#"):
                out.append(q)
    if not out:
        raise ValueError(f"{p}: no queries (one query per line expected)")
    return out


def csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged lists as (offsets [n+1], values) arrays."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    if lists:
        offsets[1:] = np.cumsum([len(x) for x in lists])
    values = np.fromiter((v for x in lists for v in x), dtype=np.int32, count=int(offsets[-1]))
    return offsets, values
