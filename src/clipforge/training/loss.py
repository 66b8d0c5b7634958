"""CLIP's contrastive objective: symmetric cross-entropy over the scaled cosine-similarity matrix
of a batch of (image, text) pairs (Radford et al. 2021, Figure 3), optionally over the global
batch of a data-parallel job.

Memory: one ``[N, N]`` logits matrix is built; the text->image direction reads it transposed
(a view), so no second matmul or copy. With ``local_loss`` each rank builds only its ``[B, N]``
rows (and the ``[B, N]`` rows of the text direction) instead of ``[N, N]``.

Hard negatives (``--hard-negatives swap``, :mod:`.hard_negatives`): each image's row of the
image->text logits gains ``C`` columns, its own negative captions (absent ones at -inf), so the
softmax of image ``i`` runs over all batch texts plus its own negatives (NegCLIP); the
text->image direction is unchanged.

Image-side negatives (``--hard-negatives mirror``): companion pairs are rows like the others; a
batch has a fixed ``2B`` rows with ``present [2B]`` marking the real ones, so shapes match across
micro-batches and ranks, and the loss is the plain (or NegCLIP) loss of the present rows only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .distributed import DistEnv, gather_features


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, but its gradient scaled by ``factor`` (exact values, unlike ``x*f + x*(1-f)``)."""
    if factor == 1.0:
        return x
    return _ScaleGrad.apply(x, factor)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor,
                    negatives: torch.Tensor | None, neg_mask: torch.Tensor | None) -> None:
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"image and text features must both be [N, D]; got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    if (negatives is None) != (neg_mask is None):
        raise ValueError("hard negatives need both their features [N, C, D] and their mask [N, C]")
    if negatives is not None and neg_mask is not None:
        n, d = image_features.shape
        if negatives.dim() != 3 or negatives.shape[0] != n or negatives.shape[2] != d \
                or tuple(neg_mask.shape) != tuple(negatives.shape[:2]):
            raise ValueError(f"hard negatives must be [N, C, D] = [{n}, C, {d}] with a [N, C] mask; got "
                             f"{tuple(negatives.shape)} and {tuple(neg_mask.shape)}")


def _image_to_text_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                          negatives: torch.Tensor | None, neg_mask: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[N', N]`` image->text logits over the batch texts, the same rows with each image's own
    hard negatives appended as ``C`` extra columns, absent ones at -inf). Without negatives (none
    given, or none present) the second is the first, so the loss is the plain one exactly."""
    logits = logit_scale * image_features @ text_features.t()
    if negatives is None or neg_mask is None or negatives.shape[1] == 0 or not bool(neg_mask.any()):
        return logits, logits
    neg = logit_scale * torch.einsum("nd,ncd->nc", image_features, negatives.to(image_features.dtype))
    neg = torch.where(neg_mask.bool(), neg, torch.full_like(neg, float("-inf")))
    return logits, torch.cat([logits, neg], dim=1)


def _present_rows(present: torch.Tensor | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The rows ``present`` marks of each tensor (all of them when ``present`` is None)."""
    if present is None:
        return tensors
    if present.dim() != 1 or (tensors[0] is not None and present.shape[0] != tensors[0].shape[0]):
        raise ValueError(f"present must be a [N] mask of the feature rows; got {tuple(present.shape)}")
    keep = present.bool()
    return tuple(None if t is None else t[keep] for t in tensors)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor, negatives: torch.Tensor | None = None,
                     neg_mask: torch.Tensor | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies; pair ``i`` is row/column ``i``.

    Features are expected L2-normalised; ``logit_scale`` is the multiplier ``exp(t)``.
    ``negatives [N, C, D]`` with ``neg_mask [N, C]``: rule-built hard negative captions of each
    image (NegCLIP): extra columns of image ``i``'s softmax only (its row sees all ``N`` batch
    texts plus its own present negatives, never another image's); the text->image direction is
    the plain one. ``present [N]`` (bool): only those rows are pairs (the others are absent
    mirror companions: neither rows nor columns)."""
    _check_features(image_features, text_features, negatives, neg_mask)
    image_features, text_features, negatives, neg_mask = _present_rows(  # type: ignore[assignment]
        present, image_features, text_features, negatives, neg_mask)
    logits, with_neg = _image_to_text_logits(image_features, text_features, logit_scale, negatives, neg_mask)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(with_neg, labels) + F.cross_entropy(logits.t(), labels)) / 2


class ClipLoss:
    """The contrastive loss of one rank in a (possibly) data-parallel job.

    Every rank gathers all ranks' features. With the default (``local_loss=False``) each rank
    computes the full ``N x N`` loss; with ``local_loss=True`` only its own rows (labels offset by
    ``rank * B``), whose mean over ranks is the global loss.

    DDP averages parameter gradients over ranks. This class makes that average equal the gradient
    of the global-batch loss exactly, in every mode:

    * ``gather_with_grad=True``: the gather's backward sums every rank's gradient into the rank that
      owns the rows, so averaging is already exact (global or local loss).
    * ``gather_with_grad=False`` with the global loss: each rank's features only receive its own
      copy of the (identical) loss, i.e. ``1/world_size`` of what they need after averaging, while
      the temperature is used in full on every rank. The local features' gradients are therefore
      multiplied by ``world_size`` (the value of the loss is unchanged).
    * ``gather_with_grad=False`` with ``local_loss=True`` would drop the terms other ranks compute
      with this rank's features (a biased gradient), so it is refused when ``world_size > 1``.
    """

    def __init__(self, env: DistEnv | None = None, local_loss: bool = False, gather_with_grad: bool = False):
        self.env = env or DistEnv()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        if self.env.distributed and local_loss and not gather_with_grad:
            raise ValueError("local_loss needs gather_with_grad when training on several processes "
                             "(otherwise the loss terms other ranks compute with this rank's features "
                             "never reach its gradients); pass --gather-with-grad")

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor,
                 logit_scale: torch.Tensor, negatives: torch.Tensor | None = None,
                 neg_mask: torch.Tensor | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        """``negatives [B, C, D]`` / ``neg_mask [B, C]``: this rank's images' hard negatives (see
        :func:`contrastive_loss`). With the global loss they are gathered with their images (``C``
        is the same on every rank), so each rank computes exactly the single-process loss of the
        global batch; with ``local_loss`` they stay local, since only their own image's row uses them.
        ``present [B]``: this rank's real rows (mirror companions), gathered like the negatives'
        mask; the global loss only."""
        env = self.env
        if not env.distributed:
            return contrastive_loss(image_features, text_features, logit_scale, negatives, neg_mask, present)
        _check_features(image_features, text_features, negatives, neg_mask)
        if not self.gather_with_grad:
            image_features = scale_grad(image_features, float(env.world_size))
            text_features = scale_grad(text_features, float(env.world_size))
            if negatives is not None:
                negatives = scale_grad(negatives, float(env.world_size))
        all_img = gather_features(image_features, env, self.gather_with_grad)
        all_txt = gather_features(text_features, env, self.gather_with_grad)
        if not self.local_loss:
            if negatives is not None and neg_mask is not None:
                negatives = gather_features(negatives, env, self.gather_with_grad)
                neg_mask = gather_features(neg_mask.to(torch.uint8), env, with_grad=False).bool()
            if present is not None:
                present = gather_features(present.to(torch.uint8), env, with_grad=False).bool()
            return contrastive_loss(all_img, all_txt, logit_scale, negatives, neg_mask, present)
        if present is not None:
            raise ValueError("mirror companions (present rows) need the global loss, not local_loss")
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + env.rank * b
        _, logits_per_image = _image_to_text_logits(image_features, all_txt, logit_scale, negatives, neg_mask)
        logits_per_text = logit_scale * text_features @ all_img.t()
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


__all__ = ["ClipLoss", "contrastive_loss", "scale_grad"]
