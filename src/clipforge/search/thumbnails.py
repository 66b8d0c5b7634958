"""Thumbnails of collection items, read from the original image file or from the tar shard that
holds it. Each :class:`Thumbnailer` keeps its own caches (tar member offsets, recent JPEGs)."""

from __future__ import annotations

import io
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from ..preprocess import load_image


class ThumbnailError(ValueError):
    """The item has no image, or its original cannot be read; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


class Thumbnailer:
    def __init__(self, size: int = 256, cache_items: int = 512, quality: int = 85) -> None:
        self.size = size
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
        if not path:
            raise ThumbnailError(f"item {row.get('key')!r} has no image")
        try:
            if member:
                idx = self._tar_index(path)
                if member not in idx:
                    raise ThumbnailError(f"member {member!r} not found in {path}")
                off, size = idx[member]
                with open(path, "rb") as f:
                    f.seek(off)
                    return f.read(size)
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise ThumbnailError(f"original image of item {row.get('key')!r} is gone: {path}") from None
        except (OSError, tarfile.TarError) as e:
            raise ThumbnailError(f"cannot read the original of item {row.get('key')!r}: {e}", status=500) from None

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
        try:
            img = load_image(data, name=str(row.get("image_path")))
        except ValueError as e:
            raise ThumbnailError(str(e), status=500) from None
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
