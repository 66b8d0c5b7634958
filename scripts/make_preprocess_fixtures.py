"""Generate preprocessing parity fixtures with the real torchvision pipeline (OpenAI CLIP's).

Run with an interpreter that has torchvision (never a dependency of clipforge itself):

    /opt/refenv/bin/python scripts/make_preprocess_fixtures.py [--out tests/fixtures/preprocess]

It draws small deterministic images from a seed (no external data), saves them in many modes and
formats, and stores what OpenAI's transform

    Compose([Resize(n, BICUBIC), CenterCrop(n), lambda im: im.convert("RGB"), ToTensor(), Normalize(mean, std)])

returns for each of them (float32, in ``reference.npz``), plus ``manifest.json`` (library versions,
file and decoded-pixel hashes, which reference belongs to which case). ``tests/test_preprocess.py``
compares clipforge's Pillow+torch transform against these tensors.

Keys of ``reference.npz``: ``<case>/<variant>/<n>`` with variant
  eval      the pipeline above on the image as Pillow opens it
            (EXIF case: on ``ImageOps.exif_transpose`` of it; 16-bit case: on the 8-bit image the
            16-bit one encodes, see below: clipforge's documented deviations)
  squash    ``Resize((n, n), BICUBIC)`` instead of Resize + CenterCrop
  bilinear  the pipeline with ``InterpolationMode.BILINEAR``
  padcrop   ``CenterCrop(n)`` alone (no resize) with n larger than a side: zero padding
  train     OpenCLIP's train transform ``RandomResizedCrop(n, scale=(0.9, 1.0), BICUBIC)``; only on
            images wider than 4:3/0.9 (or taller), where it always takes its deterministic
            central-crop fallback, so the output does not depend on torch's RNG
  rcrop     ``F.resized_crop`` with the fixed (top, left, height, width) in the case's
            ``rcrop_params`` (the crop-then-resize step of the train transform)
  saturate  (16-bit case only) the unmodified pipeline, which saturates 16-bit values at 255;
            kept to show that clipforge deliberately differs there
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.transforms import (CenterCrop, Compose, InterpolationMode, Normalize, RandomResizedCrop, Resize,
                                    ToTensor)
from torchvision.transforms import functional as F

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, clip/clip.py
STD = (0.26862954, 0.26130258, 0.27577711)
SEED = 20240601
REPO = Path(__file__).resolve().parents[1]


def openai_transform(n: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> Compose:
    """clip/clip.py ``_transform`` (its ``_convert_image_to_rgb`` is ``image.convert("RGB")``)."""
    return Compose([Resize(n, interpolation=interpolation), CenterCrop(n),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])


def squash_transform(n: int) -> Compose:
    return Compose([Resize((n, n), interpolation=InterpolationMode.BICUBIC),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])


def padcrop_transform(n: int) -> Compose:
    return Compose([CenterCrop(n), lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])


def train_transform(n: int) -> Compose:
    """OpenCLIP's training transform (open_clip/transform.py, default scale)."""
    return Compose([RandomResizedCrop(n, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])


def scene(rng: np.random.Generator, w: int, h: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients + hard-edged shapes + mild noise, uint8 [h, w, c]: exercises interpolation
    (edges make bicubic overshoot, so clipping at 0/255 is tested) while keeping PNGs tiny."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((h, w, channels), dtype=np.float64)
    for c in range(channels):
        a, b, p = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0, 2 * np.pi)
        out[..., c] = 128 + 90 * np.sin(a * xx / max(w, 1) * 4 + b * yy / max(h, 1) * 4 + p)
    for _ in range(3):  # rectangles and discs with saturated colours
        col = rng.choice([0, 255], size=channels)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, max(3, min(w, h) / 3))
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * 0.6)
        out[mask] = col
    out += rng.integers(-2, 3, size=out.shape)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def save(img: Image.Image, path: Path, **kw) -> None:
    buf = io.BytesIO()
    img.save(buf, **kw)
    path.write_bytes(buf.getvalue())


def build_images(out: Path) -> dict[str, dict]:
    """Write the input images; return case -> {file, opener, variants, sizes, note}."""
    rng = np.random.default_rng(SEED)
    cases: dict[str, dict] = {}

    def add(name: str, img: Image.Image, fmt: str, sizes=(32, 64), variants=("eval",), note: str = "", **kw):
        path = out / f"{name}.{ {'PNG': 'png', 'JPEG': 'jpg', 'TIFF': 'tif'}[fmt] }"
        save(img, path, format=fmt, **kw)
        cases[name] = {"file": path.name, "sizes": list(sizes), "variants": list(variants), "note": note}

    add("rgb_wide_97x61", Image.fromarray(scene(rng, 97, 61)), "PNG", sizes=(32, 64, 224),
        variants=("eval", "squash", "bilinear", "train"), note="landscape, odd sizes")
    add("rgb_tall_45x150", Image.fromarray(scene(rng, 45, 150)), "PNG",
        variants=("eval", "squash", "bilinear", "padcrop", "train"),
        note="portrait, odd width")
    add("rgb_square_64", Image.fromarray(scene(rng, 64, 64)), "PNG", variants=("eval", "rcrop"),
        note="already 64x64: Resize is a no-op at 64")
    cases["rgb_square_64"]["rcrop_params"] = [3, 5, 57, 52]
    add("rgb_small_20x27", Image.fromarray(scene(rng, 20, 27)), "PNG", sizes=(32, 64, 224),
        variants=("eval", "squash", "padcrop"), note="smaller than every crop: upsampled")
    add("rgb_tiny_3x2", Image.fromarray(scene(rng, 3, 2)), "PNG", note="extreme aspect, 3x2 pixels")
    add("l_83x59", Image.fromarray(scene(rng, 83, 59, 1)[..., 0], "L"), "PNG", variants=("eval", "bilinear"))
    la = np.dstack([scene(rng, 70, 50, 1)[..., 0], scene(rng, 70, 50, 1)[..., 0]])
    add("la_70x50", Image.fromarray(la, "LA"), "PNG", note="alpha dropped by convert('RGB'), premultiplied resize")
    rgb = Image.fromarray(scene(rng, 90, 66))
    add("p_palette_90x66", rgb.quantize(colors=48, method=Image.Quantize.MEDIANCUT), "PNG",
        variants=("eval", "padcrop"), note="palette: Pillow resizes P with NEAREST")
    p = Image.fromarray(scene(rng, 60, 80)).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    add("p_transparent_60x80", p, "PNG", transparency=3, note="palette PNG with tRNS transparency")
    add("rgba_77x100", Image.fromarray(scene(rng, 77, 100, 4), "RGBA"), "PNG", variants=("eval", "squash"),
        note="RGBA with varying alpha")
    add("cmyk_88x64", Image.fromarray(scene(rng, 88, 64, 4), "CMYK"), "TIFF", compression="tiff_adobe_deflate")
    gray = scene(rng, 71, 53, 1)[..., 0]
    bw = gray > np.median(gray)
    add("bw_1bit_71x53", Image.fromarray(bw).convert("1"), "PNG", variants=("eval", "padcrop"),
        note="1-bit: Pillow resizes mode 1 with NEAREST")
    # 16-bit grayscale whose values are k*257 + d (|d| <= 128): scaling to 8 bits gives exactly k.
    k = scene(rng, 60, 45, 1)[..., 0].astype(np.int64)
    d = rng.integers(-128, 129, size=k.shape)
    v = np.clip(k * 257 + d, 0, 65535).astype(np.uint16)
    v[k == 0] = np.clip(d[k == 0], 0, 128).astype(np.uint16)
    add("i16_60x45", Image.fromarray(v), "PNG", variants=("eval", "saturate"),
        note="16-bit: deviation, reference = pipeline on the 8-bit image k encoded as k*257+d")
    np.save(out / "_i16_k.npy", k.astype(np.uint8))  # temporary, removed after use
    # EXIF orientation 6 (rotate 90 CW to display): stored 80x50, displayed 50x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif_rot6_80x50", Image.fromarray(scene(rng, 80, 50)), "JPEG", quality=90, exif=exif.tobytes(),
        note="deviation: reference = pipeline on ImageOps.exif_transpose(image)")
    add("jpeg_progressive_96x72", Image.fromarray(scene(rng, 96, 72)), "JPEG", quality=85, progressive=True,
        variants=("eval", "bilinear"))
    add("jpeg_gray_50x70", Image.fromarray(scene(rng, 50, 70, 1)[..., 0], "L"), "JPEG", quality=90)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "preprocess")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + list(out.glob("*.jpg")) + list(out.glob("*.tif")):
        old.unlink()
    cases = build_images(out)
    k16 = np.load(out / "_i16_k.npy")
    (out / "_i16_k.npy").unlink()

    refs: dict[str, np.ndarray] = {}
    transforms: dict[str, Callable[[int], Compose]] = {
        "eval": openai_transform, "squash": squash_transform, "padcrop": padcrop_transform,
        "bilinear": lambda n: openai_transform(n, InterpolationMode.BILINEAR), "saturate": openai_transform,
        "train": train_transform,
    }
    for name, case in cases.items():
        path = out / case["file"]
        with Image.open(path) as im:
            im.load()
            case["mode"], case["size"], case["format"] = im.mode, list(im.size), im.format
            if name.startswith("exif_"):
                case["exif_orientation"] = im.getexif().get(0x0112)
                im = ImageOps.exif_transpose(im)
            case["decoded_sha256"] = hashlib.sha256(im.tobytes()).hexdigest()
            case["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            case["file_bytes"] = path.stat().st_size
            for variant in case["variants"]:
                src = im
                if name.startswith("i16_") and variant == "eval":
                    src = Image.fromarray(k16, "L")  # the documented 16 -> 8 bit expectation
                sizes = case["sizes"]
                if variant == "padcrop":  # crops that need padding in one or both dimensions
                    sizes = sorted({n for n in (32, 64, 101, *sizes) if n > min(im.size)})
                for n in sizes:
                    if variant == "rcrop":
                        crop = F.resized_crop(src, *case["rcrop_params"], [n, n], InterpolationMode.BICUBIC)
                        t = Compose([ToTensor(), Normalize(MEAN, STD)])(crop.convert("RGB"))
                    elif variant == "train":
                        torch.manual_seed(0)
                        t = transforms[variant](n)(src)
                        torch.manual_seed(1)
                        assert torch.equal(t, transforms[variant](n)(src)), "train fallback must not be random"
                    else:
                        t = transforms[variant](n)(src)
                    assert t.dtype == torch.float32 and t.shape == (3, n, n), (name, variant, t.shape)
                    refs[f"{name}/{variant}/{n}"] = t.numpy()
    np.savez_compressed(out / "reference.npz", **refs)
    manifest = {
        "generator": "scripts/make_preprocess_fixtures.py",
        "seed": SEED,
        "pipeline": "torchvision Compose([Resize(n, BICUBIC), CenterCrop(n), convert('RGB'), ToTensor(), "
                    "Normalize(OPENAI_MEAN, OPENAI_STD)])",
        "mean": MEAN,
        "std": STD,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "Pillow": PIL.__version__, "numpy": np.__version__},
        "cases": cases,
        "keys": sorted(refs),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{len(cases)} images, {len(refs)} reference tensors, {total / 1024:.0f} KiB in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
