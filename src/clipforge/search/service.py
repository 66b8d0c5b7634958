"""HTTP search service (FastAPI): JSON API, thumbnails, and a static web page at ``/``.

``create_app`` loads the index once and wraps an already-loaded model, so tests build the app
in-process and ``clipforge serve`` runs the same app under uvicorn. Errors are JSON
(``{"detail": ...}``): 4xx for the caller's mistakes, 500 for anything else (the server lives on).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..preprocess import ImageLoadError, load_image
from .index import LoadedIndex
from .searcher import Hit, QueryError, Searcher
from .thumbnails import ThumbnailError, Thumbnailer

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("clipforge.search.service")


class SearchRequest(BaseModel):
    """Exactly one of ``text`` (a text query) or ``item_id`` (search by a result)."""

    text: str | None = Field(None, description="text query", examples=["a dog running on the beach"])
    item_id: int | None = Field(None, description="id of an indexed item: find similar items")
    k: int = Field(10, description="number of results")


class SearchResult(BaseModel):
    id: int
    score: float
    key: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    query: dict[str, Any]
    k: int
    took_ms: float
    results: list[SearchResult]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status)


def create_app(index: str | Path | LoadedIndex, model: torch.nn.Module,
               preprocess: Callable[[Image.Image], torch.Tensor] | None = None, *, max_k: int = 100,
               max_upload_bytes: int = 10 * 2**20, query_cache: int = 1024, thumb_size: int = 256,
               title: str = "clipforge search") -> FastAPI:
    """Build the service around ``model`` and the index at ``index`` (loaded here, once)."""
    searcher = Searcher(index, model, preprocess, max_k=max_k, query_cache=query_cache)
    thumbs = Thumbnailer(size=thumb_size)
    has_images = searcher.index.info["kind"] == "image"
    app = FastAPI(title=title, version="1", description=(
        "Semantic search over an embedded collection with a CLIP model: text queries, image "
        "uploads and search-by-result."))
    app.state.searcher = searcher
    app.state.max_upload_bytes = max_upload_bytes

    @app.middleware("http")
    async def never_die(request: Request, call_next):  # type: ignore[no-untyped-def]
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the service down
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    @app.exception_handler(QueryError)
    async def query_error(_: Request, e: QueryError) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(ThumbnailError)
    async def thumb_error(_: Request, e: ThumbnailError) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = jsonable_encoder(e.errors(), custom_encoder={Exception: str})
        msg = "; ".join(f"{'.'.join(str(p) for p in er.get('loc', ()))}: {er.get('msg')}" for er in errs)
        return _error(422, msg or "invalid request", errors=errs)

    def result(h: Hit) -> dict[str, Any]:
        r = h.row
        return {"id": h.id, "score": round(h.score, 6), "key": r.get("key"), "caption": r.get("caption"),
                "width": r.get("width"), "height": r.get("height"),
                "image_url": f"/items/{h.id}/image" if has_images and r.get("path") else None}

    def respond(query: dict[str, Any], k: int, hits: list[Hit], t0: float) -> dict[str, Any]:
        return {"query": query, "k": k, "took_ms": round(1000 * (time.perf_counter() - t0), 2),
                "results": [result(h) for h in hits]}

    search_body = {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary", "description": "query image"},
                               "k": {"type": "integer", "default": 10}}}},
        },
    }

    @app.post("/search", response_model=SearchResponse, openapi_extra={"requestBody": search_body},
              summary="Search by text, by an uploaded image, or by an indexed item",
              responses={404: {"description": "unknown item_id"}, 413: {"description": "upload too large"},
                         415: {"description": "unsupported content type"}, 422: {"description": "bad query"}})
    async def search(request: Request) -> Any:
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = await request.json()
            except ValueError as e:
                return _error(400, f"request body is not valid JSON: {e}")
            if not isinstance(body, dict):
                return _error(422, "request body must be a JSON object like {\"text\": \"...\", \"k\": 10}")
            unknown = set(body) - {"text", "item_id", "k"}
            if unknown:
                return _error(422, f"unknown field(s) {sorted(unknown)}; use text or item_id, and k")
            k = searcher.check_k(body.get("k", 10))
            if ("text" in body) == ("item_id" in body):
                return _error(422, "give exactly one of 'text' or 'item_id' (or upload an image as multipart)")
            if "text" in body:
                text = searcher.check_text(body["text"])
                hits = await run_in_threadpool(searcher.search_text, text, k)
                return respond({"type": "text", "text": text}, k, hits, t0)
            item_id = searcher.check_id(body["item_id"])
            hits = await run_in_threadpool(searcher.search_item, item_id, k)
            return respond({"type": "item", "item_id": item_id}, k, hits, t0)
        if ctype == "multipart/form-data":
            limit = app.state.max_upload_bytes
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limit + 65536:
                return _error(413, f"upload of {int(length)} bytes exceeds the limit of {limit} bytes")
            form = await request.form(max_files=1, max_fields=4)
            try:
                upload = form.get("image") or form.get("file")
                if upload is None or isinstance(upload, str):
                    return _error(422, "multipart request needs an 'image' file field")
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
                return _error(413, f"upload exceeds the limit of {limit} bytes")
            if not data:
                return _error(400, "uploaded file is empty")
            name = upload.filename or "upload"
            try:
                img = await run_in_threadpool(load_image, data, name)
            except ImageLoadError as e:
                return _error(415, f"upload is not a readable image: {e}")
            except Image.DecompressionBombError as e:
                return _error(413, f"uploaded image has too many pixels: {e}")
            hits = await run_in_threadpool(searcher.search_image, img, k)
            return respond({"type": "image", "filename": name, "width": img.width, "height": img.height},
                           k, hits, t0)
        return _error(415, f"unsupported content type {ctype or '(none)'!r}: send application/json "
                           "or multipart/form-data with an 'image' file")

    @app.get("/items/{item_id}", summary="Metadata of one indexed item")
    async def item(item_id: int) -> dict[str, Any]:
        meta = searcher.item(item_id)
        meta["image_url"] = f"/items/{item_id}/image" if has_images and meta.get("path") else None
        return meta

    @app.get("/items/{item_id}/image", summary="JPEG thumbnail of an item, from its original file or shard",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def item_image(item_id: int, size: int | None = None) -> Response:
        if size is not None and not 16 <= size <= 1024:
            raise QueryError(f"size must be between 16 and 1024, got {size}")
        meta = searcher.item(item_id)
        if not has_images:
            raise ThumbnailError(f"item {item_id} is a text; this index holds no images")
        data = await run_in_threadpool(thumbs.thumbnail, item_id, meta, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/health", summary="Liveness and what is loaded")
    async def health() -> dict[str, Any]:
        info = searcher.index.info
        return {"status": "ok", "items": searcher.index.ntotal, "kind": info["kind"],
                "index": {"type": info["type"], "factory": info["factory"], "nprobe": info["params"].get("nprobe"),
                          "recall_at_10": info.get("recall_at_10"), "mmap": searcher.index.mmap},
                "model": model.config.name, "model_matches_index": searcher.model_matches,
                "max_k": searcher.max_k, "max_upload_bytes": app.state.max_upload_bytes,
                "query_cache": searcher.cache_stats}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

