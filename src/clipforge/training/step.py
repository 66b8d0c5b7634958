"""One optimiser step: forward, contrastive loss, backward (with gradient accumulation that keeps
the contrastive batch whole), clipping, the optimiser update and the temperature clamp.

Gradient accumulation (OpenCLIP's ``--accum-freq``): the loss of a contrastive batch couples all
its pairs, so summing the losses of k independent micro-batches is *not* the loss of their union.
Instead the features of all k micro-batches are first computed without gradients and cached; then
each micro-batch is re-run with gradients and the loss of the whole effective batch is built from
its fresh features plus the cached features of the others. The sum of the k backward passes is
exactly the gradient of the full-batch loss (the temperature's share is divided by k, since it
enters every one of the k losses). This needs the re-run to reproduce the cached features, which
holds for the ViT/text towers (no dropout) but not for BatchNorm in train mode (ResNet towers):
there each re-run sees statistics of one micro-batch and updates the running statistics again.
Hard negatives (and mirror companions, rows with a ``present`` mask) are features like the
others: cached with their micro-batch, recomputed with it, and concatenated in batch order, so
each stays attached to its own image's row.

The sigmoid loss (``--loss siglip``, :mod:`.sigmoid_loss`) couples the batch the same way and takes
the same path: the learned bias is a fifth cached feature slot and, like the temperature, its
gradient share is divided by k.

The ``bow`` / ``caption`` objectives (:mod:`.token_losses`) need none of this: their losses are
means of per-caption / per-token terms, so :class:`ObjectiveStep` runs each micro-batch once and
weights its summed loss by the count of the whole step (all micro-batches, all ranks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import device as _device
from .. import precision as _precision
from ..data.mirror import MirroredText
from ..models import CLIP
from .distributed import DistEnv, sum_over_ranks
from .hard_negatives import CaptionTokens
from .loss import ClipLoss, scale_grad
from .sigmoid_loss import SigLipLoss
from .token_losses import TOKEN_OBJECTIVES, ObjectiveModule, token_objective
from .replay import replaying, rng_state

#: The text side of a batch: token ids, or ids with hard negatives (``--hard-negatives swap``),
#: either of them for ``2B`` rows with a ``present`` mask (``--hard-negatives mirror``).
Text = torch.Tensor | CaptionTokens | MirroredText


class FeatureModel(nn.Module):
    """What DDP wraps: images and ids -> (normalised image features, normalised text features,
    temperature ``exp(logit_scale)``), features in float32 for a stable loss under autocast; a
    model with a learned ``logit_bias`` (sigmoid loss) returns it as a fourth output.

    With hard negatives (``neg_ids [B, C, L]``, ``neg_mask [B, C]``) a fourth output holds their
    features ``[B, C, D]`` (zeros where the mask is False); the present ones are encoded in the
    same text pass as the captions, inside this forward so DDP sees every use of the weights."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, ids: torch.Tensor, neg_ids: torch.Tensor | None = None,
                neg_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        img = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        scale = self.clip.logit_scale.float().exp()
        if neg_ids is None or neg_mask is None:
            txt = F.normalize(self.clip.encode_text(ids).float(), dim=-1)
            bias = self.clip.logit_bias
            return (img, txt, scale) if bias is None else (img, txt, scale, bias.float())
        b = ids.shape[0]
        both = F.normalize(self.clip.encode_text(torch.cat([ids, neg_ids[neg_mask]])).float(), dim=-1)
        neg = both.new_zeros(*neg_mask.shape, both.shape[1])
        neg[neg_mask] = both[b:]
        return img, both[:b], scale, neg


def autocast_context(precision: str, device: torch.device) -> ContextManager[Any]:
    """Autocast for the ``amp*`` precisions (``amp``: float16, CUDA only); nothing otherwise.
    The precision names and their meaning are open_clip's (see :mod:`clipforge.precision`)."""
    return _precision.autocast(precision, device)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    if not _precision.get_precision(precision).grad_scaler:
        return None
    if device.type != "cuda":
        raise ValueError(f"precision {precision} needs a CUDA GPU; on CPU use amp_bf16, bf16 or fp32")
    return torch.amp.GradScaler("cuda")


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None


class TrainStep:
    """Runs optimiser steps for ``model`` (a :class:`CLIP`), through ``module`` (the
    :class:`FeatureModel`, possibly DDP-wrapped)."""

    def __init__(self, model: CLIP, module: nn.Module, loss_fn: ClipLoss | SigLipLoss | None, optimizer: torch.optim.Optimizer,
                 precision: str = "fp32", grad_clip: float | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.model, self.module, self.loss_fn, self.optimizer = model, module, loss_fn, optimizer
        self.precision, self.grad_clip, self.scaler = precision, grad_clip, scaler
        self.device = model.device
        autocast_context(precision, self.device)  # fail early on an impossible precision
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _autocast(self) -> ContextManager[Any]:
        return autocast_context(self.precision, self.device)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _no_sync(self, last: bool) -> ContextManager[Any]:
        no_sync = getattr(self.module, "no_sync", None)
        return no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()

    def _features(self, module: nn.Module, images: torch.Tensor, text: Text) -> tuple[Any, ...]:
        """(image features, text features, temperature, bias or None, negatives or None, their mask
        or None, present rows or None). With mirror companions only the present rows are encoded; the
        absent ones are zero features, which the loss leaves out."""
        if isinstance(text, MirroredText):
            keep = text.present.bool()
            inner = text.text
            sub = CaptionTokens(*(t[keep] for t in inner)) if isinstance(inner, CaptionTokens) else inner[keep]
            img, txt, scale, bias, neg, mask, _ = self._features(module, images[keep], sub)
            n = keep.shape[0]
            img, txt = (_scatter_rows(f, keep, n) for f in (img, txt))
            if neg is not None:
                neg, mask = _scatter_rows(neg, keep, n), inner.neg_mask  # absent rows' "" has no negatives
            return img, txt, scale, bias, neg, mask, keep
        if isinstance(text, CaptionTokens):
            with self._autocast():
                img, txt, scale, neg = module(images, text.ids, text.neg_ids, text.neg_mask)
            return img, txt, scale, None, neg, text.neg_mask, None
        with self._autocast():
            out = module(images, text)
        return (*out, None, None, None, None) if len(out) == 3 else (*out, None, None, None)

    def _loss(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              neg: torch.Tensor | None, mask: torch.Tensor | None, present: torch.Tensor | None = None
              ) -> torch.Tensor:
        assert self.loss_fn is not None
        if isinstance(self.loss_fn, SigLipLoss):
            assert bias is not None and neg is None and present is None
            return self.loss_fn(img, txt, scale, bias)
        if present is not None:
            return self.loss_fn(img, txt, scale, neg, mask, present=present)
        if neg is None:
            return self.loss_fn(img, txt, scale)
        return self.loss_fn(img, txt, scale, neg, mask)

    def _to_device(self, text: Text) -> Text:
        if isinstance(text, MirroredText):
            return MirroredText(self._to_device(text.text), _device.to_device(text.present, self.device))
        if isinstance(text, CaptionTokens):
            return CaptionTokens(*(_device.to_device(t, self.device) for t in text))
        return _device.to_device(text, self.device)

    def compute_gradients(self, batches: Sequence[tuple[torch.Tensor, Text]]) -> float:
        """Accumulate into ``.grad`` the gradient of the contrastive loss over the union of
        ``batches`` (k micro-batches); returns the loss value. The text side of a batch is ids,
        or :class:`CaptionTokens` (ids with hard negatives, cached and recomputed with their
        micro-batch like the other features)."""
        batches = [(_device.to_device(im, self.device), self._to_device(text)) for im, text in batches]
        k = len(batches)
        prepare = getattr(self.loss_fn, "prepare", None)  # distillation: the teacher's features of the step
        if prepare is not None:
            prepare(batches)
        if k == 1:
            images, text = batches[0]
            loss = self._loss(*self._features(self.module, images, text))
            self._backward(loss)
            return float(loss.detach())
        inner = getattr(self.module, "module", self.module)  # skip DDP hooks for the no-grad pass
        cached, states = [], []
        with torch.no_grad():
            for images, text in batches:
                states.append(rng_state(self.device))  # a re-run draws what its first pass drew
                cached.append(self._features(inner, images, text))
        with_neg = cached[0][4] is not None
        with_present = cached[0][6] is not None
        value = 0.0
        for j, (images, text) in enumerate(batches):
            with self._no_sync(last=j == k - 1):
                with replaying(states[j], self.device):
                    fresh = self._features(self.module, images, text)
                parts = cached[:j] + [fresh] + cached[j + 1:]
                img, txt = (torch.cat([f[slot] for f in parts]) for slot in (0, 1))
                neg, mask = (torch.cat([f[slot] for f in parts]) for slot in (4, 5)) if with_neg else (None, None)
                present = torch.cat([f[6] for f in parts]) if with_present else None
                # The temperature (and bias) enter each of the k losses in full: 1/k of each gradient.
                scale, bias = (None if fresh[slot] is None else scale_grad(fresh[slot], 1.0 / k) for slot in (2, 3))
                loss = self._loss(img, txt, scale, bias, neg, mask, present)
                self._backward(loss)
            value = float(loss.detach())
        return value

    def __call__(self, batches: Sequence[tuple[torch.Tensor, Text]]) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_gradients(batches)
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.clamp_logit_scale()
        return StepResult(loss=loss, grad_norm=grad_norm)


class ObjectiveStep(TrainStep):
    """Optimiser steps for the ``bow`` / ``caption`` objectives, through ``module`` (an
    :class:`~.token_losses.ObjectiveModule`, possibly DDP-wrapped; its forward returns a summed loss).

    The step's loss is the sum over micro-batches and ranks divided by the count over all of them
    (captions for bow, target tokens for caption), so each micro-batch's backward gets its sum
    times ``world_size / count``: DDP's average over ranks then makes the gradient exactly that of
    the global-batch mean (also when ranks hold different token counts). The value returned is
    this rank's share; the loop's mean over ranks is the global loss."""

    def __init__(self, model: CLIP, module: nn.Module, optimizer: torch.optim.Optimizer, precision: str = "fp32",
                 grad_clip: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 env: DistEnv | None = None) -> None:
        super().__init__(model, module, None, optimizer, precision, grad_clip, scaler)
        self.env = env or DistEnv()
        self.objective = model.config.objective
        self._count = token_objective(self.objective).count

    def compute_gradients(self, batches: Sequence[tuple[torch.Tensor, Text]]) -> float:
        if any(isinstance(text, (CaptionTokens, MirroredText)) for _, text in batches):
            raise ValueError(f"hard negatives are a contrastive option; objective {self.objective!r} takes plain ids")
        count = sum_over_ranks(sum(self._count(ids) for _, ids in batches), self.env)
        weight = self.env.world_size / max(count, 1)
        k, value = len(batches), 0.0
        for j, (images, ids) in enumerate(batches):
            images, ids = _device.to_device(images, self.device), _device.to_device(ids, self.device)
            with self._no_sync(last=j == k - 1):
                with self._autocast():
                    total = self.module(images, ids)
                loss = total * weight
                self._backward(loss)
            value += float(loss.detach())
        return value


def _scatter_rows(features: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """``features`` of the kept rows placed into ``n`` rows of zeros (differentiable)."""
    out = features.new_zeros(n, *features.shape[1:])
    return out.index_put((keep.nonzero().squeeze(1),), features)


def objective_module(model: CLIP) -> nn.Module:
    """What a run trains through (and DDP wraps): :class:`FeatureModel` for the contrastive
    objective, :class:`~.token_losses.ObjectiveModule` for bow / caption."""
    return ObjectiveModule(model) if model.config.objective in TOKEN_OBJECTIVES else FeatureModel(model)


def make_train_step(model: CLIP, module: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str = "fp32",
                    grad_clip: float | None = None, scaler: torch.amp.GradScaler | None = None,
                    env: DistEnv | None = None, local_loss: bool = False, gather_with_grad: bool = False,
                    loss: str = "clip") -> TrainStep:
    """The step of the model's objective: :class:`TrainStep` with the contrastive loss (``loss``:
    ``clip``, the softmax one, or ``siglip``, the sigmoid one of a model with a ``logit_bias``), or
    :class:`ObjectiveStep`."""
    if loss == "siglip":
        if model.config.objective != "contrastive" or model.logit_bias is None:
            raise ValueError("the sigmoid loss trains a contrastive model with a logit_bias "
                             "(CLIPConfig.init_logit_bias)")
        return TrainStep(model, module, SigLipLoss(env), optimizer, precision, grad_clip, scaler)
    if model.config.objective in TOKEN_OBJECTIVES:
        return ObjectiveStep(model, module, optimizer, precision, grad_clip, scaler, env)
    return TrainStep(model, module, ClipLoss(env, local_loss, gather_with_grad), optimizer, precision,
                     grad_clip, scaler)


__all__ = ["FeatureModel", "TrainStep", "ObjectiveStep", "StepResult", "autocast_context", "make_grad_scaler", "Text",
           "objective_module", "make_train_step"]
