"""HTTP plumbing of the search service, shared by its own API and clip-retrieval's: the error
body every 4xx/5xx carries, a request-body cap applied before bodies are read, strict JSON
parsing (4xx for every malformed body), and the bounded worker pool with a per-request timeout
that keeps parsing, tokenizing and model calls off the event loop."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import logging
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..preprocess import ImageLoadError, load_image
from .searcher import QueryError

log = logging.getLogger("clipforge.search.http")
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def multipart_available() -> bool:
    """python-multipart, imported the way Starlette imports it (``multipart`` alone is another package)."""
    for name in ("python_multipart", "multipart.multipart"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "parse_options_header") or name == "python_multipart":
            return True
    return False


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed back (``"\\ud800"``) cannot break encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a one-line message, and per-field details for validation errors."""

    detail: str
    errors: list[dict[str, Any]] | None = None


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "malformed body (not JSON, not UTF-8, nested too deeply, empty upload)",
    401: "missing or wrong bearer token (servers started with a token)",
    404: "unknown item or index",
    413: "body or image too large",
    415: "unsupported content type (or uploads disabled)",
    422: "invalid query",
    503: "server busy or query timed out",
}.items()}


def error_response(status: int, message: str, errors: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse({"detail": message, "errors": errors}, status_code=status, headers=headers)


class Busy(Exception):
    """The worker pool is saturated or the request outlived its timeout (503)."""


@dataclass
class Limits:
    max_json_bytes: int
    max_upload_bytes: int
    max_base64_bytes: int  # /knn-service and /metadata: images travel base64 inside the JSON


class BodyLimit:
    """Pure ASGI middleware: refuse request bodies over the limit for their route and type
    before the app reads them (no buffering, no parsing, nothing on the event loop)."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app, self.limits = app, limits

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        """(bytes allowed, what the limit is called in the 413 message)."""
        path = scope.get("path", "")
        if path in ("/knn-service", "/metadata"):
            return self.limits.max_base64_bytes, f"the limit of {self.limits.max_base64_bytes} bytes " \
                f"(base64 images up to {self.limits.max_upload_bytes} bytes)"
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype == b"multipart/form-data":  # the file plus the form's own fields and framing
            return self.limits.max_upload_bytes + 65536, f"the limit of {self.limits.max_upload_bytes} bytes " \
                "for uploads"
        return self.limits.max_json_bytes, f"the limit of {self.limits.max_json_bytes} bytes for JSON bodies"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, what = self.limit_for(scope)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await error_response(400, f"bad Content-Length header {length[:40]!r}")(scope, receive, send)
            if int(length) > limit:
                return await error_response(413, f"request body of {int(length)} bytes exceeds {what}")(
                    scope, receive, send)
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge(what)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracking_send)
        except _TooLarge as e:
            if not started:
                await error_response(413, f"request body exceeds {e.what}")(scope, receive, send)


class _TooLarge(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def find_too_large(e: BaseException) -> _TooLarge | None:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, _TooLarge):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def parse_json(body: bytes) -> Any:
    """Strict JSON from bytes; every failure is a 400 naming the problem."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QueryError(f"request body is not UTF-8 (byte {e.start})", status=400) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise QueryError("request body is nested too deeply", status=400) from None
    except ValueError as e:
        raise QueryError(f"request body is not valid JSON: {e}", status=400) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def whole(v: Any) -> Any:
    """JSON Schema's integers include 1.0: accept whole floats where an integer is declared."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def check_unicode(text: str, field: str = "text") -> str:
    """Lone surrogates (``"\\ud800"``, legal in JSON escapes) are not text: refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QueryError(f"{field} contains an unpaired surrogate {text[e.start]!r} at position {e.start}") from None
    return text




def limit_image_pixels(max_pixels: int) -> None:
    """Pillow's own decompression-bomb limit set to the served one, its warning made an error
    (process-wide, as Pillow keeps both): the backstop behind :func:`check_pixels`."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def check_pixels(data: bytes, name: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header alone (Pillow opens lazily: no pixel is decoded);
    413 when it has more than ``max_pixels`` pixels, 415 when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's check at open
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = m.group(1) if m else "too many"
        raise QueryError(f"{name} has {n} pixels, over this server's limit of {max_pixels} pixels",
                         status=413) from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types for a non-image
        raise QueryError(f"upload is not a readable image: cannot decode image {name}: {type(e).__name__}",
                         status=415) from None
    if w * h > max_pixels:
        raise QueryError(f"{name} is {w}x{h} = {w * h} pixels, over this server's limit of {max_pixels} pixels",
                         status=413)
    return w, h


def decode_query_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A query image from bytes: 413 when its header declares too many pixels (checked before
    decoding), 415 when it is not an image."""
    check_pixels(data, name, max_pixels)
    try:
        img = load_image(data, name)
        img.load()
        return img
    except ImageLoadError as e:
        if isinstance(e.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise QueryError(f"uploaded image has too many pixels: {e}", status=413) from None
        raise QueryError(f"upload is not a readable image: {e}", status=415) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise QueryError(f"uploaded image has too many pixels: {e}", status=413) from None


def public_path(value: Any) -> Any:
    """A path as the API shows it: relative paths as they are, absolute ones reduced to their
    file name (a client never learns where the server keeps its files)."""
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or ":\\" in value[:3]):
        return os.path.basename(value.rstrip("/\\")) or None
    return value


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """Metadata for clients: ``image_path`` dropped (``key`` names the item), a shard member's
    tar named by file name only."""
    out = {k: v for k, v in row.items() if k not in ("image_path",)}
    if "key" in out:
        out["key"] = public_path(out["key"])
    return out


class WorkerPool:
    """``workers`` threads for CPU work; at most ``max_pending`` calls queued or running (503
    beyond), each awaited at most ``timeout`` seconds (503; the thread finishes in the background
    and keeps its slot until then, so a stuck query cannot let the queue grow without bound)."""

    def __init__(self, workers: int, max_pending: int, timeout: float,
                 initializer: Callable[[], None] | None = None) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipforge-serve",
                                           initializer=initializer)
        self.max_pending, self.timeout = max_pending, timeout
        self.pending = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self.pending >= self.max_pending:
                raise Busy(f"server busy: {self.pending} requests in progress; retry later")
            self.pending += 1

        def call() -> Any:
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self.pending -= 1

        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.executor.submit(call)), self.timeout)
        except asyncio.TimeoutError:
            raise Busy(f"query took longer than {self.timeout:g} s") from None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
