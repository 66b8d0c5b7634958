"""Building a query list the way WIT's was built: frequent words of a corpus (the paper: words
occurring at least 100 times in English Wikipedia) plus bigrams with high pointwise mutual
information, or a given vocabulary filtered by its counts."""

from __future__ import annotations

import gzip
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from .text import words


@dataclass
class QueryList:
    words: list[tuple[str, int]] = field(default_factory=list)            # (word, count)
    bigrams: list[tuple[str, int, float]] = field(default_factory=list)   # (bigram, count, pmi)

    @property
    def queries(self) -> list[str]:
        return [w for w, _ in self.words] + [b for b, _, _ in self.bigrams]

    def lines(self) -> list[str]:
        """``query<TAB>count`` lines (readers ignore the count), words first then bigrams."""
        return [f"{w}\t{n}" for w, n in self.words] + [f"{b}\t{n}" for b, n, _ in self.bigrams]


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _is_stop(query: str, stopwords: frozenset[str] | None) -> bool:
    """A query made only of stopwords ("the", "next to") matches nearly every caption."""
    return bool(stopwords) and all(w in stopwords for w in query.split())


def queries_from_vocab(path: str | os.PathLike, *, min_count: int | None = None,
                       stopwords: frozenset[str] | None = None) -> QueryList:
    """A vocabulary file: one entry per line, optionally ``entry<TAB or space>count``.
    With ``min_count``, entries need a count >= min_count (a file without counts is an error);
    entries made only of ``stopwords`` are left out."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {p}")
    out = QueryList()
    seen: set[str] = set()
    with _open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            count: int | None = None
            head, sep, tail = line.rpartition("\t") if "\t" in line else line.rpartition(" ")
            if sep and tail.isdigit():
                line, count = head.strip(), int(tail)
            if min_count is not None:
                if count is None:
                    raise ValueError(f"{p}: line {lineno}: --min-count needs 'entry<TAB>count' lines, got {line!r}")
                if count < min_count:
                    continue
            q = " ".join(words(line))
            if q and q not in seen and not _is_stop(q, stopwords):
                seen.add(q)
                out.words.append((q, count if count is not None else 0))
    return out


def _iter_lines(paths: list[Path], progress: bool) -> Iterator[str]:
    for p in tqdm(paths, desc="corpus files", disable=not progress or len(paths) < 2):
        with _open_text(p) as f:
            yield from f


def queries_from_corpus(paths: Iterable[str | os.PathLike], *, min_count: int = 100, min_bigram_count: int | None = None,
                        min_pmi: float = 3.0, max_bigrams: int | None = None, stopwords: frozenset[str] | None = None,
                        progress: bool = False) -> QueryList:
    """Words occurring >= ``min_count`` times, plus adjacent word pairs (within a line) seen
    >= ``min_bigram_count`` times (default ``min_count``) whose PMI
    ``log(p(a b) / (p(a) p(b)))`` is >= ``min_pmi``, best PMI first. Queries made only of
    ``stopwords`` (e.g. :data:`clipforge.curation.text.STOPWORDS`) are left out."""
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
    uni: Counter[str] = Counter()
    bi: Counter[tuple[str, str]] = Counter()
    for line in _iter_lines(files, progress):
        toks = words(line)
        uni.update(toks)
        bi.update(zip(toks, toks[1:]))
    n_uni = sum(uni.values())
    n_bi = sum(bi.values())
    out = QueryList()
    out.words = sorted(((w, n) for w, n in uni.items() if n >= min_count and not _is_stop(w, stopwords)),
                       key=lambda x: (-x[1], x[0]))
    mb = min_count if min_bigram_count is None else min_bigram_count
    cands = []
    for (a, b), n in bi.items():
        if n < mb or _is_stop(f"{a} {b}", stopwords):
            continue
        pmi = math.log((n / n_bi) / ((uni[a] / n_uni) * (uni[b] / n_uni)))
        if pmi >= min_pmi:
            cands.append((f"{a} {b}", n, round(pmi, 4)))
    cands.sort(key=lambda x: (-x[2], -x[1], x[0]))
    out.bigrams = cands[:max_bigrams] if max_bigrams is not None else cands
    return out
