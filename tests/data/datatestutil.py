"""Builders for tiny on-disk datasets used by the clipforge.data tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from PIL import Image


def image_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 10),
                fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def colour_of(i: int) -> tuple[int, int, int]:
    """A colour that encodes a small integer (to recognise a sample from its pixels)."""
    return (i % 256, (i // 256) % 256, 77)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str | None, *, img: bytes | None = None, ext: str = "jpg",
                   as_json: bool = False, extra_json: dict | None = None) -> list[tuple[str, bytes]]:
    """img2dataset layout: <key>.jpg + <key>.txt (or the caption in <key>.json)."""
    out: list[tuple[str, bytes]] = []
    if img is not None:
        out.append((f"{key}.{ext}", img))
    if caption is not None and not as_json:
        out.append((f"{key}.txt", caption.encode()))
    meta = dict(extra_json or {}, key=key, status="success")
    if as_json and caption is not None:
        meta["caption"] = caption
    out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def make_shards(root: Path, n_shards: int, per_shard: int, *, fmt: str = "JPEG") -> list[str]:
    """n_shards good shards 00000.tar... with keys SSSSSIIII and caption 'caption <key>'."""
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            members += sample_members(key, f"caption {key}",
                                      img=image_bytes(colour_of(s * per_shard + i), fmt=fmt),
                                      ext="jpg" if fmt == "JPEG" else "png")
        paths.append(str(write_tar(root / f"{s:05d}.tar", members)))
    return paths


def char_tokenize(texts: list[str], length: int = 128) -> torch.Tensor:
    """A reversible stand-in tokenizer (character codes) so tests can read captions back."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [ord(c) for c in t[:length]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def char_decode(ids: torch.Tensor) -> list[str]:
    return ["".join(chr(int(v)) for v in row if int(v) != 0) for row in ids]


def tiny_transform(img: Image.Image, rng=None) -> torch.Tensor:
    """4x4 RGB tensor; with an rng, adds a seeded offset so augmentation determinism is visible."""
    x = torch.from_numpy(__import__("numpy").asarray(img.convert("RGB").resize((4, 4)), dtype="float32").copy())
    x = x.permute(2, 0, 1) / 255.0
    if rng is not None:
        x = x + rng.random()
    return x
