"""Deterministic image distribution shifts (PIL/numpy only) for robustness evaluation.

Each shift is ``f(img, index, seed) -> img``; the only random one (noise) draws from a generator
seeded by ``(seed, index)``, so a shifted dataset is identical on every run and its features
can be cached. A spec may carry a severity: ``blur:3`` (radius px), ``noise:0.2`` (sigma as a
fraction of 255), ``jpeg:5`` (quality), ``lowres:8`` (down-scaling factor).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def grayscale(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    return _rgb(img).convert("L").convert("RGB")


def blur(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    """Gaussian blur; default radius scales with the image (1 px at 32 px, 2.5 px at 160 px)."""
    img = _rgb(img)
    radius = param if param is not None else max(1.0, min(img.size) / 64)
    return img.filter(ImageFilter.GaussianBlur(radius))


def noise(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    """Additive Gaussian pixel noise, sigma = ``param`` x 255 (default 0.15)."""
    sigma = 255.0 * (0.15 if param is None else param)
    rng = np.random.default_rng([seed, index])
    a = np.asarray(_rgb(img), dtype=np.float32)
    a = a + rng.normal(0.0, sigma, size=a.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    """Re-encode as JPEG at low quality (default 10)."""
    buf = io.BytesIO()
    _rgb(img).save(buf, format="JPEG", quality=int(10 if param is None else param))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def lowres(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    """Down-sample by ``param`` (default 4; at least 4 px a side), then back up (bilinear)."""
    img = _rgb(img)
    f = 4.0 if param is None else float(param)
    w, h = img.size
    small = img.resize((max(4, round(w / f)), max(4, round(h / f))), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def sketch(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    """Edge map drawn dark on white, a stand-in for ImageNet-Sketch style line drawings."""
    g = _rgb(img).convert("L").filter(ImageFilter.SMOOTH)
    edges = ImageOps.autocontrast(g.filter(ImageFilter.FIND_EDGES))
    return ImageOps.invert(edges).convert("RGB")


def invert(img: Image.Image, index: int = 0, seed: int = 0, param: float | None = None) -> Image.Image:
    return ImageOps.invert(_rgb(img))


SHIFTS: Mapping[str, Callable[..., Image.Image]] = MappingProxyType({
    "grayscale": grayscale, "blur": blur, "noise": noise, "jpeg": jpeg,
    "lowres": lowres, "sketch": sketch, "invert": invert,
})
ALIASES = MappingProxyType({"gray": "grayscale", "greyscale": "grayscale", "gaussian_noise": "noise",
                            "low_resolution": "lowres", "low-res": "lowres", "edges": "sketch",
                            "inversion": "invert", "color_inversion": "invert", "colour_inversion": "invert"})
DEFAULT_SHIFTS = tuple(SHIFTS)


def available_shifts() -> list[str]:
    return list(SHIFTS)


@dataclass(frozen=True)
class Shift:
    """A parsed shift spec, callable as a feature-extraction ``transform(img, index)``."""

    name: str
    param: float | None = None
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> "Shift":
        name, _, p = spec.strip().partition(":")
        key = ALIASES.get(name.lower(), name.lower())
        if key not in SHIFTS:
            raise ValueError(f"unknown shift {name!r}; available: {', '.join(SHIFTS)} (optionally name:severity)")
        try:
            param = float(p) if p else None
        except ValueError:
            raise ValueError(f"shift {spec!r}: severity {p!r} is not a number") from None
        return cls(key, param, seed)

    @property
    def label(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param:g}"

    def __call__(self, img: Image.Image, index: int = 0) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"shift {self.label} needs PIL images, got {type(img).__name__}")
        return SHIFTS[self.name](img, index, self.seed, self.param)


def parse_shifts(specs: str | list[str] | None, seed: int = 0) -> list[Shift]:
    """``"grayscale,blur:2"`` or a list -> shifts; ``None``/``"all"`` -> every built-in shift."""
    if specs is None or specs == "all" or specs == ["all"]:
        return [Shift(n, None, seed) for n in SHIFTS]
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return [Shift.parse(s, seed) for s in specs]
