"""The losses of the paper's two baseline objectives (Radford et al. 2021, section 2.3, Figure 2),
means over caption tokens, and the module DDP wraps for them; the contrastive loss is :mod:`.loss`.
Each objective is one :class:`TokenObjective` in :data:`TOKEN_OBJECTIVES` (its summed loss and what
that sum is a mean over), looked up once by :class:`ObjectiveModule` and :class:`.step.ObjectiveStep`.

- ``bow``: cross-entropy between the caption's normalised bag of BPE tokens (content tokens only:
  no start/end-of-text, no padding) and the softmax of the image's vocabulary logits,
  ``-sum_v bag[v] * log softmax(logits)[v]``, averaged over the captions that have a content token.
- ``caption``: teacher-forced next-token cross-entropy, averaged over the real target tokens
  (every content token and the end-of-text token; padding ignored).

Both are means of independent terms (one per caption, one per token), so a batch's loss is a
sum divided by a count, and gradient accumulation and data parallelism are exact without the
feature caching the contrastive loss needs: every micro-batch on every rank contributes its
summed loss divided by the count over the whole optimiser step (all micro-batches, all ranks),
times ``world_size`` because DDP averages gradients over ranks (:class:`.step.ObjectiveStep`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import CLIP
from ..models.heads import bag_of_words, caption_targets, content_mask, end_positions


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for reduced-precision tensors (a stable loss under autocast / cast weights); float64 stays."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def bow_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the softmax of ``logits [B, V]`` against the bags of ``ids [B, L]``:
    ``mean`` over captions with at least one content token (or their ``sum``)."""
    if logits.dim() != 2 or ids.dim() != 2 or logits.shape[0] != ids.shape[0]:
        raise ValueError(f"bow loss needs logits [B, V] and ids [B, L]; got {tuple(logits.shape)} and {tuple(ids.shape)}")
    logits = _wide(logits)
    bag = bag_of_words(ids, logits.shape[1]).to(device=logits.device, dtype=logits.dtype)
    per_caption = -(bag * logits.log_softmax(dim=-1)).sum(dim=-1)  # empty bags: 0
    total = per_caption.sum()
    if reduction == "sum":
        return total
    return total / max(loss_count("bow", ids), 1)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy of ``logits [..., V]`` against ``targets [...]``, over the positions
    where ``mask`` is True (all when None): ``mean`` over those tokens (or their ``sum``)."""
    if mask is not None:
        logits, targets = logits[mask], targets[mask]
    return F.cross_entropy(_wide(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum" if reduction == "sum" else "mean")


def _bow_sum(model: CLIP, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return bow_loss(model.bow_logits(image), ids, reduction="sum")  # type: ignore[operator]


def _caption_sum(model: CLIP, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    inputs, targets, mask = caption_targets(ids)
    states = model.decode(image, inputs)  # type: ignore[operator]
    # The vocabulary projection only where a real token is predicted (padding costs nothing).
    return caption_loss(model.token_logits(states[mask]), targets[mask], reduction="sum")  # type: ignore[operator]


@dataclass(frozen=True)
class TokenObjective:
    """An objective whose loss is a mean of independent per-caption / per-token terms.

    ``summed_loss(model, image, ids)``: the batch's summed loss from unit-norm image features
    ``[B, E]`` and ids ``[B, L]``; ``count(ids)``: how many terms that sum holds."""

    name: str
    summed_loss: Callable[[CLIP, torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor], int]


TOKEN_OBJECTIVES: dict[str, TokenObjective] = {
    "bow": TokenObjective("bow", _bow_sum, lambda ids: int(content_mask(ids).any(dim=1).sum())),
    "caption": TokenObjective("caption", _caption_sum, lambda ids: int(end_positions(ids).sum())),
}


def token_objective(objective: str) -> TokenObjective:
    """The :class:`TokenObjective` named ``objective`` (``bow`` | ``caption``)."""
    try:
        return TOKEN_OBJECTIVES[objective]
    except KeyError:
        raise ValueError(f"no token-count loss for objective {objective!r}") from None


def loss_count(objective: str, ids: torch.Tensor) -> int:
    """What the objective's loss is a mean over, in ``ids [B, L]``: captions with a content token
    (bow), target tokens, end-of-text included (caption)."""
    return token_objective(objective).count(ids)


class ObjectiveModule(nn.Module):
    """What DDP wraps for ``bow`` / ``caption``: images and ids -> the batch's **summed** loss
    (float32, or float64 for a float64 model), computed inside this forward so DDP sees every use of the weights. The heads read
    the unit-norm image embedding (as evaluation does)."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model
        self.objective = model.config.objective
        if self.objective not in TOKEN_OBJECTIVES:
            raise ValueError(f"ObjectiveModule is for the bow/caption objectives, not {self.objective!r}")
        self._summed_loss = TOKEN_OBJECTIVES[self.objective].summed_loss

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image = F.normalize(_wide(self.model.encode_image(images)), dim=-1)
        return self._summed_loss(self.model, image, ids)


def freeze_unused(model: CLIP) -> list[str]:
    """Freeze the parameters the model's objective never uses (see
    ``clipforge.models.heads``): no optimiser state, and DDP does not wait for their
    gradients. Returns their names."""
    names = list(getattr(model, "unused_parameter_names", lambda: [])())
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


__all__ = ["bow_loss", "caption_loss", "loss_count", "TokenObjective", "TOKEN_OBJECTIVES", "token_objective",
           "ObjectiveModule", "freeze_unused"]
