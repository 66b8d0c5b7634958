"""HTTP search service (FastAPI): JSON API, thumbnails, a static web page at ``/``, and
clip-retrieval's back-end API (:mod:`.clip_back_api`: ``/knn-service``, ``/indices-list``,
``/metadata``) so its ``ClipClient`` and front end work against a clipforge index. The plumbing
both use (body cap, strict JSON, error bodies, worker pool) is :mod:`.http`.

``create_app`` loads the index once and wraps an already-loaded model, so tests build the app
in-process and ``clipforge serve`` runs the same app under uvicorn.

Hostile input is cheap to refuse and never blocks the event loop:

- bodies are capped (``max_json_bytes`` for JSON, ``max_upload_bytes`` for uploads and for
  clip-retrieval's base64 images) before they are read: ``Content-Length`` over the cap -> 413 at
  once, a chunked body -> 413 as soon as the cap is passed;
- JSON parsing, tokenizing, embedding and searching run in a bounded thread pool
  (``workers`` threads, at most ``max_pending`` requests queued: 503 beyond) with a per-request
  ``request_timeout`` (503);
- every malformed body is a 4xx with ``{"detail": str, "errors": [...] | null}`` (the shape the
  OpenAPI schema declares): bad JSON, 100,000-deep nesting, lone surrogates, unknown fields.

Image uploads need python-multipart; without it (``uploads=None`` detects it) uploads are off,
multipart requests get 415 saying why, and the schema does not offer them.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import http  # noqa: F401  (clipforge.search.service.http: the plumbing module, as before the split)
from .clip_back_api import KNN_COLUMNS, add_clip_back_routes
from .filters import filter_schema
from .http import (DEFAULT_MAX_IMAGE_PIXELS, ERRORS, BodyLimit, Busy, Limits, SafeJSONResponse, check_unicode,
                   error_response, find_too_large, limit_image_pixels, public_row)
from .searcher import QueryError
from .served import IndexArg, Service, Settings, default_encode_threads, find_disconnect, load_served
from .thumbnails import ThumbnailError
from .vectors_api import add_vector_routes

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("clipforge.search.service")


def route_label(request: Request) -> str:
    """The route template (``/items/{item_id}``), not the raw path: bounded metric labels."""
    path = request.url.path
    for r in request.app.router.routes:
        match, _ = r.matches(request.scope) if hasattr(r, "matches") else (None, None)
        if match is not None and match.name == "FULL":
            return getattr(r, "path", path)
    return "other"



def search_request_schema(max_k: int, ntotal: int, filter_columns: dict[str, str] | None = None,
                          names: list[str] | None = None) -> dict[str, Any]:
    """The JSON /search body exactly as the handler takes it: one of text / item_id (the other
    absent or null), k within bounds, an optional metadata filter; a text longer than the
    model's context is truncated."""
    k = {"type": "integer", "minimum": 1, "maximum": max_k, "default": 10, "description": "number of results"}
    text = {"type": "string", "pattern": "\\S", "description": "text query (needs a non-space character; "
            "tokens beyond the model's context length are dropped, and the response says so)",
            "examples": ["a dog running on the beach"]}
    item = {"type": "integer", "minimum": 0, "maximum": max(ntotal - 1, 0),
            "description": "id of an indexed item: find similar items"}
    null = {"type": "null"}
    extra: dict[str, Any] = {"filter": filter_schema(filter_columns)} if filter_columns else {}
    if names:
        extra["index"] = {"type": "string", "enum": names, "description": "which index (default: the first)"}
    return {"title": "SearchRequest", "oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["text"],
         "properties": {"text": text, "item_id": null, "k": k, **extra}},
        {"type": "object", "additionalProperties": False, "required": ["item_id"],
         "properties": {"item_id": item, "text": null, "k": k, **extra}},
    ]}


class SearchResult(BaseModel):
    id: int
    score: float
    key: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    image_url: str | None = None


class FilterReport(BaseModel):
    matching: int | None = None   # items whose metadata passes the filter (FAISS)
    fetched: int                  # nearest neighbours fetched to find k of them (over-fetch)
    pushed_down: bool = False     # Milvus: the filter ran in Milvus as its expression


class SearchResponse(BaseModel):
    query: dict[str, Any]
    k: int
    took_ms: float
    results: list[SearchResult]
    filter: FilterReport | None = None


def create_app(index: IndexArg | dict[str, IndexArg], model: torch.nn.Module,
               preprocess: Callable[[Image.Image], torch.Tensor] | None = None, *, max_k: int = 100,
               max_upload_bytes: int = 10 * 2**20, max_json_bytes: int = 256 * 2**10, workers: int = 4,
               max_pending: int = 256, request_timeout: float = 30.0, query_cache: int = 1024,
               thumb_size: int = 256, title: str = "clipforge search", index_name: str | None = None,
               uploads: bool | None = None, max_result_ids: int = 10_000,
               knn_columns: tuple[str, ...] = KNN_COLUMNS, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               cors_origins: tuple[str, ...] = (), max_batch: int = 32, batch_wait_ms: float = 5.0,
               max_embed_items: int = 64, auth_token: str | None = None,
               exact_batches: bool = True, encode_threads: int | None = None, search_threads: int = 1,
               batch_searches: bool = True) -> FastAPI:
    """Build the service around ``model`` and the index at ``index`` (loaded here, once), or
several: ``{name: index}`` (the first is the default; requests choose with ``index`` /
clip-retrieval's ``indice_name``).

    ``max_image_pixels`` also becomes Pillow's process-wide limit (its bomb warning an error);
    ``cors_origins`` are the browser origins allowed to call the API (none by default; ``"*"`` any).
    Text and image queries are batched across requests (``max_batch`` items, waiting at most
    ``batch_wait_ms`` for a batch to fill; ``max_batch=1``: each alone); ``exact_batches``: in
    fixed-shape chunks, so a query's embedding has the same bits whatever batch it rode in
    (:mod:`.exact`; off: one model call per batch, faster, last bits vary); ``encode_threads``:
    torch threads of the encodes (None: torch's count; ``clipforge serve`` leaves a core to the
    event loop). ``batch_searches``: unfiltered searches of an exact (flat) index are batched the same
    way (``max_batch``, ``batch_wait_ms``): one read of the index per chunk of queries, each query's
    hits its own (:func:`.exact.search_flat_exact`); other searches run in the request workers.
    ``search_threads``: threads of each search (FAISS in a request worker, torch in a search batch). With ``auth_token`` every route but ``/health`` and the web page (``/``,
    ``/static/``) needs ``Authorization: Bearer <token>``."""
    cfg = Settings(max_k=max_k, max_upload_bytes=max_upload_bytes, max_json_bytes=max_json_bytes, workers=workers,
                   max_pending=max_pending, request_timeout=request_timeout, query_cache=query_cache,
                   thumb_size=thumb_size, max_result_ids=max_result_ids, knn_columns=knn_columns,
                   max_image_pixels=max_image_pixels, cors_origins=cors_origins, max_batch=max_batch,
                   batch_wait_ms=batch_wait_ms, max_embed_items=max_embed_items, auth_token=auth_token,
                   exact_batches=exact_batches, encode_threads=encode_threads, search_threads=search_threads,
                   batch_searches=batch_searches, uploads=uploads)
    cfg.check()
    uploads = cfg.resolve_uploads()
    limit_image_pixels(cfg.max_image_pixels)
    svc = Service(load_served(index, index_name, model, preprocess, cfg), cfg, uploads)
    app = FastAPI(title=title, version="1", default_response_class=SafeJSONResponse, lifespan=svc.lifespan,
                  description=(
        "Semantic search over an embedded collection with a CLIP model: text queries, image "
        "uploads and search-by-result. Also answers clip-retrieval's back-end API "
        "(/knn-service, /indices-list, /metadata)."))
    app.state.searcher = svc.searcher
    app.state.served = svc.served
    app.state.max_upload_bytes = cfg.max_upload_bytes
    app.state.uploads = uploads
    app.state.pool = svc.pool  # worker threads; shut down with the process (or by the embedding caller)
    app.state.metrics = svc.metrics
    app.state.batchers = svc.batchers
    app.state.search_batchers = svc.search_batchers
    add_middleware(app, svc)
    add_error_handlers(app, svc)
    add_search_route(app, svc)
    add_item_routes(app, svc)
    add_clip_back_routes(app, svc.served, svc.pool, max_upload_bytes=cfg.max_upload_bytes,
                         max_result_ids=cfg.max_result_ids, knn_columns=cfg.knn_columns, decode_image=svc.decode_image,
                         embed_text=svc.batched_text, embed_image=svc.batched_image, search_hits=svc.batched_search)
    add_vector_routes(app, svc.searcher, svc.pool, max_items=cfg.max_embed_items,
                      max_upload_bytes=cfg.max_upload_bytes, decode_image=svc.decode_image, encode=svc.encode_item)
    add_ops_routes(app, svc)
    return app


# --- route groups ---------------------------------------------------------------------------------


def open_path(path: str) -> bool:
    """Routes served without the token: liveness, and the web page with its assets (no data:
    the page asks for the token and sends it with every call)."""
    return path in ("/health", "/") or path.startswith("/static/")


def add_middleware(app: FastAPI, svc: Service) -> None:
    """CORS (opt-in), the body cap, and the outermost guard: the bearer token, metrics, and a 500
    (never a dropped connection) for anything unhandled."""
    cfg, metrics = svc.cfg, svc.metrics
    if cfg.cors_origins:  # e.g. clip-retrieval's front end served from another origin: opt-in, per origin
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization"])
    app.add_middleware(BodyLimit, limits=Limits(cfg.max_json_bytes, cfg.max_upload_bytes,
                                                max(cfg.max_json_bytes, cfg.max_upload_bytes * 4 // 3 + 65536)))
    auth_token = cfg.auth_token

    def authorized(header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), auth_token.encode())  # type: ignore[union-attr]

    @app.middleware("http")
    async def never_die(request: Request, call_next):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        route = route_label(request)
        if auth_token is not None and not open_path(request.url.path) and request.method != "OPTIONS" \
                and not authorized(request.headers.get("authorization", "")):
            metrics.inc("clipforge_requests_total", route=route, status="401")
            metrics.inc("clipforge_errors_total", kind="401")
            return error_response(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                                  headers={"WWW-Authenticate": "Bearer"})
        try:
            response = await call_next(request)
        except Exception as e:
            if find_too_large(e) is not None:
                metrics.inc("clipforge_errors_total", kind="body_too_large")
                raise  # BodyLimit answers 413
            if find_disconnect(e):
                return svc.client_gone(request)
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            metrics.inc("clipforge_errors_total", kind="internal")
            response = error_response(500, f"internal error: {type(e).__name__}: {e}")
        metrics.inc("clipforge_requests_total", route=route, status=str(response.status_code))
        metrics.observe("clipforge_request_seconds", time.perf_counter() - t0, route=route)
        if response.status_code >= 400:
            metrics.inc("clipforge_errors_total", kind=str(response.status_code))
        return response


def add_error_handlers(app: FastAPI, svc: Service) -> None:
    """Every error as ``{"detail", "errors"}`` with its status; a client that left as 499."""

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, _: ClientDisconnect) -> Response:
        return svc.client_gone(request)

    @app.exception_handler(QueryError)
    async def queryerror_response(_: Request, e: QueryError) -> JSONResponse:
        return error_response(e.status, str(e))

    @app.exception_handler(ThumbnailError)
    async def thumberror_response(_: Request, e: ThumbnailError) -> JSONResponse:
        return error_response(e.status, str(e))

    @app.exception_handler(Busy)
    async def busy(_: Request, e: Busy) -> JSONResponse:
        return error_response(503, str(e), headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = jsonable_encoder(e.errors(), custom_encoder={Exception: str})
        msg = "; ".join(f"{'.'.join(str(p) for p in er.get('loc', ()))}: {er.get('msg')}" for er in errs)
        return error_response(422, msg or "invalid request", errors=errs)


def search_body_content(svc: Service) -> dict[str, Any]:
    """The /search request body as the OpenAPI schema states it (JSON; multipart when uploads are on)."""
    served, max_k = svc.served, svc.cfg.max_k
    columns: dict[str, str] = {}
    for sv in served.values():
        columns = {**sv.searcher.filter_columns, **columns}
    json_body = {"schema": search_request_schema(max_k, max(sv.searcher.index.ntotal for sv in served.values()),
                                                 columns, sorted(served) if len(served) > 1 else None)}
    content: dict[str, Any] = {"application/json": json_body}
    if svc.uploads:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["image"], "additionalProperties": False,
            "properties": {"image": {"type": "string", "format": "binary", "description": "query image"},
                           "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": max_k}}}}
    return content


def add_search_route(app: FastAPI, svc: Service) -> None:
    """``POST /search``: a JSON text / item query (optionally filtered) or a multipart image upload."""
    offload, searcher = svc.offload, svc.searcher

    @app.post("/search", response_model=SearchResponse, openapi_extra={"requestBody": {
                  "required": True, "content": search_body_content(svc)}},
              summary="Search by text, by an uploaded image, or by an indexed item", responses=ERRORS)
    async def search(request: Request) -> Any:
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await request.body()
            sv, query, k, text, item_id, preds = await offload(svc.parse_search, body)
            s_ = sv.searcher
            if preds is not None:
                vec = await svc.text_vector(request, text) if text is not None else s_.index.vector(item_id)
                hits, report = await offload(s_.search_filtered, vec, k, preds, item_id)
                return {**svc.respond(sv, query, k, hits, t0), "filter": report}
            if text is not None:
                hits = await svc.search(request, sv, await svc.text_vector(request, text), k)
            else:
                hits = await svc.search(request, sv, await offload(s_.index.vector, item_id), k, exclude=item_id)
            return svc.respond(sv, query, k, hits, t0)
        if ctype == "multipart/form-data":
            if not svc.uploads:
                return error_response(415, "image uploads are disabled on this server (python-multipart is not installed); "
                                   "send application/json with 'text' or 'item_id'")
            return await upload_query(request, t0)
        return error_response(415, f"unsupported content type {ctype or '(none)'!r}: send application/json "
                           "or multipart/form-data with an 'image' file")

    async def upload_query(request: Request, t0: float) -> Any:
        limit = svc.cfg.max_upload_bytes
        try:
            form = await request.form(max_files=2, max_fields=16)
        except (StarletteHTTPException, ClientDisconnect):
            raise
        except Exception as e:
            if find_too_large(e) is not None:
                raise
            return error_response(400, f"malformed multipart body: {type(e).__name__}: {e}")
        try:
            unknown = sorted(set(form.keys()) - {"image", "file", "k", "index"})
            if unknown:
                return error_response(422, f"unknown form field(s) {unknown[:5]}; send 'image' (a file) and optionally "
                                           "'k' and 'index'")
            index_field = form.get("index")
            sv = svc.pick(index_field if isinstance(index_field, str) else None)
            upload = form.get("image") or form.get("file")
            if upload is None or isinstance(upload, str):
                return error_response(422, "multipart request needs an 'image' file field")
            k_field = form.get("k")
            try:
                k = int(k_field) if isinstance(k_field, str) and k_field.strip() else 10
            except ValueError:
                raise QueryError(f"k must be an integer, got {k_field!r}") from None
            k = searcher.check_k(k)
            data = await upload.read(limit + 1)
        finally:
            await form.close()
        if len(data) > limit:
            return error_response(413, f"upload exceeds the limit of {limit} bytes")
        if not data:
            return error_response(400, "uploaded file is empty")
        fname = upload.filename or "upload"
        img, x = await offload(svc.decode_and_preprocess, data, fname)
        hits = await svc.search(request, sv, await svc.image_vector(request, x), k)
        return svc.respond(sv, {"type": "image", "filename": check_unicode(fname, "filename"), "width": img.width,
                                "height": img.height}, k, hits, t0)


def add_item_routes(app: FastAPI, svc: Service) -> None:
    """``GET /items/{id}`` (metadata) and ``GET /items/{id}/image`` (a JPEG thumbnail)."""
    item_id_param = PathParam(..., ge=0, description="id of an indexed item")
    index_param = Query(None, description="which index (default: the first)",
                        json_schema_extra={"enum": sorted(svc.served)})

    @app.get("/items/{item_id}", summary="Metadata of one indexed item", responses=ERRORS)
    async def item(item_id: int = item_id_param, index: str | None = index_param) -> dict[str, Any]:
        sv = svc.pick(index)
        meta = sv.searcher.item(item_id)
        return {**public_row(meta), "image_url": svc.image_url(sv, item_id, meta)}

    @app.get("/items/{item_id}/image", summary="JPEG thumbnail of an item, from its original file or shard",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **ERRORS})
    async def item_image(item_id: int = item_id_param,
                         size: int | None = Query(None, ge=16, le=1024, description="longer side, pixels"),
                         index: str | None = index_param) -> Response:
        sv = svc.pick(index)
        meta = sv.searcher.item(item_id)
        if not sv.has_images:
            raise ThumbnailError(f"item {item_id} is a text; this index holds no images")
        data = await svc.offload(sv.thumbs.thumbnail, item_id, meta, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


def add_ops_routes(app: FastAPI, svc: Service) -> None:
    """``/health``, ``/metrics``, the web page and its static files."""

    @app.get("/health", summary="Liveness and what is loaded")
    async def health() -> dict[str, Any]:
        return svc.health()

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["create_app", "default_encode_threads"]
