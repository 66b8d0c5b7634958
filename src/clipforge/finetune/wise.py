"""WiSE-FT (Wortsman et al. 2022): theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned.

Interpolation is element-wise over the whole classifier (image tower, head, and the text tower
and temperature when they were fine-tuned). Three rules make the endpoints exact and the rest honest:

- alpha = 0 and alpha = 1 return copies of the endpoint tensors (``1*x + 0*y`` would turn -0.0 into
  +0.0 and propagate a NaN of the other model), so they reproduce the two models bit for bit;
- a tensor equal in both models is copied, not recomputed (``0.7*x + 0.3*x`` need not equal ``x``
  in floating point): the text tower of a cross-entropy run is untouched at every alpha;
- integer buffers (BatchNorm's ``num_batches_tracked``) cannot be averaged: they come from the
  nearer endpoint.

Models of different architectures (config, parameter names or shapes, class lists) are refused.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch

from .classifier import ImageClassifier


def _check_same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError("cannot interpolate models of different architectures: parameters only in the zero-shot "
                         f"model: {only_a[:5]}{' ...' if len(only_a) > 5 else ''}; only in the fine-tuned model: "
                         f"{only_b[:5]}{' ...' if len(only_b) > 5 else ''}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"cannot interpolate models of different architectures: {k} has shape "
                             f"{tuple(a[k].shape)} in the zero-shot model but {tuple(b[k].shape)} in the fine-tuned one")
        if a[k].dtype != b[k].dtype:
            raise ValueError(f"cannot interpolate: {k} is {a[k].dtype} in the zero-shot model but {b[k].dtype} "
                             "in the fine-tuned one")


def interpolate_state_dicts(zeroshot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zeroshot + alpha * finetuned`` per tensor (see the module notes for the exact cases)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    _check_same_architecture(zeroshot, finetuned)
    out: dict[str, torch.Tensor] = {}
    for k, z in zeroshot.items():
        f = finetuned[k]
        if alpha == 0.0:
            out[k] = z.detach().clone()
        elif alpha == 1.0:
            out[k] = f.detach().clone()
        elif not z.is_floating_point():
            out[k] = (z if alpha < 0.5 else f).detach().clone()
        elif torch.equal(z, f):
            out[k] = z.detach().clone()
        else:
            out[k] = ((1.0 - alpha) * z.detach().float() + alpha * f.detach().float()).to(z.dtype)
    return out


def wise_ft(zeroshot: ImageClassifier, finetuned: ImageClassifier, alpha: float) -> ImageClassifier:
    """The classifier at ``alpha`` between ``zeroshot`` (0) and ``finetuned`` (1), as a new model.

    A FLYP classifier's head is a function of its text tower, so between the endpoints it is
    rebuilt from the interpolated text tower (as FLYP evaluates its interpolations)."""
    if zeroshot.clip.config.to_dict() != finetuned.clip.config.to_dict():
        za, fa = zeroshot.clip.config.to_dict(), finetuned.clip.config.to_dict()
        diff = sorted(k for k in set(za) | set(fa) if za.get(k) != fa.get(k))
        raise ValueError(f"cannot interpolate models of different architectures: their configs differ in {diff}")
    if [str(c) for c in zeroshot.classnames] != [str(c) for c in finetuned.classnames]:
        raise ValueError(f"cannot interpolate classifiers over different classes: {zeroshot.num_classes} classes "
                         f"{[str(c) for c in zeroshot.classnames][:4]}... vs {finetuned.num_classes} classes "
                         f"{[str(c) for c in finetuned.classnames][:4]}...")
    state = interpolate_state_dicts(zeroshot.state_dict(), finetuned.state_dict(), alpha)
    out = copy.deepcopy(finetuned)
    out.load_state_dict(state)
    if finetuned.recipe == "flyp" and 0.0 < alpha < 1.0:
        out.refresh_head()
    return out


__all__ = ["interpolate_state_dicts", "wise_ft"]
