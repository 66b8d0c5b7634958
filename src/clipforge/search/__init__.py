"""Semantic search: embed collections into resumable shards, index them with FAISS, query them
from the CLI or over HTTP.

- :func:`embed_collection` (``embed``): sources -> ``img_emb/*.npy`` + ``metadata/*.parquet`` shards
  (the store itself, shared with curation and clip-retrieval, is :mod:`clipforge.embeddings`)
- :func:`build_index` / :func:`add_to_index` / :func:`load_index` / :func:`delete_from_index` (``index``):
  FAISS (in RAM, memory-mapped or ``on_disk``), tuned to a recall target;
  :func:`build_milvus_index` (``index --backend milvus``): the same over Milvus / milvus-lite
- :class:`Searcher` (``search``): text / image / item queries
- :func:`create_app` (``serve``): FastAPI service + web page

Names are imported lazily: faiss, pyarrow and fastapi load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "embed_collection": "embed", "EmbedSummary": "embed",
    "open_source": "sources", "ImageFolderSource": "sources", "TextFileSource": "sources",
    "PairDataSource": "sources",
    "build_index": "index", "add_to_index": "index", "load_index": "index", "plan_index": "planning",
    "parse_memory": "planning", "LoadedIndex": "index", "delete_from_index": "index",
    "build_milvus_index": "milvus", "MilvusIndex": "milvus", "SearchBackend": "backend",
    "Searcher": "searcher", "QueryError": "searcher",
    "create_app": "service",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
