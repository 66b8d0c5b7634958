"""AdamW with CLIP's weight-decay grouping, and the cosine learning-rate schedule with linear
warm-up (as in OpenCLIP's ``cosine_lr``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases (any tensor of dim < 2), embeddings (token, positional, class) and the
    temperature are not decayed: shrinking them towards zero is not a sensible prior."""
    parts = name.split(".")
    return param.dim() < 2 or any("embedding" in part for part in parts) or parts[-1] == "logit_scale"


def param_groups(model: nn.Module, weight_decay: float,
                 lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: decayed and not decayed (two groups), split
    further by learning-rate scale (``lr_scales``: name -> factor, layer decay; a group's
    ``lr_scale`` is what the schedule multiplies). Frozen parameters (e.g. a locked tower) are
    left out so the optimiser holds no state for them."""
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not no_decay(name, p)
        scale = (lr_scales or {}).get(name, 1.0)
        g = groups.setdefault((decayed, scale), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                                 "names": [], "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (is every tower locked?)")
    if lr_scales is None:  # the two plain groups, always both (as checkpoints of earlier runs hold)
        plain = {"params": [], "names": [], "lr_scale": 1.0}
        return [groups.get((True, 1.0), {**plain, "weight_decay": weight_decay}),
                groups.get((False, 1.0), {**plain, "weight_decay": 0.0})]
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], -k[1]))]


FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, lr_scales: dict[str, float] | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, lr_scales)
    for g in groups:
        g.pop("names")
        if lr_scales is None:
            g.pop("lr_scale")
    # torch's fused AdamW kernel (one pass over each tensor) on CPU and CUDA. On a 2-core CPU its step
    # is 3-5x faster than the per-tensor loop torch picks there by default: 1-5% of a training step
    # (benchmarks/optimizer_step.py).
    fused = all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate for 0-based optimiser step ``step``: ``base*(step+1)/warmup`` during warm-up,
    then a half cosine from ``base_lr`` at ``step == warmup`` down to 0 at ``step == total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = total - warmup
    if span <= 0:
        return base_lr
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


class CosineWarmup:
    """Sets each parameter group's ``lr`` for a given step (stateless apart from its settings,
    so resuming only needs the step number; the settings are saved to catch mismatches)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: int, total: int) -> None:
        self.optimizer = optimizer
        self.base_lr, self.warmup, self.total = base_lr, warmup, total
        self.last_step = -1

    def lr(self, step: int) -> float:
        return cosine_lr(step, self.base_lr, self.warmup, self.total)

    def __call__(self, step: int) -> float:
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay (training.lock)
        self.last_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "warmup": self.warmup, "total": self.total, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("base_lr", "warmup", "total"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"checkpoint schedule {key}={state.get(key)!r} differs from the config's "
                                 f"{getattr(self, key)!r}")
        self.last_step = int(state["last_step"])


__all__ = ["no_decay", "param_groups", "build_optimizer", "cosine_lr", "CosineWarmup"]
