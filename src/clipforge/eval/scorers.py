"""How each model objective (``config.objective``) scores classes zero-shot: one :class:`Scorer`
per objective in :data:`SCORERS`, chosen once per :class:`~.zeroshot.ZeroShotClassifier`.

- ``contrastive``: ``exp(logit_scale) * features @ W.T`` with ``W [C, D]`` the prompt-ensembled
  class embeddings (disk-cached); a sigmoid-loss (SigLIP) model adds its learned ``logit_bias`` and
  its probabilities are per-class sigmoids (an independent yes/no per image-class pair, as it was
  trained), otherwise a softmax over the classes.
- ``bow``: ``log_softmax(head(image)) @ W.T`` with ``W [C, V]`` the classes' mean bags of prompt
  tokens (:func:`build_bow_weights`); optionally with the token prior removed (``bow_prior``).
- ``caption``: the decoder's mean per-token log-likelihood of each prompt given the image
  (:func:`caption_log_likelihood`), averaged over the class's prompts; no head exists.

bow and caption scores are log-probabilities (no temperature), and their probabilities a softmax.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..models import CaptioningCLIP
from ..models.heads import caption_targets, content_mask, objective_of
from ..tokenizer import get_tokenizer
from .cache import json_hash, state_dict_hash, text_tower_fingerprint
from .metrics import chunked_topk
from .prompts import ClassName, class_texts

# The classifier a scorer serves (:class:`~.zeroshot.ZeroShotClassifier`, which imports this module).
ZeroShotClassifier = Any

# Vocabulary logits materialised at once when scoring prompts ([tokens, vocab] floats): ~64 MB.
LOGIT_BUDGET = 1 << 24


# --- prompts as tokens (bow, caption) -----------------------------------------------------------

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


def prompt_ids(classnames: Sequence[ClassName], templates: Sequence[str], context_length: int = 77
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prompt (class-major, synonyms included) tokenized ``[P, L]`` (long prompts truncated)
    and its class index ``[P]``."""
    if not classnames:
        raise ValueError("no class names given")
    texts, owner = prompts_for(classnames, templates)
    return get_tokenizer(context_length).tokenize(texts, context_length, truncate=True), torch.as_tensor(owner)


def build_bow_weights(classnames: Sequence[ClassName], templates: Sequence[str], *, context_length: int = 77,
                      vocab_size: int = 49408) -> torch.Tensor:
    """``[C, V]``: row ``c`` is the mean over class ``c``'s prompts of each prompt's bag of content
    tokens (token counts / the prompt's number of content tokens). For log-probabilities ``lp
    [N, V]``, ``lp @ W.T`` is then, per class, the mean over its prompts of the mean log-probability
    of the prompt's tokens: the bag-of-words zero-shot score. Depends on the tokenizer only."""
    ids, owner = prompt_ids(classnames, templates, context_length)
    mask = content_mask(ids)
    n = mask.sum(dim=1)
    prompts = torch.bincount(owner[n > 0], minlength=len(classnames))
    if bool((prompts == 0).any()):
        c = int((prompts == 0).nonzero()[0])
        raise ValueError(f"class {classnames[c]!r}: none of its prompts has a token to score")
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)[mask]
    values = 1.0 / (n[rows] * prompts[owner[rows]]).float()
    weights = torch.zeros(len(classnames), vocab_size, dtype=torch.float32)
    return weights.index_put_((owner[rows], ids[mask]), values, accumulate=True)


@torch.no_grad()
def caption_log_likelihood(model: CaptioningCLIP, image_features: torch.Tensor, ids: torch.Tensor,
                           rows_per_chunk: int | None = None) -> torch.Tensor:
    """``[N, P]``: :meth:`CaptioningCLIP.prompt_log_likelihood` (the mean per-token log-likelihood
    of each prompt ``[P, L]`` given each image's unit-norm features ``[N, E]``) within a memory budget.

    Every (image, prompt) pair is a decoder pass (the image is the first token, so nothing is
    shared across images), in chunks of ``rows_per_chunk`` pairs (default: ~4096 tokens). The
    vocabulary projection and its log-sum-exp, which dominate (``V`` = 49,408), are computed once
    per distinct (image, token prefix) of a chunk, at most :data:`LOGIT_BUDGET` logits at a time:
    the prompts of one template share their first tokens, and with causal attention equal prefixes
    give equal states (exact)."""
    inputs, targets, mask = caption_targets(ids)
    n, p, t = image_features.shape[0], ids.shape[0], inputs.shape[1]
    counts = mask.sum(dim=1).clamp(min=1).float()
    # prefix[q, j, :]: the tokens state j of prompt q has read (-1 beyond j); equal rows = equal states
    pos = torch.arange(t)
    prefix = torch.where(pos[None, None, :] <= pos[None, :, None], inputs[:, None, :], -1)  # [P, T, T]
    out = torch.zeros(n * p, dtype=torch.float32)
    rows = rows_per_chunk or max(1, 4096 // max(t, 1))
    per_logits = max(1, LOGIT_BUDGET // model.config.text.vocab_size)
    device = model.device
    for start in range(0, n * p, rows):
        pair = torch.arange(start, min(start + rows, n * p))
        img, prm = pair // p, pair % p
        states = model.decode(image_features[img].to(device), inputs[prm].to(device))  # [r, T, W]
        m = mask[prm]
        owner = torch.arange(len(pair))[:, None].expand(-1, t)[m]
        chosen, target = states[m.to(device)], targets[prm][m]  # [K, W], [K]
        # Each distinct (image, prefix) among the chunk's K predicted tokens is projected once.
        keys = torch.cat([img[owner, None], prefix[prm][m]], dim=1)  # [K, 1 + T]
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
        first = torch.full((len(uniq),), len(keys), dtype=torch.long).scatter_reduce_(
            0, inverse, torch.arange(len(keys)), reduce="amin")
        reps = chosen[first.to(device)]
        logp = torch.zeros(len(keys), dtype=torch.float32)
        for s in range(0, len(reps), per_logits):
            lp = model.token_logits(reps[s:s + per_logits]).float().log_softmax(dim=-1)
            here = (inverse >= s) & (inverse < s + per_logits)
            logp[here] = lp[(inverse[here] - s).to(device), target[here].to(device)].cpu()
        total = torch.zeros(len(pair), dtype=torch.float32).index_add_(0, owner, logp)
        out[pair] = total / counts[prm]
    return out.view(n, p)


# --- the scorers ---------------------------------------------------------------------------------

class Scorer:
    """One objective's zero-shot scoring. Stateless: what a classifier built (``weights``, prompt
    ids) lives on the classifier, which every method receives."""

    name = ""
    token_prior = False  # scores carry a token prior that ``bow_prior="scored"`` can remove

    def fingerprint(self, model: nn.Module) -> str:
        """What the scores depend on besides the images, class names and templates."""
        raise NotImplementedError

    def build(self, clf: ZeroShotClassifier, weights: torch.Tensor | None) -> torch.Tensor | None:
        """The classifier's head (``weights`` when given, i.e. loaded from a file)."""
        raise NotImplementedError

    def scores(self, clf: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` class scores of unit-norm image features ``[N, D]``."""
        raise NotImplementedError

    def tag(self) -> dict[str, str]:
        """What cache keys, saved heads and ``repr`` add for this objective (contrastive: nothing,
        so its keys and files are those of a plain CLIP)."""
        return {"objective": self.name}

    def logit_scale(self, model: nn.Module) -> float:
        return 1.0

    def logit_bias(self, model: nn.Module) -> float | None:
        return None

    def feature_dim(self, clf: ZeroShotClassifier) -> int:
        return int(clf.model.config.embed_dim)

    def probabilities(self, logits: torch.Tensor, bias: float | None) -> torch.Tensor:
        return logits.softmax(dim=-1)

    def topk(self, clf: ZeroShotClassifier, features: Any, k: int) -> np.ndarray:
        """``[N, k]`` indices of the best classes of image features (normalised here); ``k`` at
        most the number of classes."""
        k = min(k, clf.num_classes)
        feats = features.float() if isinstance(features, torch.Tensor) else \
            torch.as_tensor(np.asarray(features, dtype=np.float32))
        if not len(feats):
            return np.zeros((0, k), dtype=np.int64)
        return self.scores(clf, torch.nn.functional.normalize(feats, dim=-1)).topk(k, dim=1).indices.numpy()


class ContrastiveScorer(Scorer):
    """Scaled cosine similarity with the class embeddings (+ the sigmoid-loss bias)."""

    name = "contrastive"

    def fingerprint(self, model: nn.Module) -> str:
        return text_tower_fingerprint(model)

    def build(self, clf: ZeroShotClassifier, weights: torch.Tensor | None) -> torch.Tensor | None:
        return weights if weights is not None else clf.cached_head()

    def scores(self, clf: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        logits = clf.logit_scale * features @ clf.weights.t()  # type: ignore[union-attr]
        bias = clf.logit_bias
        return logits if bias is None else logits + bias

    def tag(self) -> dict[str, str]:
        return {}

    def logit_scale(self, model: nn.Module) -> float:
        ls = getattr(model, "logit_scale", None)
        return float(ls.detach().exp()) if isinstance(ls, torch.Tensor) else 100.0

    def logit_bias(self, model: nn.Module) -> float | None:
        b = getattr(model, "logit_bias", None)
        return float(b.detach()) if isinstance(b, torch.Tensor) else None

    def feature_dim(self, clf: ZeroShotClassifier) -> int:
        return clf.weights.shape[1]  # type: ignore[union-attr]

    def probabilities(self, logits: torch.Tensor, bias: float | None) -> torch.Tensor:
        return logits.sigmoid() if bias is not None else logits.softmax(dim=-1)

    def topk(self, clf: ZeroShotClassifier, features: Any, k: int) -> np.ndarray:
        return chunked_topk(features, clf.weights, k=k, scale=clf.logit_scale, bias=clf.logit_bias)[0]


class GenerativeScorer(Scorer):
    """Scores from the model's head and the prompts as tokens, batch by batch in eval mode. No disk
    cache: a bow head is tokenisation only, caption scores have no image-independent part."""

    def build(self, clf: ZeroShotClassifier, weights: torch.Tensor | None) -> torch.Tensor | None:
        if clf.long_text == "chunks":
            raise ValueError(f"long_text='chunks' averages text embeddings; a model trained with objective "
                             f"{self.name!r} scores prompts as tokens (long prompts are truncated)")
        clf.prompt_ids, clf.prompt_owner = prompt_ids(clf.classnames, clf.templates,
                                                      clf.model.config.text.context_length)
        return self.head(clf, weights)

    def head(self, clf: ZeroShotClassifier, weights: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def scores(self, clf: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        model = clf.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.batched_scores(clf, features)
        finally:
            model.train(was_training)

    def batched_scores(self, clf: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        out = [self.batch_scores(clf, x) for x in batches(clf, features)]
        return torch.cat(out) if out else torch.empty(0, clf.num_classes)

    def batch_scores(self, clf: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def batches(clf: ZeroShotClassifier, features: torch.Tensor) -> list[torch.Tensor]:
    """``features`` in chunks of the classifier's batch size, float32 on the model's device."""
    return [features[i:i + clf.batch_size].float().to(clf.model.device)
            for i in range(0, features.shape[0], clf.batch_size)]


class BowScorer(GenerativeScorer):
    """Mean token log-probabilities of the class bags; ``bow_prior="scored"`` divides out the mean
    predicted distribution of the images scored together (pointwise mutual information)."""

    name = "bow"
    token_prior = True

    def fingerprint(self, model: nn.Module) -> str:
        ctx, vocab = model.config.text.context_length, model.config.text.vocab_size
        return json_hash({"objective": "bow", "ctx": ctx, "vocab": vocab}, n=64)

    def head(self, clf: ZeroShotClassifier, weights: torch.Tensor | None) -> torch.Tensor | None:
        text = clf.model.config.text
        return weights if weights is not None else build_bow_weights(
            clf.classnames, clf.templates, context_length=text.context_length, vocab_size=text.vocab_size)

    def batched_scores(self, clf: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        if clf.bow_prior == "scored" and features.shape[0]:
            return self._pmi_scores(clf, features)
        return super().batched_scores(clf, features)

    def batch_scores(self, clf: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
        return _log_probs(clf, x) @ clf.weights.t()  # type: ignore[union-attr]

    def _pmi_scores(self, clf: ZeroShotClassifier, features: torch.Tensor) -> torch.Tensor:
        """(log p(token | image) - log mean_images p(token | image)) @ bags. Two passes over the
        features (the prior first), so memory stays one chunk of [n, V]."""
        chunks = batches(clf, features)
        total = torch.zeros(clf.model.config.text.vocab_size, dtype=torch.float64)
        for x in chunks:
            total += _log_probs(clf, x).double().exp().sum(dim=0)
        log_prior = (total / features.shape[0]).log().float()
        return torch.cat([(_log_probs(clf, x) - log_prior) @ clf.weights.t() for x in chunks])  # type: ignore[union-attr]


def _log_probs(clf: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
    return clf.model.bow_logits(x).float().log_softmax(dim=-1).cpu()


class CaptionScorer(GenerativeScorer):
    """Mean per-token log-likelihood of each prompt given the image, averaged over a class's prompts."""

    name = "caption"

    def fingerprint(self, model: nn.Module) -> str:
        state = {f"text.{k}": v for k, v in model.text.state_dict().items()}
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        return state_dict_hash(state, extra={"objective": "caption", "ctx": model.config.text.context_length})

    def batch_scores(self, clf: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
        per_prompt = caption_log_likelihood(clf.model, x, clf.prompt_ids)  # [n, P]
        per_class = torch.zeros(x.shape[0], clf.num_classes).index_add_(1, clf.prompt_owner, per_prompt)
        return per_class / torch.bincount(clf.prompt_owner, minlength=clf.num_classes).float()


SCORERS: dict[str, Scorer] = {s.name: s for s in (ContrastiveScorer(), BowScorer(), CaptionScorer())}


def scorer_for(model: nn.Module) -> Scorer:
    """The :class:`Scorer` of ``model``'s objective."""
    return SCORERS[objective_of(model)]


def scorer_fingerprint(model: nn.Module) -> str:
    """What a classifier's scores depend on besides the images, class names and templates: the
    text tower (contrastive), the tokenizer's shape only (bow: the head matrix is built from
    tokens), the decoder and its image projection (caption)."""
    return scorer_for(model).fingerprint(model)


__all__ = ["Scorer", "SCORERS", "scorer_for", "scorer_fingerprint", "caption_log_likelihood", "build_bow_weights",
           "prompt_ids", "prompts_for", "LOGIT_BUDGET"]
