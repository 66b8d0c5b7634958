"""Image loading and preprocessing with Pillow and torch only (no torchvision).

The evaluation transform reproduces OpenAI's pipeline step for step (``Resize`` of the shorter
side with bicubic interpolation, ``CenterCrop``, convert to RGB, ``ToTensor``, ``Normalize``) and
its output is bit-identical (max abs difference 0) to torchvision's for the same PIL image in
every mode OpenAI's pipeline handles (RGB, L, LA, P with or without transparency, RGBA, CMYK,
1-bit, JPEG baseline/progressive; checked against stored torchvision outputs in
``tests/fixtures/preprocess``). The order matters: resizing happens in the image's own mode,
before the RGB conversion, exactly as there (so P and 1-bit images are resized with NEAREST,
because Pillow does that, and alpha is dropped without compositing).

Deliberate deviations from ``transform(Image.open(path))``:

* ``load_image`` applies the EXIF orientation (a phone photo with orientation 6 is rotated
  upright); OpenAI's code ignores it and feeds the sideways image. Output equals torchvision's
  pipeline applied to ``ImageOps.exif_transpose(image)``.
* 16-bit grayscale (``I;16*``, or ``I`` with values above 255) is scaled to 8 bits
  (``round(v * 255 / 65535)``) before the transform; OpenAI's ``convert("RGB")`` would clip every
  value above 255 to white. 32-bit float (``F``) images are min-max scaled to 0..255.
* The training transform is OpenCLIP's default (``RandomResizedCrop(scale=(0.9, 1.0),
  ratio=(3/4, 4/3))``, always bicubic, then RGB, ToTensor, Normalize): same sampling rule and
  central-crop fallback, same crop-then-resize, but it draws from a ``random.Random`` instead of
  torch's global generator, so crops are reproducible from a seed without touching torch's RNG.
"""

from __future__ import annotations

import io
import math
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from .augment import AugmentationConfig, color_jitter, grayscale, random_erase
from .config import PreprocessConfig
from .utils import text_name

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


class ImageLoadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


def load_image(source: str | Path | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image, applying its EXIF orientation.

    Raises :class:`ImageLoadError` naming the file (``name``, the path, or the file object's
    name) for missing, unreadable, truncated or corrupt images: Pillow would otherwise fail
    lazily, deep inside a later transform, and its plugins raise many exception types. A corrupt
    EXIF block alone is not an error: the pixels are used as stored. The returned image holds
    no open file.
    """
    label = text_name(name or (str(source) if isinstance(source, (str, Path))
                               else str(getattr(source, "name", None) or "<bytes>")))
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    opened = None
    try:
        if isinstance(fp, (str, Path)):
            fp = opened = _open_regular(fp, label)
        with Image.open(fp) as im:
            im.load()
            try:
                img = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - malformed EXIF: keep the decoded pixels as stored
                img = im.copy()
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {label}") from None
    except ImageLoadError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, EOFError, struct.error, bomb errors...
        # Pillow names an in-memory file by its repr ("<_io.BytesIO object at 0x...>"): say which file it is
        detail = str(e).replace(repr(fp), label) if not isinstance(fp, (str, Path)) else str(e)
        raise ImageLoadError(f"cannot decode image {label}: {type(e).__name__}: {detail}") from e
    finally:
        if opened is not None:
            opened.close()
    return img


def _open_regular(path: str | Path, label: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. Opened non-blocking, then checked on
    the descriptor: a FIFO named ``x.jpg`` would otherwise block ``open`` (or the first read)
    forever, and a device could be read without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "not a regular file"
            raise ImageLoadError(f"cannot read image {label}: {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
    """Centre crop to ``size`` x ``size``, zero-padding sides that are shorter (torchvision's rule)."""
    w, h = img.size
    if w < size or h < size:
        pad_l, pad_t = max(size - w, 0) // 2, max(size - h, 0) // 2
        pad_r, pad_b = (max(size - w, 0) + 1) // 2, (max(size - h, 0) + 1) // 2
        bands = len(img.getbands())
        fill: int | tuple[int, ...] = 0 if bands == 1 else (0,) * bands
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=(pad_l, pad_t, pad_r, pad_b), fill=fill)
        if palette is not None:
            img.putpalette(palette)  # index 0 padding keeps the source palette (older Pillow drops it)
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_params(width: int, height: int, rng: random.Random,
                               scale: tuple[float, float] = (0.9, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` by torchvision's ``RandomResizedCrop.get_params`` rule.

    Up to 10 draws of area fraction and log-uniform aspect ratio; if none fits, the central crop
    of the whole image with its aspect clamped to ``ratio`` (for photos wider than 4:3 at
    scale >= 0.9 this fallback is what always happens, in torchvision too).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, top: int, left: int, height: int, width: int, size: int,
                 resample: int) -> Image.Image:
    """Crop then resize to ``size`` x ``size`` (two steps, as torchvision: the filter never reads
    pixels outside the crop, unlike ``Image.resize(box=...)``)."""
    img = img.crop((left, top, left + width, top + height))
    return img if img.size == (size, size) else img.resize((size, size), resample)


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
    the image (OpenCLIP's default scale) instead of the centre crop, or what ``aug`` says (crop
    scale/ratio/interpolation, colour jitter, grayscale, random erasing: :mod:`clipforge.augment`).
    Pass ``rng`` (a seeded ``random.Random``) for reproducible draws; without it the ``random``
    module is used.
    """

    config: PreprocessConfig
    train: bool = False
    train_scale: tuple[float, float] = (0.9, 1.0)
    aug: AugmentationConfig | None = None

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(img).__name__}; use load_image()")
        cfg = self.config
        size, resample = cfg.image_size, _RESAMPLE[cfg.interpolation]
        img = _to_8bit(img)
        if self.train:
            return self._train(img, rng or random)  # type: ignore[arg-type]
        if cfg.resize_mode == "squash":
            img = img.resize((size, size), resample)
        else:
            img = center_crop(resize_shorter(img, size, resample), size)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return to_tensor(img, cfg.mean, cfg.std)

    def _train(self, img: Image.Image, rng: random.Random | ModuleType) -> torch.Tensor:
        """The training transform; an option that is off draws nothing (so the default's draws,
        and the crops of earlier runs, are unchanged). The crop is bicubic whatever
        ``config.interpolation`` says, as OpenCLIP's train transform, unless ``aug`` names one."""
        cfg, aug = self.config, self.aug or AugmentationConfig(scale=self.train_scale)
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, aug.scale, aug.ratio)  # type: ignore[arg-type]
        img = resized_crop(img, top, left, h, w, cfg.image_size, _RESAMPLE[aug.interpolation])
        if img.mode != "RGB":
            img = img.convert("RGB")
        if aug.color_jitter is not None and rng.random() < aug.color_jitter_prob:
            img = color_jitter(img, aug.color_jitter, rng)  # type: ignore[arg-type]
        if aug.gray_scale_prob > 0 and rng.random() < aug.gray_scale_prob:
            img = grayscale(img)
        x = to_tensor(img, cfg.mean, cfg.std)
        if aug.re_prob > 0 and rng.random() < aug.re_prob:
            x = random_erase(x, rng, aug.re_count)  # type: ignore[arg-type]
        return x

    def __repr__(self) -> str:
        c = self.config
        mode = "train (random resized crop)" if self.train else f"eval ({c.resize_mode})"
        return (f"Preprocess({mode}, size={c.image_size}, interpolation={c.interpolation}, "
                f"mean={c.mean}, std={c.std})")


def image_transform(config: PreprocessConfig, train: bool = False, aug: AugmentationConfig | None = None) -> Preprocess:
    """The preprocessing callable for a model config's ``preprocess`` section (``aug``: the
    training augmentation, default OpenCLIP's crop scale 0.9-1)."""
    return Preprocess(config, train=train, aug=aug)
