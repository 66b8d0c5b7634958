"""Zero-shot classification: a linear head built from text.

Every class name is put into every template; the embeddings of one class's prompts are
L2-normalised, averaged and re-normalised (ensembling in embedding space, as in the paper), so
the head costs one ``[C, D]`` matrix however many templates were used. Building the head is the
expensive part (ImageNet: 1,000 classes x 80 templates = 80k prompts through the text tower), so
heads are cached on disk keyed by a hash of the text tower's weights, the class names and the
templates; a second build of the same task never touches the text tower.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..inference import embed_images, embed_texts
from ..longtext import encode_text_long
from ..tokenizer import DEFAULT_OVERLAP
from ..utils import atomic_write_bytes
from .cache import default_cache_dir, json_hash, text_tower_fingerprint
from .prompts import ClassName, class_texts, load_classnames, load_templates

CACHE_FORMAT = 1


def embed_texts_length_sorted(model: nn.Module, texts: Sequence[str], *, batch_size: int = 256,
                              progress: bool = False, long_text: str | None = None,
                              overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """Unit-norm text embeddings in input order, computed in batches of similar token length.

    The text tower trims every batch to its longest prompt, so batching prompts of similar length
    avoids paying for padding; :func:`clipforge.inference.embed_texts` does exactly that (sorts
    by length, restores the order), so this is a named alias for the call evaluation relies on.
    ``long_text``: texts longer than the context (:mod:`clipforge.longtext`); None truncates silently."""
    if long_text is not None:
        return encode_text_long(model, list(texts), long_text=long_text, overlap=overlap, batch_size=batch_size,
                                progress=progress)
    return embed_texts(model, list(texts), batch_size=batch_size, progress=progress)


def prompts_for(classnames: Sequence[ClassName], templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """All prompts (class-major) and the class index of each."""
    texts: list[str] = []
    owner: list[int] = []
    for c, cn in enumerate(classnames):
        for name in class_texts(cn):
            for t in templates:
                texts.append(t.replace("{}", name, 1))
                owner.append(c)
    return texts, owner


def build_zeroshot_weights(model: nn.Module, classnames: Sequence[ClassName], templates: Sequence[str], *,
                           batch_size: int = 256, progress: bool = False, long_text: str | None = None,
                           overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """``[C, D]`` unit-norm class embeddings (prompt ensemble averaged in embedding space).

    Prompts are embedded one template at a time: the prompts of one template share their first
    tokens ("a photo of a"), which the text tower then computes once per batch (exact, because
    attention is causal), and within a template they are batched by length."""
    if not classnames:
        raise ValueError("no class names given")
    owner: list[int] = []
    names: list[str] = []
    for c, cn in enumerate(classnames):
        for name in class_texts(cn):
            names.append(name)
            owner.append(c)
    index = torch.as_tensor(owner)
    weights: torch.Tensor | None = None
    for t in tqdm(templates, desc="zero-shot head (templates)", unit="tpl", disable=not progress):
        emb = embed_texts_length_sorted(model, [t.replace("{}", n, 1) for n in names], batch_size=batch_size,
                                        long_text=long_text, overlap=overlap)  # unit rows
        if weights is None:
            weights = torch.zeros(len(classnames), emb.shape[1], dtype=torch.float32)
        weights.index_add_(0, index, emb.float())
    assert weights is not None
    return F.normalize(weights, dim=-1)


class ZeroShotClassifier:
    """A zero-shot head over ``model``: ``predict_proba(images)`` -> ``[N, C]``.

    ``images`` may be PIL images, preprocessed ``[3,S,S]`` tensors / a ``[N,3,S,S]`` batch, or
    precomputed image features ``[N, D]`` (tensor or array). ``templates`` is a built-in set name,
    a file (one template per line with ``{}``) or a list; ``classnames`` likewise (a class can be
    a list of synonyms). ``cache_dir=None`` uses :func:`default_cache_dir`/``zeroshot``;
    ``use_cache=False`` disables the disk cache.
    """

    def __init__(self, model: nn.Module, classnames: str | Sequence[ClassName], templates: str | Sequence[str] = "imagenet",
                 *, preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
                 cache_dir: str | Path | None = None, use_cache: bool = True, batch_size: int = 256,
                 progress: bool = False, long_text: str | None = None, long_text_overlap: int = DEFAULT_OVERLAP,
                 _weights: torch.Tensor | None = None) -> None:
        self.model = model
        self.classnames = load_classnames(classnames)
        self.templates = load_templates(templates)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.progress = progress
        self.long_text, self.long_text_overlap = long_text, long_text_overlap
        self.cache_hit = False
        self.cache_path: Path | None = None
        t0 = time.perf_counter()
        self.text_fingerprint = text_tower_fingerprint(model)
        if _weights is not None:
            self.weights = _weights
        else:
            self.weights = self._build(Path(cache_dir) if cache_dir else default_cache_dir() / "zeroshot", use_cache)
        self.build_seconds = time.perf_counter() - t0

    # --- construction ----------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        key = {"format": CACHE_FORMAT, "text": self.text_fingerprint,
               "classes": self.classnames, "templates": self.templates}
        if self.long_text == "chunks":  # other modes give the historical (truncated) head or refuse
            key["long_text"] = ["chunks", self.long_text_overlap]
        return json_hash(key)

    def _build(self, cache_dir: Path, use_cache: bool) -> torch.Tensor:
        path = cache_dir / f"{self.cache_key}.safetensors"
        if use_cache:
            self.cache_path = path
            if path.is_file():
                try:
                    w, meta = _read_head(path)
                    if meta.get("classnames") == self.classnames and meta.get("templates") == self.templates:
                        self.cache_hit = True
                        return w
                except (ValueError, OSError):
                    pass  # a corrupt cache entry is rebuilt and overwritten
        w = build_zeroshot_weights(self.model, self.classnames, self.templates, batch_size=self.batch_size,
                                   progress=self.progress, long_text=self.long_text,
                                   overlap=self.long_text_overlap)
        if use_cache:
            _write_head(path, w, self._meta())
        return w

    def _meta(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "classnames": self.classnames, "templates": self.templates,
                "text_fingerprint": self.text_fingerprint}

    def save(self, path: str | Path) -> None:
        """Write the built head (weights, class names, templates, text-tower hash) as safetensors."""
        _write_head(Path(path), self.weights, self._meta())

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, preprocess: Callable | None = None,
             strict: bool = True) -> "ZeroShotClassifier":
        """Load a head saved with :meth:`save`. ``strict`` checks it was built by this model's text tower."""
        w, meta = _read_head(Path(path))
        clf = cls(model, meta["classnames"], meta["templates"], preprocess=preprocess, use_cache=False, _weights=w)
        if strict and meta.get("text_fingerprint") != clf.text_fingerprint:
            raise ValueError(f"{path}: zero-shot head was built with a different text tower "
                             f"(hash {str(meta.get('text_fingerprint'))[:12]} != {clf.text_fingerprint[:12]}); "
                             "pass strict=False to use it anyway")
        return clf

    # --- inference -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    @property
    def logit_scale(self) -> float:
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().exp()) if isinstance(ls, torch.Tensor) else 100.0

    def image_features(self, images: Any) -> torch.Tensor:
        """Unit-norm ``[N, D]`` image features for any accepted input form."""
        d = self.weights.shape[1]
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.asarray(images))
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            if images.ndim == 2:
                if images.shape[1] != d:
                    raise ValueError(f"features have dim {images.shape[1]}, the zero-shot head expects {d}")
                return F.normalize(images.float(), dim=-1)
            if images.ndim == 3:
                images = images.unsqueeze(0)
            if images.ndim != 4:
                raise ValueError(f"expected features [N,{d}] or images [N,3,H,W], got shape {tuple(images.shape)}")
        return embed_images(self.model, images, preprocess=self.preprocess, batch_size=self.batch_size,
                            progress=self.progress)

    def logits(self, images: Any) -> torch.Tensor:
        return self.logit_scale * self.image_features(images) @ self.weights.t()

    def predict_proba(self, images: Any) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)

    def predict(self, images: Any) -> torch.Tensor:
        return self.logits(images).argmax(dim=-1)

    def __repr__(self) -> str:
        return (f"ZeroShotClassifier(classes={self.num_classes}, templates={len(self.templates)}, "
                f"cache_hit={self.cache_hit})")


def _write_head(path: Path, weights: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    data = save({"weights": weights.detach().float().contiguous().cpu()},
                metadata={"clipforge_zeroshot": json.dumps(meta)})
    atomic_write_bytes(path, data)


def _read_head(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no zero-shot head file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["clipforge_zeroshot"])
            w = f.get_tensor("weights")
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a clipforge zero-shot head (missing {e})") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        if isinstance(e, (FileNotFoundError, ValueError)):
            raise
        raise ValueError(f"{path}: unreadable zero-shot head ({e})") from None
    return w, meta
