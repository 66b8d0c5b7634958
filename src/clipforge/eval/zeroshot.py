"""Zero-shot classification: a linear head built from text.

Every class name is put into every template; the embeddings of one class's prompts are
L2-normalised, averaged and re-normalised (ensembling in embedding space, as in the paper), so
the head costs one ``[C, D]`` matrix however many templates were used. Building the head is the
expensive part (ImageNet: 1,000 classes x 80 templates = 80k prompts through the text tower), so
heads are cached on disk keyed by a hash of the text tower's weights, the class names and the
templates; a second build of the same task never touches the text tower.

Models trained with the paper's other two objectives (``config.objective``, see
:mod:`clipforge.models.heads`) are scored through the same :class:`ZeroShotClassifier`, which
chooses its objective's scorer (:mod:`.scorers`) once:

- ``bow``: the score of class ``c`` is the mean over the prompt's content tokens of ``log p(token
  | image)`` under the head's predicted distribution (the prompt's bag), averaged over the
  templates (and synonyms). That is linear in the log-probabilities, so the head is again a
  ``[C, V]`` matrix (:func:`build_bow_weights`: each class's mean normalised bag) and the scores
  are ``log_softmax(head(image)) @ weights.T``.
- ``caption``: the score is the decoder's mean per-token log-likelihood of the prompt given the
  image (:func:`.scorers.caption_log_likelihood`), averaged over the
  templates. No image-independent head exists: every image x prompt pair is a decoder pass.

Sigmoid-loss (SigLIP) models carry a learned ``logit_bias``: their logits are ``exp(t) * cos + b`` and
each class probability is a sigmoid of its own logit (an independent yes/no per image-class pair,
as the model was trained), not a softmax over the classes; the ranking of classes is the same.

Both are log-probabilities (no temperature); ``predict_proba`` is their softmax. A bow score as
specified is dominated by the token prior (frequent tokens score high for every image, so one class
can win for all of them); ``bow_prior="scored"`` subtracts the log of the model's mean predicted
distribution over the images scored in the same call (pointwise mutual information; a per-class
constant). That is transductive (an image's scores depend on the set scored with it): meant for
evaluating a test set, not for classifying single images. Neither uses the
disk cache (a bow head is tokenisation only, cheaper than reading a file; caption scores cannot
be precomputed).
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
from ..models.heads import objective_of
from ..tokenizer import DEFAULT_OVERLAP
from ..utils import atomic_write_bytes
from .cache import default_cache_dir, json_hash
from .prompts import ClassName, class_texts, load_classnames, load_templates
from .scorers import build_bow_weights, prompt_ids, prompts_for, scorer_fingerprint, scorer_for  # noqa: F401 (re-exported)

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

    Any model objective (``model.config.objective``, see the module docstring): ``contrastive``
    (cosine head, ``weights [C, D]``), ``bow`` (``weights [C, V]``, class bags; scores are mean
    token log-probabilities) or ``caption`` (``weights`` None; scores are mean per-token
    log-likelihoods of the prompts). ``logits`` / ``scores`` return ``[N, C]`` scores for each;
    ``predict_proba`` is their softmax, or for a model with a ``logit_bias`` (sigmoid loss) the
    sigmoid of each logit (bias included). Image features are the unit-norm image embeddings in
    every case.
    """

    def __init__(self, model: nn.Module, classnames: str | Sequence[ClassName], templates: str | Sequence[str] = "imagenet",
                 *, preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
                 cache_dir: str | Path | None = None, use_cache: bool = True, batch_size: int = 256,
                 progress: bool = False, long_text: str | None = None, long_text_overlap: int = DEFAULT_OVERLAP,
                 bow_prior: str = "none", _weights: torch.Tensor | None = None) -> None:
        if bow_prior not in ("none", "scored"):
            raise ValueError(f"bow_prior: 'none' or 'scored' (got {bow_prior!r})")
        self.model = model
        self.bow_prior = bow_prior
        self.classnames = load_classnames(classnames)
        self.templates = load_templates(templates)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.progress = progress
        self.long_text, self.long_text_overlap = long_text, long_text_overlap
        self.cache_hit = False
        self.cache_path: Path | None = None
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "zeroshot"
        self.use_cache = use_cache
        self.scorer = scorer_for(model)
        self.objective = self.scorer.name
        t0 = time.perf_counter()
        self.text_fingerprint = self.scorer.fingerprint(model)
        self.prompt_ids: torch.Tensor
        self.prompt_owner: torch.Tensor
        self.weights: torch.Tensor | None = self.scorer.build(self, _weights)
        self.build_seconds = time.perf_counter() - t0

    # --- construction ----------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        key = {"format": CACHE_FORMAT, "text": self.text_fingerprint,
               "classes": self.classnames, "templates": self.templates, **self.scorer.tag()}
        if self.long_text == "chunks":  # other modes give the historical (truncated) head or refuse
            key["long_text"] = ["chunks", self.long_text_overlap]
        return json_hash(key)

    def cached_head(self) -> torch.Tensor:
        """The ``[C, D]`` class embeddings: from the disk cache when there (and enabled), else built
        through the text tower and cached."""
        path = self.cache_dir / f"{self.cache_key}.safetensors"
        if self.use_cache:
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
        if self.use_cache:
            _write_head(path, w, self._meta())
        return w

    def _meta(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "classnames": self.classnames, "templates": self.templates,
                "text_fingerprint": self.text_fingerprint, **self.scorer.tag()}

    def save(self, path: str | Path) -> None:
        """Write the built head (weights, class names, templates, text-tower hash) as safetensors.
        A caption model has no head to save (its scores are computed from image and prompt together)."""
        if self.weights is None:
            raise ValueError(f"a zero-shot classifier over a model trained with objective {self.objective!r} "
                             "has no head to save: its scores are computed from each image and prompt together")
        _write_head(Path(path), self.weights, self._meta())

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, preprocess: Callable | None = None,
             strict: bool = True) -> "ZeroShotClassifier":
        """Load a head saved with :meth:`save`. ``strict`` checks it was built by this model's text tower."""
        w, meta = _read_head(Path(path))
        saved, objective = meta.get("objective", "contrastive"), objective_of(model)
        if saved != objective:
            raise ValueError(f"{path}: zero-shot head of a model trained with objective {saved!r}; this model's "
                             f"objective is {objective!r}")
        clf = cls(model, meta["classnames"], meta["templates"], preprocess=preprocess, use_cache=False, _weights=w)
        if strict and meta.get("text_fingerprint") != clf.text_fingerprint:
            raise ValueError(f"{path}: zero-shot head was built with a different text tower "
                             f"(hash {str(meta.get('text_fingerprint'))[:12]} != {clf.text_fingerprint[:12]}); "
                             "pass strict=False to use it anyway")
        return clf

    # --- inference -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.weights.shape[0] if self.weights is not None else len(self.classnames)

    @property
    def logit_scale(self) -> float:
        """The contrastive model's temperature ``exp(logit_scale)``; 1 for bow / caption (their
        scores are log-probabilities)."""
        return self.scorer.logit_scale(self.model)

    @property
    def logit_bias(self) -> float | None:
        """The learned bias of a sigmoid-loss model (added to every logit), else ``None``."""
        return self.scorer.logit_bias(self.model)

    @property
    def feature_dim(self) -> int:
        """The dimension of the image features the scores read."""
        return self.scorer.feature_dim(self)

    def image_features(self, images: Any) -> torch.Tensor:
        """Unit-norm ``[N, D]`` image features for any accepted input form."""
        d = self.feature_dim
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
        """``[N, C]`` class scores of images (or unit-norm image features)."""
        return self.scores(self.image_features(images))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` class scores of unit-norm image features ``[N, D]``: scaled cosine similarities
        (contrastive), mean token log-probabilities of the class bags (bow), mean per-token
        log-likelihoods of the prompts (caption); templates averaged."""
        return self.scorer.scores(self, features)

    def topk(self, features: Any, k: int = 5) -> np.ndarray:
        """``[N, min(k, C)]`` indices of the best classes of image features (a tensor or array of
        any float dtype; normalised here), in chunks for the contrastive head."""
        return self.scorer.topk(self, features, k)

    def predict_proba(self, images: Any) -> torch.Tensor:
        """``[N, C]``: a softmax over the classes, or per-class sigmoids for a sigmoid-loss model
        (rows then need not sum to 1: each is that class's own match probability)."""
        return self.scorer.probabilities(self.logits(images), self.logit_bias)

    def predict(self, images: Any) -> torch.Tensor:
        return self.logits(images).argmax(dim=-1)

    def __repr__(self) -> str:
        tag = "".join(f"{k}={v}, " for k, v in self.scorer.tag().items())
        return (f"ZeroShotClassifier({tag}classes={self.num_classes}, templates={len(self.templates)}, "
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
