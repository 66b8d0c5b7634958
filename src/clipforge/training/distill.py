"""Distillation from a teacher CLIP (open_clip's ``--distill-model``; its ``DistillClipLoss``):
the student's contrastive loss plus ``weight`` times the cross-entropy between the teacher's and
the student's logit distributions, in both directions::

    distill = (CE(softmax(T_i2t), log_softmax(S_i2t)) + CE(softmax(T_t2i), log_softmax(S_t2i))) / 2
    CE(p, log q) = -(p * log q).sum(dim=1).mean()

with ``S = s_scale * img @ txt.T`` and ``T = t_scale * t_img @ t_txt.T`` over the same batch.
The teacher (any checkpoint ``clipforge.load`` reads) runs in inference mode, loaded once through
``clipforge.loading.load_for_inference`` (frozen, fast paths; ``precision`` e.g. ``bf16``), and
its features are computed afresh for every step's batch: nothing is cached across steps.

Exact under accumulation: the teacher features of the step's k micro-batches are computed once,
before the passes, and concatenated in the order the student's features are, so each re-run's
loss is the union's loss (the student temperature's 1/k share rides on the scale the step
passes, as for the contrastive loss). Under DDP (global loss) student and teacher features are
gathered like the contrastive loss's; ``local_loss`` is refused with distillation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .. import device as _device
from ..loading import load_for_inference
from ..models import CLIP
from .distributed import DistEnv, gather_features
from .loss import scale_grad


def distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 t_image: torch.Tensor, t_text: torch.Tensor, t_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ``DistillClipLoss`` distillation term (features L2-normalised, scales = exp(t))."""
    s_i2t = logit_scale * image_features @ text_features.t()
    t_i2t = t_scale * t_image @ t_text.t()

    def ce(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    return (ce(t_i2t, s_i2t) + ce(t_i2t.t(), s_i2t.t())) / 2


class Teacher:
    """A frozen CLIP giving normalised float32 features for the student's batches; images are
    resized / re-normalised when the teacher's preprocessing differs from the student's."""

    def __init__(self, path: str, student: CLIP, device: torch.device, precision: str = "fp32") -> None:
        self.model, _ = load_for_inference(path, device=str(device), precision=precision)
        t, s = self.model.config, student.config
        if t.objective != "contrastive":
            raise ValueError(f"distill_model {path}: a {t.objective!r} model has no contrastive logits to distil")
        if self.model.context_length < student.context_length:
            raise ValueError(f"distill_model {path}: context length {self.model.context_length} < the student's "
                             f"{student.context_length}")
        self.size, self.student_pre, self.teacher_pre = self.model.image_size, s.preprocess, t.preprocess
        self.device = device

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        sp, tp = self.student_pre, self.teacher_pre
        if (sp.mean, sp.std) != (tp.mean, tp.std):
            m0, s0 = (torch.tensor(v, device=images.device)[:, None, None] for v in (sp.mean, sp.std))
            m1, s1 = (torch.tensor(v, device=images.device)[:, None, None] for v in (tp.mean, tp.std))
            images = (images * s0 + m0 - m1) / s1
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                   antialias=True)
        return images

    @torch.inference_mode()
    def features(self, batches: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        imgs, txts = [], []
        for images, text in batches:
            ids = getattr(text, "ids", text)  # hard negatives: the captions only
            imgs.append(self.model.encode_image(self._images(_device.to_device(images, self.device))).float())
            txts.append(self.model.encode_text(_device.to_device(ids, self.device)).float())
        img = F.normalize(torch.cat(imgs), dim=-1)
        txt = F.normalize(torch.cat(txts), dim=-1)
        return img.clone(), txt.clone(), self.model.logit_scale.detach().float().exp().clone()


class DistillLoss:
    """``loss_fn`` (the contrastive loss, with its signature) plus ``weight`` x the distillation
    term; :meth:`prepare` (called by the step with its micro-batches) computes the teacher's
    features of the step."""

    def __init__(self, loss_fn: Any, teacher: Teacher, weight: float, env: DistEnv | None = None,
                 gather_with_grad: bool = False) -> None:
        self.loss_fn, self.teacher, self.weight = loss_fn, teacher, weight
        self.env, self.gather_with_grad = env or DistEnv(), gather_with_grad
        self._teacher: tuple[torch.Tensor, ...] | None = None

    def prepare(self, batches: Sequence[tuple[torch.Tensor, Any]]) -> None:
        t_img, t_txt, t_scale = self.teacher.features(batches)
        if self.env.distributed:
            t_img, t_txt = (gather_features(t, self.env, with_grad=False) for t in (t_img, t_txt))
        self._teacher = (t_img, t_txt, t_scale)

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 *negatives: Any) -> torch.Tensor:
        if self._teacher is None:
            raise RuntimeError("DistillLoss.prepare(batches) must run before the loss (the step calls it)")
        base = self.loss_fn(image_features, text_features, logit_scale, *negatives)
        img, txt = image_features, text_features
        if self.env.distributed:  # as ClipLoss's global loss: exact gradients after DDP's average
            if not self.gather_with_grad:
                img, txt = (scale_grad(t, float(self.env.world_size)) for t in (img, txt))
            img, txt = (gather_features(t, self.env, self.gather_with_grad) for t in (img, txt))
        t_img, t_txt, t_scale = self._teacher
        if t_img.shape[0] != img.shape[0]:
            raise ValueError(f"teacher features for {t_img.shape[0]} pairs, student {img.shape[0]}")
        return base + self.weight * distill_loss(img, txt, logit_scale, t_img, t_txt, t_scale)


__all__ = ["distill_loss", "Teacher", "DistillLoss"]
