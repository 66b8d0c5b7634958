"""Builders for tiny curation pools (img2dataset-layout shards) and honest stand-in embedders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40),
           "white": (245, 245, 245), "black": (10, 10, 10)}


def png(img: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def solid(colour: str, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[colour])


def pattern(seed: int, size: int = 32) -> Image.Image:
    """A random 4x4 block pattern (upsampled): distinct seeds give nearly orthogonal 8x8 embeddings."""
    a = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST)


def near_copy(img: Image.Image, seed: int, noise: float = 6.0, size: int | None = None) -> Image.Image:
    """Slightly noised (and optionally resized) copy: a near duplicate, never pixel-identical."""
    a = np.asarray(img, dtype=np.float32)
    a = a + np.random.default_rng(1000 + seed).normal(0, noise, a.shape)
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return out.resize((size, size), Image.Resampling.BILINEAR) if size else out


def write_shard(path: Path, samples: list[tuple[str, bytes | None, str | None]], ext: str = "png",
                extra: dict[str, bytes] | None = None) -> Path:
    """img2dataset layout: {key}.{ext} + {key}.txt + {key}.json; None image/caption = member left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, img, cap in samples:
            members = []
            if img is not None:
                members.append((f"{key}.{ext}", img))
            if cap is not None:
                members.append((f"{key}.txt", cap.encode()))
            members.append((f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def read_shard_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def out_keys(folder: Path) -> set[str]:
    keys = set()
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as tf:
            keys |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
    return keys


class ColourEmbedder:
    """Stand-in CLIP whose towers agree on colour: an image maps to the one-hot of its nearest
    palette colour, a caption to the one-hot of the colour word it contains (a caption naming
    no colour maps to a fixed unrelated direction). Matching pairs score 1, mismatches 0."""

    name = "colour-stand-in"

    def __init__(self) -> None:
        self.names = list(COLOURS)
        self.rgb = np.array([COLOURS[n] for n in self.names], dtype=np.float32)
        self.calls = 0

    def embed_images(self, images) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(images), len(self.names) + 1), np.float32)
        for i, im in enumerate(images):
            mean = np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
            out[i, int(np.argmin(((self.rgb - mean) ** 2).sum(1)))] = 1
        return out

    def embed_texts(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), len(self.names) + 1), np.float32)
        for i, t in enumerate(texts):
            words = t.lower().split()
            hit = [k for k, n in enumerate(self.names) if n in words]
            out[i, hit[0] if hit else len(self.names)] = 1
        return out


class TinyImageEmbedder:
    """Stand-in image embedding: the image downsampled to 8x8 RGB, mean-centred, L2-normalised.
    Noised/resized copies stay close (cosine ~0.99); unrelated random patterns are near 0."""

    name = "downsample-8x8"

    def embed_images(self, images) -> np.ndarray:
        rows = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32).ravel()
            a = a - a.mean()
            rows.append(a / max(np.linalg.norm(a), 1e-6))
        return np.stack(rows)

    def embed_texts(self, texts) -> np.ndarray:  # pragma: no cover - image-only stand-in
        raise NotImplementedError
