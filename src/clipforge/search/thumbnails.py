"""Thumbnails of collection items, read from the original image file or from the tar shard that
holds it. Each :class:`Thumbnailer` keeps its own caches (tar member offsets, recent JPEGs).

An original that was removed, truncated or replaced after indexing is a 404 naming the item's
key, never the server's path (that goes to the log); one whose header declares more than
``max_pixels`` pixels is a 413 before any pixel is decoded."""

from __future__ import annotations

import io
import logging
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from ..preprocess import load_image
from ..utils import fs_name
from .http import DEFAULT_MAX_IMAGE_PIXELS, check_pixels, public_path
from .searcher import QueryError

log = logging.getLogger("clipforge.search.thumbnails")


class ThumbnailError(ValueError):
    """The item has no image, or its original cannot be read; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


class Thumbnailer:
    def __init__(self, size: int = 256, cache_items: int = 512, quality: int = 85,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.size = size
        self.max_pixels = max_pixels
        self.quality = quality
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_items = cache_items
        self._tars: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def _tar_index(self, path: str) -> dict[str, tuple[int, int]]:
        """member name -> (data offset, size), built once per shard (a tar has no central directory)."""
        with self._lock:
            idx = self._tars.get(path)
            if idx is not None:
                self._tars.move_to_end(path)
                return idx
        with tarfile.open(path, "r:") as tf:
            idx = {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
        with self._lock:
            self._tars[path] = idx
            while len(self._tars) > 16:
                self._tars.popitem(last=False)
        return idx

    def original_bytes(self, row: dict[str, Any]) -> bytes:
        path, member = row.get("image_path"), row.get("member")
        what = f"item {public_path(row.get('key'))!r}"
        if not path:
            raise ThumbnailError(f"{what} has no image")
        path, member = fs_name(path), fs_name(member) if member else member  # stored as text: back to the bytes
        try:
            if member:
                idx = self._tar_index(path)
                if member not in idx:
                    log.info("thumbnail of %s: member %r not found in %s", what, member, path)
                    raise ThumbnailError(f"the original image of {what} is gone")
                off, size = idx[member]
                with open(path, "rb") as f:
                    f.seek(off)
                    return f.read(size)
            return Path(path).read_bytes()
        except FileNotFoundError:
            log.info("thumbnail of %s: %s is gone", what, path)
            raise ThumbnailError(f"the original image of {what} is gone") from None
        except (OSError, tarfile.TarError) as e:
            log.warning("thumbnail of %s: cannot read %s: %s", what, path, e)
            raise ThumbnailError(f"the original image of {what} cannot be read") from None

    def thumbnail(self, item_id: int, row: dict[str, Any], size: int | None = None) -> bytes:
        """JPEG bytes, longer side <= ``size`` (never upscaled)."""
        size = size or self.size
        key = (item_id, size)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        data = self.original_bytes(row)
        what = f"item {public_path(row.get('key'))!r}"
        try:
            check_pixels(data, what, self.max_pixels)
            img = load_image(data, name=what)
        except QueryError as e:
            if e.status == 413:
                raise ThumbnailError(f"the original image of {e}", status=413) from None
            log.warning("thumbnail of %s: %s is no longer a readable image", what, row.get("image_path"))
            raise ThumbnailError(f"the original image of {what} is no longer readable") from None
        except ValueError:
            log.warning("thumbnail of %s: %s is no longer a readable image", what, row.get("image_path"))
            raise ThumbnailError(f"the original image of {what} is no longer readable") from None
        img = img.convert("RGB")
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=self.quality, optimize=True)
        out = buf.getvalue()
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self._cache_items:
                self._cache.popitem(last=False)
        return out
