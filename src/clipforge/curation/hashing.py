"""Exact-duplicate fingerprints: decoded pixels (so the same image re-encoded losslessly or
stored under another name is caught, while a resized or re-compressed copy is left to the
near-duplicate search)."""

from __future__ import annotations

import hashlib

from PIL import Image

from .records import pil_rgb
from .text import caption_hash

__all__ = ["pixel_hash", "caption_hash"]


def pixel_hash(img: Image.Image) -> str:
    """sha1 of the RGB pixels at native size (size included, so a 2x8 and a 4x4 image with the
    same bytes differ)."""
    rgb = pil_rgb(img)
    h = hashlib.sha1(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
