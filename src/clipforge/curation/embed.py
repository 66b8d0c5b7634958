"""Embeddings for curation: a small ``Embedder`` interface over a CLIP model (so tests and
other tools can plug in a stand-in), and a reader for the folders ``clipforge embed`` writes.

``clipforge embed`` layout (see :mod:`clipforge.search.store`; :func:`write_embeddings` writes
the same embedding and metadata files, without manifest and done-markers)::

    OUT/img_emb/img_emb_00000.npy         float16 [n, D], L2-normalised rows
    OUT/metadata/metadata_00000.parquet   a ``key`` column (+ path, member, caption...), row-aligned
    OUT/done/shard_00000.json             done-marker: parts without one are unfinished and ignored
    OUT/manifest.json                     ``kind`` (image / text), model, dim
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from .records import pil_rgb

logger = logging.getLogger("clipforge.curation")


class Embedder(Protocol):
    """Maps images and texts into one space; outputs are L2-normalised float32 rows."""

    name: str

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class ClipEmbedder:
    """A clipforge CLIP model (+ its preprocessing) behind the :class:`Embedder` interface."""

    def __init__(self, model: Any, preprocess: Callable | None = None, *, name: str = "", batch_size: int = 64,
                 text_batch_size: int = 256) -> None:
        from ..preprocess import image_transform

        self.model = model.eval()
        self.preprocess = preprocess or image_transform(model.config.preprocess)
        self.name = name or getattr(model.config, "name", "") or "clip"
        self.batch_size, self.text_batch_size = batch_size, text_batch_size

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        from ..inference import embed_images

        return embed_images(self.model, [pil_rgb(im) for im in images], preprocess=self.preprocess,
                            batch_size=self.batch_size).numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from ..inference import embed_texts

        return embed_texts(self.model, list(texts), batch_size=self.text_batch_size).numpy()


def load_embedder(spec: str, *, random_init: bool = False, seed: int = 0, device: str = "cpu",
                  batch_size: int = 64) -> ClipEmbedder:
    """A checkpoint path (any format ``clipforge.load`` reads), or with ``random_init`` a zoo
    name built with random weights (throughput tests; no weights can be downloaded here)."""
    import clipforge

    if random_init:
        if spec not in clipforge.available_models():
            raise ValueError(f"--random-init needs a zoo model name, got {spec!r}; "
                             f"available: {', '.join(clipforge.available_models())}")
        model = clipforge.create_model(spec, seed=seed).to(device).eval()
        return ClipEmbedder(model, name=f"{spec} (random init, seed {seed})", batch_size=batch_size)
    if not Path(spec).exists():
        hint = " (a zoo name: add --random-init for an untrained model)" if spec in clipforge.available_models() else ""
        raise FileNotFoundError(f"model checkpoint not found: {spec}{hint}")
    model, preprocess = clipforge.load(spec, device=device)
    return ClipEmbedder(model, preprocess, name=str(Path(spec).resolve()), batch_size=batch_size)


# ----------------------------------------------------------------------------- embedding folders

def _read_keys(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet metadata needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=None)
        if "key" not in table.column_names:
            raise ValueError(f"{path}: no 'key' column; columns found: {table.column_names}")
        return [str(k) for k in table.column("key").to_pylist()]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]  # keys .txt fallback


def read_embeddings(folder: str | os.PathLike, kind: str = "img") -> tuple[list[str], np.ndarray]:
    """All ``(keys, embeddings float32 [n, D])`` of an embedding folder, parts in order.

    Each ``{kind}_emb/{kind}_emb_NNNNN.npy`` needs ``metadata/metadata_NNNNN.parquet`` (or
    ``.txt`` with one key per line) with as many rows. Raises naming the file on any mismatch.
    """
    root = Path(folder)
    emb_dir = root / f"{kind}_emb"
    if not emb_dir.is_dir():
        raise FileNotFoundError(f"embedding folder {root} has no {kind}_emb/ (expected clipforge embed output)")
    man_path = root / "manifest.json"
    if man_path.is_file():
        want = {"img": "image", "text": "text"}[kind]
        got = json.loads(man_path.read_text(encoding="utf-8")).get("kind")
        if got is not None and got != want:
            raise ValueError(f"{root} holds {got} embeddings; {want} embeddings are needed here")
    pat = re.compile(rf"^{kind}_emb_(\d+)\.npy$")
    parts = sorted((m.group(1), p) for p in emb_dir.iterdir() if (m := pat.match(p.name)))
    if (root / "done").is_dir():  # clipforge embed: a part is finished only with its done-marker
        unfinished = [p.name for num, p in parts if not (root / "done" / f"shard_{num}.json").is_file()]
        if unfinished:
            logger.warning("%s: %d unfinished embedding part(s) ignored (e.g. %s)", root, len(unfinished), unfinished[0])
        parts = [(num, p) for num, p in parts if (root / "done" / f"shard_{num}.json").is_file()]
    if not parts:
        raise FileNotFoundError(f"no finished {kind}_emb_*.npy files in {emb_dir}")
    keys: list[str] = []
    arrays: list[np.ndarray] = []
    dim = None
    for num, p in parts:
        meta = next((root / "metadata" / f"metadata_{num}{ext}" for ext in (".parquet", ".txt")
                     if (root / "metadata" / f"metadata_{num}{ext}").is_file()), None)
        if meta is None:
            raise FileNotFoundError(f"{p}: no matching {root / 'metadata' / f'metadata_{num}.parquet'}")
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
            raise ValueError(f"{p}: expected a [n, {dim or 'D'}] array, got shape {arr.shape}")
        dim = arr.shape[1]
        k = _read_keys(meta)
        if len(k) != len(arr):
            raise ValueError(f"{meta}: {len(k)} keys but {p.name} has {len(arr)} rows")
        keys.extend(k)
        arrays.append(arr.astype(np.float32))
    return keys, np.concatenate(arrays)


def write_embeddings(folder: str | os.PathLike, keys: Sequence[str], img: np.ndarray, text: np.ndarray | None = None,
                     part: int = 0) -> None:
    """Write one part in the ``clipforge embed`` layout (float16 rows; Parquet keys when pyarrow
    is importable, else a keys ``.txt``)."""
    from ..utils import atomic_open

    root = Path(folder)
    with atomic_open(root / "img_emb" / f"img_emb_{part:05d}.npy", "wb") as f:
        np.save(f, np.asarray(img, dtype=np.float16))
    if text is not None:
        with atomic_open(root / "text_emb" / f"text_emb_{part:05d}.npy", "wb") as f:
            np.save(f, np.asarray(text, dtype=np.float16))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        with atomic_open(root / "metadata" / f"metadata_{part:05d}.txt", "w", encoding="utf-8") as f:
            f.write("".join(f"{k}\n" for k in keys))
        return
    with atomic_open(root / "metadata" / f"metadata_{part:05d}.parquet", "wb") as f:
        pq.write_table(pa.table({"key": [str(k) for k in keys]}), f)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)
