"""Queries against an index: text and image queries are embedded with the model that built the
collection, item queries reuse a stored vector. Shared by the ``search`` CLI and the web service."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..inference import embed_images, embed_texts
from ..longtext import encode_text_long
from ..preprocess import image_transform
from ..families import tokenizer_for
from ..tokenizer import DEFAULT_OVERLAP, check_long_text
from .backend import SearchBackend
from .index import load_index
from ..embeddings import weights_sha256


class QueryError(ValueError):
    """A query the caller got wrong (empty, too long, bad k, unknown id); ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Hit:
    id: int
    score: float
    row: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, **{k: v for k, v in self.row.items() if k != "id"}}


class _LRU:
    """A small thread-safe LRU cache of query embeddings (per Searcher, not global)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self.lock:
            v = self.data.get(key)
            if v is None:
                self.misses += 1
                return None
            self.data.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)


class Searcher:
    """Model + index (FAISS or Milvus, any :class:`.backend.SearchBackend`). Model calls are
    serialised by a lock (torch modules are not re-entrant across threads in a useful way on
    CPU); index searches run concurrently."""

    def __init__(self, index: SearchBackend | str | Path, model: torch.nn.Module,
                 preprocess: Callable[[Image.Image], torch.Tensor] | None = None, *,
                 max_k: int = 100, query_cache: int = 1024, check_model: bool = True,
                 truncate_text: bool = False, long_text: str | None = None,
                 long_text_overlap: int = DEFAULT_OVERLAP) -> None:
        self.index: SearchBackend = load_index(index) if isinstance(index, (str, Path)) else index
        self.model = model.eval()
        self.preprocess = preprocess or image_transform(model.config.preprocess)
        self.max_k = max_k
        self.truncate_text = truncate_text  # the service truncates like open_clip; the CLI refuses
        # long_text (error | truncate | chunks, see clipforge.longtext) overrides truncate_text when given
        if long_text is not None:
            check_long_text(long_text, long_text_overlap, int(model.context_length))
        self.long_text = long_text
        self.long_text_overlap = long_text_overlap
        self.context_length = int(model.context_length)
        self.tokenizer = tokenizer_for(model)
        self._lock = threading.Lock()
        self._cache = _LRU(query_cache)
        dim = int(model.config.embed_dim)
        if dim != self.index.info["dim"]:
            raise ValueError(f"model embeds into {dim} dims but the index at {self.index.path} holds "
                             f"{self.index.info['dim']}-dim vectors: use the model that built it")
        self.model_matches: bool | None = None
        if check_model:
            want = (self.index.info.get("model") or {}).get("weights_sha256")
            if want:
                self.model_matches = weights_sha256(model) == want
                if not self.model_matches:
                    warnings.warn(f"the model's weights differ from those that embedded the collection at "
                                  f"{self.index.path} (scores may be meaningless)", stacklevel=2)

    # --- query validation and embedding ----------------------------------------------------------
    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise QueryError(f"k must be an integer, got {k!r}")
        if not 1 <= k <= self.max_k:
            raise QueryError(f"k must be between 1 and {self.max_k}, got {k}")
        return int(k)

    def text_tokens(self, text: Any) -> tuple[str, int]:
        """(stripped text, its token count with start/end); refuses non-strings, empty texts and,
        unless ``truncate_text``, texts longer than the context length."""
        if not isinstance(text, str):
            raise QueryError(f"text must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise QueryError("text query is empty")
        n = self.tokenizer.token_counts([text])[0]
        refuse = self.long_text == "error" if self.long_text is not None else not self.truncate_text
        if n > self.context_length and refuse:
            raise QueryError(f"text query has {n} tokens (with start/end), more than the model's context "
                             f"length {self.context_length}; shorten it, or embed it with long_text 'truncate' or "
                             f"'chunks' (CLI: --long-text)")
        return text, n

    def check_text(self, text: Any) -> str:
        return self.text_tokens(text)[0]

    def embed_text(self, text: str, checked: bool = False) -> np.ndarray:
        if not checked:
            text = self.check_text(text)
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        with self._lock:
            if self.long_text is not None:
                v = encode_text_long(self.model, [text], long_text=self.long_text,
                                     overlap=self.long_text_overlap).numpy()[0]
            else:
                v = embed_texts(self.model, [text], truncate=self.truncate_text).numpy()[0]
        self._cache.put(text, v)
        return v

    def embed_image(self, image: Image.Image) -> np.ndarray:
        x = self.preprocess(image)
        with self._lock:
            return embed_images(self.model, [x], batch_size=1).numpy()[0]

    # --- searching -------------------------------------------------------------------------------
    def search_vector(self, vec: np.ndarray, k: int, exclude: int | None = None) -> list[Hit]:
        k = self.check_k(k)
        scores, ids = self.index.search(vec[None, :], k + (1 if exclude is not None else 0))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i != exclude][:k]
        rows = self.index.rows([i for i, _ in pairs])
        return [Hit(i, s, r) for (i, s), r in zip(pairs, rows)]

    def search_text(self, text: str, k: int = 10, checked: bool = False) -> list[Hit]:
        self.check_k(k)
        return self.search_vector(self.embed_text(text, checked), k)

    def search_image(self, image: Image.Image, k: int = 10) -> list[Hit]:
        self.check_k(k)
        return self.search_vector(self.embed_image(image), k)

    def search_item(self, item_id: Any, k: int = 10) -> list[Hit]:
        """Items most similar to ``item_id`` (the item itself left out)."""
        self.check_k(k)
        item_id = self.check_id(item_id)
        return self.search_vector(self.index.vector(item_id), k, exclude=item_id)

    def check_id(self, item_id: Any) -> int:
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)):
            raise QueryError(f"item_id must be an integer, got {item_id!r}")
        if not self.index.has(int(item_id)):
            gone = " or deleted" if 0 <= item_id < self.index.ntotal else ""
            raise QueryError(f"unknown{gone} item id {item_id} (ids are 0..{self.index.ntotal - 1})", status=404)
        return int(item_id)

    def item(self, item_id: Any) -> dict[str, Any]:
        item_id = self.check_id(item_id)
        row = self.index.row(item_id)
        return {"id": item_id, **{k: v for k, v in row.items() if k != "id"}}

    @property
    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses, "size": len(self._cache.data)}
