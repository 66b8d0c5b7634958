"""Embeddings for curation: a small ``Embedder`` interface over a CLIP model (so tests and
other tools can plug in a stand-in), and reading / writing embedding folders through the one
store, :mod:`clipforge.embeddings` (``clipforge embed``'s layout, which is clip-retrieval's:
``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``; our done-markers and manifest when
``clipforge embed`` wrote it; :func:`write_embeddings` writes parts without them, as clip-retrieval does).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from ..embeddings import Collection, write_part
from ..inference import embed_images, embed_texts
from ..preprocess import image_transform
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
        self.model = model.eval()
        self.preprocess = preprocess or image_transform(model.config.preprocess)
        self.name = name or getattr(model.config, "name", "") or "clip"
        self.batch_size, self.text_batch_size = batch_size, text_batch_size

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return embed_images(self.model, [pil_rgb(im) for im in images], preprocess=self.preprocess,
                            batch_size=self.batch_size).numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return embed_texts(self.model, list(texts), batch_size=self.text_batch_size).numpy()


# ----------------------------------------------------------------------------- embedding folders
# One store for everyone: clipforge.embeddings reads and writes the folders (ours and clip-retrieval's).

def read_embeddings(folder: str | os.PathLike, kind: str = "img") -> tuple[list[str], np.ndarray]:
    """All ``(keys, embeddings float32 [n, D])`` of an embedding folder (``clipforge embed``'s, or
    clip-retrieval's ``img_emb``/``text_emb`` + ``metadata``), finished shards in order.
    Raises naming the file on any mismatch."""
    if kind not in ("img", "text"):
        raise ValueError(f"kind must be 'img' or 'text', got {kind!r}")
    coll = Collection.open(folder, {"img": "image", "text": "text"}[kind])
    unfinished = coll.unfinished_shards()
    if unfinished:
        logger.warning("%s: %d unfinished embedding part(s) ignored (e.g. %s)", folder, len(unfinished),
                       unfinished[0].name)
    return coll.read_all()


def write_embeddings(folder: str | os.PathLike, keys: Sequence[str], img: np.ndarray, text: np.ndarray | None = None,
                     part: int = 0) -> None:
    """Write one part in clip-retrieval's layout (float16 rows; metadata ``key`` = ``image_path``)."""
    write_part(folder, part, keys, image=np.asarray(img), text=None if text is None else np.asarray(text))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)
