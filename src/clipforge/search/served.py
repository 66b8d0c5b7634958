"""What one server serves and the query code its routes share: the indices (:class:`Served`), the
settings (:class:`Settings`), and :class:`Service` (index choice, embedding through the batchers
within the request timeout, result rows, health). :mod:`.service` assembles the FastAPI app and
its routes over a :class:`Service`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from starlette.requests import ClientDisconnect

from . import http
from .backend import SearchBackend
from .batching import Batcher, ClientGone
from .clip_back_api import KNN_COLUMNS
from .http import (DEFAULT_MAX_IMAGE_PIXELS, Busy, WorkerPool, check_unicode, decode_query_image, parse_json,
                   public_path, whole)
from .index import set_search_threads
from .metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics
from .searcher import Hit, QueryError, Searcher
from .thumbnails import Thumbnailer

log = logging.getLogger("clipforge.search.service")


def default_encode_threads() -> int:
    """The cores this process may use minus one (at least one): the encodes keep clear of the
    event loop's core. On a shared CPU an OpenMP region waits at each barrier for a descheduled
    sibling: a tiny model's encode measured 7-20x slower (and 4-8x the CPU time, spinning) on 2
    threads than on 1 while the 2 cores were busy with other work."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def observe_batch(metrics: Metrics, kind: str, n: int) -> None:
    metrics.observe("clipforge_batch_size", n, kind=kind)


def find_disconnect(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps, or a group it belongs to) is a client disconnect."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ClientDisconnect):
            return True
        stack.extend([x.__cause__, x.__context__, *getattr(x, "exceptions", ())])  # type: ignore[list-item]
    return False


# --- schemas (what the OpenAPI document promises) -------------------------------------------------

@dataclass
class Served:
    """One of the server's indexes: its name, Searcher and thumbnails."""

    name: str
    searcher: Searcher
    thumbs: Thumbnailer

    @property
    def has_images(self) -> bool:
        return self.searcher.index.info["kind"] == "image"


IndexArg = Union[str, Path, SearchBackend]


@dataclass
class Settings:
    """The service's limits and switches (``create_app``'s keyword arguments), checked once."""

    max_k: int = 100
    max_upload_bytes: int = 10 * 2**20
    max_json_bytes: int = 256 * 2**10
    workers: int = 4
    max_pending: int = 256
    request_timeout: float = 30.0
    query_cache: int = 1024
    thumb_size: int = 256
    max_result_ids: int = 10_000
    knn_columns: tuple[str, ...] = KNN_COLUMNS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    cors_origins: tuple[str, ...] = ()
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_embed_items: int = 64
    auth_token: str | None = None
    exact_batches: bool = True
    encode_threads: int | None = None
    search_threads: int = 1
    batch_searches: bool = True
    uploads: bool | None = None

    def check(self) -> None:
        for name in ("max_k", "max_upload_bytes", "max_json_bytes", "workers", "max_pending", "max_result_ids",
                     "max_image_pixels", "max_batch", "max_embed_items", "search_threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.encode_threads is not None and (not isinstance(self.encode_threads, int) or self.encode_threads < 1):
            raise ValueError(f"encode_threads must be a positive integer, got {self.encode_threads!r}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout!r}")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if self.auth_token is not None and (not self.auth_token.strip() or len(self.auth_token) < 16):
            raise ValueError("the auth token must have at least 16 characters")

    def resolve_uploads(self) -> bool:
        """Uploads on where python-multipart is installed (``None``), refused if asked without it."""
        has_multipart = http.multipart_available()
        if self.uploads is None:
            if not has_multipart:
                log.warning("python-multipart is not installed: image uploads are disabled "
                            "(pip install python-multipart)")
            return has_multipart
        if self.uploads and not has_multipart:
            raise RuntimeError("image uploads need python-multipart: pip install 'clipforge[search]' "
                               "(or pip install python-multipart), or disable uploads")
        return bool(self.uploads)


def load_served(index: IndexArg | dict[str, IndexArg], index_name: str | None, model: torch.nn.Module,
                preprocess: Callable[[Image.Image], torch.Tensor] | None, cfg: Settings) -> dict[str, Served]:
    """name -> Served for each index (loaded here, once); the first is the default."""
    given = dict(index) if isinstance(index, dict) else {index_name: index}
    if not given:
        raise ValueError("no index to serve")
    model_lock = threading.Lock()
    served: dict[str, Served] = {}
    for nm, ix in given.items():
        s_ = Searcher(ix, model, preprocess, max_k=cfg.max_k, query_cache=cfg.query_cache, truncate_text=True,
                      model_lock=model_lock, exact=cfg.exact_batches, threads=cfg.encode_threads)
        nm = nm or s_.index.path.resolve().name or "index"
        if nm in served:
            raise ValueError(f"two indexes are named {nm!r}: give them distinct names (NAME=PATH)")
        served[nm] = Served(nm, s_, Thumbnailer(size=cfg.thumb_size, max_pixels=cfg.max_image_pixels))
    return served


def service_metrics() -> Metrics:
    metrics = Metrics()
    metrics.counter("clipforge_requests_total", "HTTP requests answered, by route and status")
    metrics.histogram("clipforge_request_seconds", "time to answer a request, by route", LATENCY_BUCKETS)
    metrics.counter("clipforge_errors_total", "error responses and dropped requests, by kind")
    metrics.counter("clipforge_client_disconnects_total", "clients that went away before their response")
    metrics.histogram("clipforge_batch_size", "items encoded together, by kind (text | image)", BATCH_BUCKETS)
    return metrics


class Service:
    """What the routes share: the indexes, the worker pool, the batchers, the metrics, and the
    query plumbing (index choice, embedding through the batchers, result rows)."""

    def __init__(self, served: dict[str, Served], cfg: Settings, uploads: bool) -> None:
        self.served, self.cfg, self.uploads = served, cfg, uploads
        self.default = next(iter(served.values()))
        self.searcher = self.default.searcher  # model-level work (encoding, the text cache) goes through the first
        self.decode_image = functools.partial(decode_query_image, max_pixels=cfg.max_image_pixels)
        self.metrics = service_metrics()
        # requests search in parallel across the workers, each on cfg.search_threads FAISS threads
        self.pool = WorkerPool(cfg.workers, cfg.max_pending, cfg.request_timeout,
                               initializer=functools.partial(set_search_threads, cfg.search_threads))
        self.offload = self.pool.run
        self.batchers = {kind: Batcher(encode, max_batch=cfg.max_batch, wait_s=cfg.batch_wait_ms / 1000,
                                       max_pending=cfg.max_pending, name=kind,
                                       on_batch=functools.partial(observe_batch, self.metrics, kind))
                         for kind, encode in (("text", self.searcher.encode_texts),
                                              ("image", self.searcher.encode_images))}
        # unfiltered searches of each exact index, batched too (others, and max_batch 1: each query in the pool)
        self.search_batchers = {
            nm: Batcher(functools.partial(sv.searcher.search_batch, threads=cfg.search_threads),
                        max_batch=cfg.max_batch, wait_s=cfg.batch_wait_ms / 1000, max_pending=cfg.max_pending,
                        name=f"search:{nm}", on_batch=functools.partial(observe_batch, self.metrics, "search"))
            for nm, sv in served.items() if cfg.max_batch > 1 and cfg.batch_searches and sv.searcher.batches_searches}
        for kind, b in self.batchers.items():
            self.metrics.gauge("clipforge_queue_depth", "items waiting for a batch, by kind", lambda b=b: b.depth,
                               kind=kind)
        for nm, b in self.search_batchers.items():
            self.metrics.gauge("clipforge_queue_depth", "items waiting for a batch, by kind", lambda b=b: b.depth,
                               kind=f"search:{nm}")
        self.metrics.gauge("clipforge_pool_pending", "requests queued or running in the worker pool",
                           lambda: self.pool.pending)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI):  # type: ignore[no-untyped-def]
        yield
        for b in [*self.batchers.values(), *self.search_batchers.values()]:  # uvicorn has drained in-flight
            b.close()                                                          # requests; finish what is queued
        self.pool.shutdown()

    def pick(self, name: Any) -> Served:
        if name is None:
            return self.default
        if not isinstance(name, str) or name not in self.served:
            raise QueryError(f"unknown index {str(name)[:80]!r}; this server has {sorted(self.served)}", status=404)
        return self.served[name]

    # --- embedding through the batchers ------------------------------------------------------------
    async def encode_item(self, request: Request, kind: str, value: Any) -> np.ndarray:
        """One text or preprocessed image through its batcher, within the request timeout."""
        timeout = self.cfg.request_timeout
        try:
            return await asyncio.wait_for(self.batchers[kind].run(value, client_left(request)), timeout)
        except asyncio.TimeoutError:
            raise Busy(f"query took longer than {timeout:g} s") from None
        except ClientGone:
            raise ClientDisconnect() from None

    async def search(self, request: Request, sv: Served, vec: np.ndarray, k: int,
                     exclude: int | None = None) -> list[Hit]:
        """An unfiltered search of ``sv``: through its search batcher (one read of the index for a
        chunk of queries, :meth:`.Searcher.search_batch`), or alone in the pool when ``max_batch`` is 1."""
        batcher = self.search_batchers.get(sv.name)
        if batcher is None:
            return await self.offload(sv.searcher.search_vector, vec, k, exclude)
        timeout = self.cfg.request_timeout
        try:
            return await asyncio.wait_for(batcher.run((vec, k, exclude), client_left(request)), timeout)
        except asyncio.TimeoutError:
            raise Busy(f"query took longer than {timeout:g} s") from None
        except ClientGone:
            raise ClientDisconnect() from None

    async def text_vector(self, request: Request, text: str) -> np.ndarray:
        v = self.searcher.cached_text(text)
        if v is None:
            v = await self.encode_item(request, "text", text)
            self.searcher.remember_text(text, v)
        return v

    async def image_vector(self, request: Request, x: torch.Tensor) -> np.ndarray:
        return await self.encode_item(request, "image", x)

    def wait_batched(self, kind: str, value: Any) -> np.ndarray:
        """One item through its batcher, from a worker thread (clip-retrieval's handler is synchronous)."""
        return self.wait_on(self.batchers[kind], value)

    def wait_on(self, batcher: Batcher, value: Any) -> Any:
        fut = batcher.submit(value)
        try:
            return fut.result(self.cfg.request_timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise Busy(f"query took longer than {self.cfg.request_timeout:g} s") from None

    def batched_text(self, text: str) -> np.ndarray:
        text = self.searcher.check_text(text)
        v = self.searcher.cached_text(text)
        if v is None:
            v = self.wait_batched("text", text)
            self.searcher.remember_text(text, v)
        return v

    def batched_search(self, sv: Served, vec: np.ndarray, k: int) -> list[Hit]:
        """An unfiltered search from a worker thread: through ``sv``'s search batcher (alone with ``max_batch`` 1)."""
        batcher = self.search_batchers.get(sv.name)
        if batcher is None:
            return sv.searcher.search_vector(vec, k)
        return self.wait_on(batcher, (vec, k, None))

    def batched_image(self, img: Image.Image) -> np.ndarray:
        return self.wait_batched("image", self.searcher.preprocess(img))

    def decode_and_preprocess(self, data: bytes, name: str) -> tuple[Image.Image, torch.Tensor]:
        img = self.decode_image(data, name)
        return img, self.searcher.preprocess(img)

    # --- answers ----------------------------------------------------------------------------------
    def client_gone(self, request: Request) -> Response:
        """A client that closed its connection mid-request: a normal event, counted, one debug line."""
        log.debug("client went away during %s %s", request.method, request.url.path)
        self.metrics.inc("clipforge_client_disconnects_total")
        return Response(status_code=499)

    def image_url(self, sv: Served, item_id: int, row: dict[str, Any]) -> str | None:
        if not sv.has_images or not row.get("image_path"):
            return None
        return f"/items/{item_id}/image" + ("" if sv is self.default else f"?index={urllib.parse.quote(sv.name)}")

    def result(self, sv: Served, h: Hit) -> dict[str, Any]:
        r = h.row
        return {"id": h.id, "score": round(h.score, 6), "key": public_path(r.get("key")), "caption": r.get("caption"),
                "width": r.get("width"), "height": r.get("height"), "image_url": self.image_url(sv, h.id, r)}

    def respond(self, sv: Served, query: dict[str, Any], k: int, hits: list[Hit], t0: float) -> dict[str, Any]:
        if len(self.served) > 1:
            query = {**query, "index": sv.name}
        return {"query": query, "k": k, "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "results": [self.result(sv, h) for h in hits]}

    def parse_search(self, body: bytes) -> tuple[Served, dict[str, Any], int, str | None, int | None, list | None]:
        """Parse and validate a JSON /search body: (index, query as echoed, k, text or None, item id
        or None, filter predicates or None)."""
        data = parse_json(body)
        if not isinstance(data, dict):
            raise QueryError("request body must be a JSON object like {\"text\": \"...\", \"k\": 10}")
        unknown = set(data) - {"text", "item_id", "k", "filter", "index"}
        if unknown:
            raise QueryError(f"unknown field(s) {sorted(unknown)}; use text or item_id, k, filter and index")
        sv = self.pick(data.get("index"))
        preds = sv.searcher.parse_filter(data["filter"]) if "filter" in data else None
        searcher = self.searcher
        k = searcher.check_k(whole(data.get("k", 10)))
        text, item_id = data.get("text"), whole(data.get("item_id"))
        if (text is None) == (item_id is None):
            raise QueryError("give exactly one of 'text' or 'item_id' (or upload an image as multipart)")
        if text is not None:
            if isinstance(text, str):
                check_unicode(text)
            text, n = searcher.text_tokens(text)
            query = {"type": "text", "text": text}
            if n > searcher.context_length:
                query["truncated_from_tokens"] = n
            return sv, query, k, text, None, preds
        item_id = sv.searcher.check_id(item_id)
        return sv, {"type": "item", "item_id": item_id}, k, None, item_id, preds

    def health(self) -> dict[str, Any]:
        cfg, searcher, info = self.cfg, self.searcher, self.searcher.index.info
        return {"status": "ok", "items": searcher.index.count(), "kind": info["kind"], "name": self.default.name,
                "index": {"backend": info.get("backend", "faiss"), "type": info["type"], "factory": info["factory"],
                          "nprobe": info["params"].get("nprobe"),
                          "recall_at_10": info.get("recall_at_10"), "mmap": searcher.index.mmap},
                "model": searcher.model.config.name, "model_matches_index": searcher.model_matches,
                "max_k": searcher.max_k, "max_upload_bytes": cfg.max_upload_bytes,
                "max_json_bytes": cfg.max_json_bytes, "uploads": self.uploads, "workers": cfg.workers,
                "request_timeout_s": cfg.request_timeout, "query_cache": searcher.cache_stats,
                "max_image_pixels": cfg.max_image_pixels,
                "batching": {"max_batch": cfg.max_batch, "wait_ms": cfg.batch_wait_ms, "exact": cfg.exact_batches,
                             "batch_searches": bool(self.search_batchers),
                             "encode_threads": cfg.encode_threads or torch.get_num_threads(),
                             **{k: {"batches": b.batches, "items": b.items, "queued": b.depth}
                                for k, b in self.batchers.items()},
                             "search": {"batches": sum(b.batches for b in self.search_batchers.values()),
                                        "items": sum(b.items for b in self.search_batchers.values()),
                                        "queued": sum(b.depth for b in self.search_batchers.values())}},
                "auth": cfg.auth_token is not None,
                "indices": [{"name": sv.name, "items": sv.searcher.index.count(), "kind": sv.searcher.index.info["kind"],
                             "backend": sv.searcher.index.info.get("backend", "faiss")}
                            for sv in self.served.values()]}


async def client_left(request: Request) -> None:
    """Completes when the client goes away (its body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


