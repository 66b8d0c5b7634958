"""Image loading and preprocessing with Pillow and torch only (no torchvision).

The evaluation transform reproduces OpenAI's pipeline step for step (``Resize`` of the shorter
side with bicubic interpolation, ``CenterCrop``, convert to RGB, ``ToTensor``, ``Normalize``) so
that its output is pixel-identical for the same PIL image; the order matters (resizing happens
in the image's own mode, before the RGB conversion, exactly as there).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import PreprocessConfig

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageLoadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


def load_image(source: str | Path | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image, applying its EXIF orientation.

    Raises :class:`ImageLoadError` naming the file for missing, unreadable or truncated images
    (Pillow would otherwise fail lazily, deep inside a later transform).
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {label}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {label}: {e}") from None
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (``I;16*``, ``I``) scaled to 8 bits instead of saturating at 255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), mode="L")
    return img


def resize_shorter(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (longer side truncated, as torchvision computes it)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to ``size`` x ``size`` (zero padding where the image is smaller)."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new(img.mode, (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor ``[3, H, W]`` (ToTensor + Normalize)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return x.sub_(m).div_(s)


@dataclass
class Preprocess:
    """Callable PIL image -> ``[3, S, S]`` tensor for a model's :class:`PreprocessConfig`.

    ``train=True`` gives the training augmentation: a random resized crop covering 90-100% of
    the image (OpenCLIP's default scale) instead of the centre crop.
    """

    config: PreprocessConfig
    train: bool = False
    train_scale: tuple[float, float] = (0.9, 1.0)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(img).__name__}; use load_image()")
        cfg = self.config
        size, resample = cfg.image_size, _RESAMPLE[cfg.interpolation]
        img = _to_8bit(img)
        if self.train:
            img = self._random_resized_crop(img, size, resample, rng or random)
        elif cfg.resize_mode == "squash":
            img = img.resize((size, size), resample)
        else:
            img = center_crop(resize_shorter(img, size, resample), size)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return to_tensor(img, cfg.mean, cfg.std)

    def _random_resized_crop(self, img: Image.Image, size: int, resample: int, rng: random.Random) -> Image.Image:
        w, h = img.size
        area = w * h
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(*self.train_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return img.resize((size, size), resample, box=(left, top, left + cw, top + ch))
        return center_crop(resize_shorter(img, size, resample), size)

    def __repr__(self) -> str:
        c = self.config
        mode = "train (random resized crop)" if self.train else f"eval ({c.resize_mode})"
        return (f"Preprocess({mode}, size={c.image_size}, interpolation={c.interpolation}, "
                f"mean={c.mean}, std={c.std})")


def image_transform(config: PreprocessConfig, train: bool = False) -> Preprocess:
    """The preprocessing callable for a model config's ``preprocess`` section."""
    return Preprocess(config, train=train)
