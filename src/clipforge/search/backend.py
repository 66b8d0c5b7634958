"""The one interface ``Searcher`` and the service query: FAISS (:class:`.index.LoadedIndex`) and
Milvus (:class:`.milvus.MilvusIndex`) both satisfy it, so a user moves from the embedded index to a
Milvus server by changing ``--backend``/``--uri`` at build time, not the program that queries.

Ids are the collection's global row numbers (``0 .. ntotal-1``); deleted ids stay unused.
Writes (build, ``--add``, delete) are functions of the index directory, not of this object,
because each commits a new ``index.json`` under the directory's writer lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SearchBackend(Protocol):
    info: dict[str, Any]   # the index.json it was opened from
    path: Path             # the index directory
    mmap: bool

    @property
    def ntotal(self) -> int:
        """One past the largest id ever assigned (ids of deleted items included)."""

    def count(self) -> int:
        """Live (not deleted) vectors."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]) by inner product, best first, -1 ids pad short rows."""

    def has(self, item_id: int) -> bool:
        """Whether ``item_id`` is indexed and not deleted."""

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (possibly decoded) vector of ``item_id`` (KeyError if unknown)."""

    def row(self, item_id: int) -> dict[str, Any]:
        """Metadata of ``item_id`` (KeyError if unknown)."""

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Metadata of ``ids`` in that order."""

    def close(self) -> None:
        """Release connections / servers (a no-op for FAISS)."""
