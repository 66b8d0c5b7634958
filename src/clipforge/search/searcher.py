"""Queries against an index: text and image queries are embedded with the model that built the
collection, item queries reuse a stored vector. Shared by the ``search`` CLI and the web service."""

from __future__ import annotations

import math
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
from .exact import encode_images_exact, encode_texts_exact, flat_vectors, packs_text, search_flat_exact
from .filters import FilterError, Predicate, filterable_columns, mask, milvus_expr, parse_filter
from .index import load_index
from ..embeddings import weights_sha256
from ..utils.threads import torch_threads


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
                 long_text_overlap: int = DEFAULT_OVERLAP, model_lock: Any = None, exact: bool = False,
                 threads: int | None = None) -> None:
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
        self.exact = exact  # batch-invariant encoding (see .exact): a query's bits never depend on its batch
        self.threads = threads  # torch intra-op threads for encoding (None: torch's count)
        self._lock = model_lock or threading.Lock()  # Searchers over several indexes share their model's
        self._cache = _LRU(query_cache)
        self._masks: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock_masks = threading.Lock()
        self._flat = flat_vectors(self.index)  # an exact FAISS index's vectors: batched searches (search_batch)
        deleted = sorted(getattr(self.index, "deleted", ()))
        self._skip = None
        if self._flat is not None and deleted:
            self._skip = torch.zeros(self._flat.shape[0], dtype=torch.bool)
            self._skip[deleted] = True
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

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[B, D] L2-normalised float32 embeddings of checked texts, one model call (no cache);
        ``exact``: in fixed-shape chunks (:mod:`.exact`), the same bits whatever the batch."""
        with self._lock, torch_threads(self.threads):
            if self.exact and self.long_text is None:
                if packs_text(self.model):
                    return encode_texts_exact(self.model, texts, self.tokenizer.tokenize).numpy()
                return np.concatenate([embed_texts(self.model, [t], truncate=self.truncate_text, batch_size=1).numpy()
                                       for t in texts]) if texts else np.empty((0, self.index.info["dim"]), np.float32)
            if self.long_text is not None:
                return encode_text_long(self.model, texts, long_text=self.long_text,
                                        overlap=self.long_text_overlap).numpy()
            return embed_texts(self.model, texts, truncate=self.truncate_text, batch_size=max(len(texts), 1)).numpy()

    def encode_images(self, images: list[torch.Tensor]) -> np.ndarray:
        """[B, D] L2-normalised float32 embeddings of preprocessed ``[3, S, S]`` images, one model call."""
        with self._lock, torch_threads(self.threads):
            if self.exact:
                return encode_images_exact(self.model, images).numpy()
            return embed_images(self.model, images, batch_size=max(len(images), 1)).numpy()

    def cached_text(self, text: str) -> np.ndarray | None:
        return self._cache.get(text)

    def remember_text(self, text: str, vec: np.ndarray) -> None:
        self._cache.put(text, vec)

    def embed_text(self, text: str, checked: bool = False) -> np.ndarray:
        if not checked:
            text = self.check_text(text)
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        v = self.encode_texts([text])[0]
        self._cache.put(text, v)
        return v

    def embed_image(self, image: Image.Image) -> np.ndarray:
        return self.encode_images([self.preprocess(image)])[0]

    # --- searching -------------------------------------------------------------------------------
    def search_vector(self, vec: np.ndarray, k: int, exclude: int | None = None) -> list[Hit]:
        k = self.check_k(k)
        scores, ids = self.index.search(vec[None, :], k + (1 if exclude is not None else 0))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i != exclude][:k]
        rows = self.index.rows([i for i, _ in pairs])
        return [Hit(i, s, r) for (i, s), r in zip(pairs, rows)]

    @property
    def batches_searches(self) -> bool:
        """Whether :meth:`search_batch` reads the index once per chunk of queries (an exact FAISS
        index); other indexes gain nothing from a search batch and are searched per request."""
        return self._flat is not None

    def search_batch(self, queries: list[tuple[np.ndarray, int, int | None]], threads: int | None = 1
                     ) -> list[list[Hit]]:
        """Unfiltered searches of several queries ``(vector, k, excluded id or None)`` at once, as
        the server's search batcher sends them. An exact FAISS index is read once per chunk of
        queries (:func:`.exact.search_flat_exact`, ``threads`` torch threads), every query fetching
        ``max_k + 1``, so its hits never depend on the others in the batch; other indexes (IVF,
        HNSW, Milvus) are searched query by query."""
        if self._flat is None:
            return [self.search_vector(v, k, exclude) for v, k, exclude in queries]
        ks = [self.check_k(k) for _, k, _ in queries]
        q = torch.from_numpy(np.ascontiguousarray(np.stack([v for v, _, _ in queries]), dtype=np.float32))
        if q.shape[1] != self._flat.shape[1]:
            raise QueryError(f"query dim {q.shape[1]} != index dim {self._flat.shape[1]}")
        with torch_threads(threads):
            scores, ids = search_flat_exact(self._flat, q, self.max_k + 1, self._skip)
        out = []
        for (_, _, exclude), k, sc, ii in zip(queries, ks, scores.tolist(), ids.tolist()):
            pairs = [(i, s) for i, s in zip(ii, sc) if i >= 0 and i != exclude][:k]
            rows = self.index.rows([i for i, _ in pairs])
            out.append([Hit(i, s, r) for (i, s), r in zip(pairs, rows)])
        return out

    @property
    def filter_columns(self) -> dict[str, str]:
        """Metadata columns a filter may name (FAISS indexes; none for backends without a table)."""
        pushed = getattr(self.index, "filter_columns", None)  # Milvus: its own fields, filtered server-side
        if pushed is not None:
            return dict(pushed)
        meta = getattr(self.index, "metadata", None)
        return filterable_columns(meta.schema) if meta is not None and hasattr(meta, "schema") else {}

    def parse_filter(self, spec: Any) -> list[Predicate]:
        cols = self.filter_columns
        if not cols:
            raise QueryError("this index cannot be filtered here (filters need a FAISS index with metadata)")
        try:
            return parse_filter(spec, cols)
        except FilterError as e:
            raise QueryError(str(e)) from None

    def _mask(self, preds: list[Predicate]) -> np.ndarray:
        key = repr(preds)
        with self._lock_masks:
            hit = self._masks.get(key)
            if hit is not None:
                self._masks.move_to_end(key)
                return hit
        m = mask(self.index.metadata, preds)  # type: ignore[attr-defined]
        with self._lock_masks:
            self._masks[key] = m
            while len(self._masks) > 16:
                self._masks.popitem(last=False)
        return m

    def _search_deeper(self, q: np.ndarray, fetch: int, selectivity: float) -> tuple[np.ndarray, np.ndarray]:
        """FAISS IVF: nprobe scaled by 1 / selectivity (the filtered-out share of each probed list
        is wasted), so filtered recall stays near the index's own; other indexes: a plain search."""
        info = self.index.info
        if info.get("type") != "ivf" or not hasattr(self.index, "index"):
            return self.index.search(q, fetch)
        import faiss  # heavy optional dependency: loaded when used

        p = info["params"]
        base = int(p.get("nprobe") or 1)
        nprobe = min(int(p.get("nlist") or base), max(base, math.ceil(base / max(selectivity, 1e-6))))
        if nprobe == base:
            return self.index.search(q, fetch)
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        old = getattr(self.index, "_params", None)
        if old is not None and old.sel is not None:
            params.sel = old.sel  # deleted ids stay skipped
        qz = faiss.downcast_index(faiss.extract_index_ivf(self.index.index).quantizer)
        qp = None
        if isinstance(qz, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
            params.quantizer_params = qp
        out = self.index.index.search(np.ascontiguousarray(q, dtype=np.float32), min(fetch, self.index.ntotal),
                                      params=params)
        del qp
        return out

    def search_filtered(self, vec: np.ndarray, k: int, preds: list[Predicate],
                        exclude: int | None = None) -> tuple[list[Hit], dict[str, Any]]:
        """The ``k`` best items passing ``preds``, by over-fetching: 4k candidates, then 4x more
        until k pass or everything was fetched. Returns (hits, {"matching", "fetched"}). A Milvus
        index gets the filter as its own expression ("pushed_down"; "matching" is not known)."""
        k = self.check_k(k)
        if getattr(self.index, "filter_columns", None) is not None:  # Milvus: the expression is pushed down
            n = k + (exclude is not None)
            scores, ids = self.index.search(vec[None, :], n, filter_expr=milvus_expr(preds))  # type: ignore[call-arg]
            pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i != exclude][:k]
            rows = self.index.rows([i for i, _ in pairs])
            return [Hit(i, s, r) for (i, s), r in zip(pairs, rows)], {"matching": None, "fetched": n,
                                                                      "pushed_down": True}
        allowed = self._mask(preds)
        matching = int(allowed.sum())
        total = self.index.ntotal
        fetch = min(4 * k + (exclude is not None), total)
        while True:
            scores, ids = self._search_deeper(vec[None, :], fetch, matching / max(total, 1))
            pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0])
                     if i >= 0 and i != exclude and allowed[i]][:k]
            if len(pairs) >= min(k, matching) or fetch >= total:
                break
            fetch = min(fetch * 4, total)
        rows = self.index.rows([i for i, _ in pairs])
        return [Hit(i, s, r) for (i, s), r in zip(pairs, rows)], {"matching": matching, "fetched": fetch}

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
