"""Training-time image augmentation, configured by open_clip's ``AugmentationCfg`` names
(``--aug-cfg scale=(0.5,1) color_jitter=0.4 ...``), in Pillow and torch only.

Order as open_clip's (torchvision) training transform: random resized crop (``scale``,
``ratio``, ``interpolation``) -> RGB -> colour jitter with probability ``color_jitter_prob``
(brightness, contrast, saturation, hue, applied in a random order as torchvision's
``ColorJitter``) -> grayscale with probability ``gray_scale_prob`` -> tensor, normalised ->
random erasing with probability ``re_prob``, ``re_count`` rectangles (timm's ``RandomErasing``
in its default ``const`` mode: the rectangle set to 0 in normalised space, i.e. the mean colour;
open_clip only has it on its timm path). Every draw comes from the ``random.Random`` the data
loader gives each sample (seeded by run seed and sample), so augmentation is reproducible and
never touches torch's generator.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class AugmentationConfig:
    """open_clip's ``AugmentationCfg`` fields (and ``interpolation`` of the crop). Defaults are
    clipforge's training transform before this option existed: crop scale 0.9-1, nothing else."""

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 1.0  # when color_jitter is set
    gray_scale_prob: float = 0.0
    re_prob: float = 0.0
    re_count: int = 1
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"aug_cfg: {key}: {msg} (got {getattr(self, key)!r})")

        for key in ("scale", "ratio"):
            v = getattr(self, key)
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)):
                raise bad(key, "needs two numbers, e.g. (0.5, 1.0)")
            object.__setattr__(self, key, (float(v[0]), float(v[1])))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise bad("scale", "needs 0 < min <= max <= 1 (fractions of the image area)")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise bad("ratio", "needs 0 < min <= max (aspect ratios w/h)")
        cj = self.color_jitter
        if cj is not None:
            if isinstance(cj, (int, float)):
                cj = (cj, cj, cj, 0.0)  # open_clip: one number = brightness, contrast and saturation
            if not (isinstance(cj, (tuple, list)) and len(cj) in (3, 4) and all(isinstance(x, (int, float)) for x in cj)):
                raise bad("color_jitter", "needs one number or 3-4 numbers (brightness, contrast, saturation[, hue])")
            cj = tuple(float(x) for x in cj) + ((0.0,) if len(cj) == 3 else ())
            if min(cj) < 0 or cj[3] > 0.5:
                raise bad("color_jitter", "strengths must be >= 0 and hue <= 0.5")
            object.__setattr__(self, "color_jitter", cj)
        for key in ("color_jitter_prob", "gray_scale_prob", "re_prob"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise bad(key, "must be a probability in [0, 1]")
            object.__setattr__(self, key, float(v))
        if not (isinstance(self.re_count, int) and self.re_count >= 1):
            raise bad("re_count", "must be an integer >= 1")
        if self.interpolation not in INTERPOLATIONS:
            raise bad("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AugmentationConfig":
        """From a mapping of open_clip's names (``None`` values mean the default); unknown keys
        are an error naming them. String values are read as Python literals (``"(0.5, 1)"``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in (d or {}).items():
            k = str(key).replace("-", "_")
            if k not in known:
                raise ValueError(f"aug_cfg: unknown key {key!r}; known: {', '.join(sorted(known))}")
            if value is not None:
                clean[k] = parse_value(value) if k != "interpolation" else value
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (the run's record stays short)."""
        default = AugmentationConfig()
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def parse_value(value: Any) -> Any:
    """``"0.4"`` -> 0.4, ``"(0.5,1)"`` -> (0.5, 1); non-strings unchanged; other text kept as text."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    try:
        out = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return value
    return tuple(out) if isinstance(out, list) else out


def parse_key_values(items: list[str]) -> dict[str, Any]:
    """``["scale=(0.5,1)", "re_prob=0.25"]`` -> ``{"scale": (0.5, 1.0), "re_prob": 0.25}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"aug_cfg: expected key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


# --- the operations (each draws from ``rng`` only) ---------------------------------------------
def color_jitter(img: Image.Image, strengths: tuple[float, float, float, float], rng: random.Random) -> Image.Image:
    """torchvision's ``ColorJitter`` on an RGB image: factors uniform in ``[max(0, 1-s), 1+s]``
    (hue shift uniform in ``[-h, h]`` turns), the four adjustments in a random order."""
    b, c, s, h = strengths
    ops = []
    if b > 0:
        ops.append(("brightness", rng.uniform(max(0.0, 1 - b), 1 + b)))
    if c > 0:
        ops.append(("contrast", rng.uniform(max(0.0, 1 - c), 1 + c)))
    if s > 0:
        ops.append(("saturation", rng.uniform(max(0.0, 1 - s), 1 + s)))
    if h > 0:
        ops.append(("hue", rng.uniform(-h, h)))
    rng.shuffle(ops)
    for name, f in ops:
        if name == "brightness":
            img = ImageEnhance.Brightness(img).enhance(f)
        elif name == "contrast":
            img = ImageEnhance.Contrast(img).enhance(f)
        elif name == "saturation":
            img = ImageEnhance.Color(img).enhance(f)
        else:
            img = shift_hue(img, f)
    return img


def shift_hue(img: Image.Image, turns: float) -> Image.Image:
    """Rotate the hue by ``turns`` of the colour wheel (in HSV, as torchvision does for PIL)."""
    hsv = np.array(img.convert("HSV"), dtype=np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(turns * 255))) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def grayscale(img: Image.Image) -> Image.Image:
    """Luma (ITU-R 601-2, Pillow's ``L``) in all three channels."""
    return img.convert("L").convert("RGB")


def random_erase(x: torch.Tensor, rng: random.Random, count: int = 1,
                 area: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """Set ``count`` random rectangles of the normalised image ``[3, H, W]`` to 0 (timm's
    ``RandomErasing`` ``const`` mode: per rectangle up to 10 draws of area fraction and
    log-uniform aspect until one fits)."""
    _, height, width = x.shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(count):
        for _ in range(10):
            target = height * width * rng.uniform(*area)
            aspect = math.exp(rng.uniform(*log_ratio))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w < width and 0 < h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                x[:, top:top + h, left:left + w] = 0.0
                break
    return x


__all__ = ["AugmentationConfig", "parse_key_values", "parse_value", "color_jitter", "shift_hue", "grayscale",
           "random_erase", "INTERPOLATIONS"]
