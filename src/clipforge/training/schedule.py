"""Learning-rate schedules beyond the cosine (open_clip's ``--lr-scheduler``): ``const`` (linear
warm-up, then the base rate) and ``const-cooldown`` (warm-up, the base rate, then over the last
``cooldown_steps`` a decay ``(1 - e / E) ** power`` from the base rate to ``cooldown_end``: the
schedule for continued training, where a run at constant rate can be cooled down from any of its
checkpoints). ``cosine`` is :class:`.optim.CosineWarmup`. open_clip counts the cooldown in epochs
(``--epochs-cooldown``); here it is in optimiser steps."""

from __future__ import annotations

from typing import Any

import torch

from .optim import CosineWarmup

SCHEDULERS = ("cosine", "const", "const-cooldown")


def const_lr(step: int, base_lr: float, warmup: int) -> float:
    """``base * (step + 1) / warmup`` during warm-up, then ``base``."""
    return base_lr * (step + 1) / warmup if step < warmup else base_lr


def const_cooldown_lr(step: int, base_lr: float, warmup: int, total: int, cooldown_steps: int,
                      power: float = 1.0, end_lr: float = 0.0) -> float:
    """open_clip's ``const_lr_cooldown``: constant after warm-up; from ``total - cooldown_steps``
    the rate falls as ``(1 - e / E) ** power`` from ``base`` to ``end_lr``."""
    start = total - cooldown_steps
    if step < warmup or step < start:
        return const_lr(step, base_lr, warmup)
    decay = (1.0 - (step - start) / max(total - start, 1)) ** power
    return decay * (base_lr - end_lr) + end_lr


class Schedule(CosineWarmup):
    """:class:`CosineWarmup`'s interface (per-group ``lr_scale``, stateless but for its settings)
    for ``kind`` in :data:`SCHEDULERS`."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: int, total: int,
                 kind: str = "cosine", cooldown_steps: int = 0, power: float = 1.0, end_lr: float = 0.0) -> None:
        super().__init__(optimizer, base_lr, warmup, total)
        if kind not in SCHEDULERS:
            raise ValueError(f"lr_scheduler {kind!r}: expected one of {', '.join(SCHEDULERS)}")
        self.kind, self.cooldown_steps, self.power, self.end_lr = kind, cooldown_steps, power, end_lr

    def lr(self, step: int) -> float:
        if self.kind == "const":
            return const_lr(step, self.base_lr, self.warmup)
        if self.kind == "const-cooldown":
            return const_cooldown_lr(step, self.base_lr, self.warmup, self.total, self.cooldown_steps, self.power,
                                     self.end_lr)
        return super().lr(step)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: Any, total: int | None = None) -> CosineWarmup:
    """The run's schedule: :class:`CosineWarmup` for ``cosine`` (checkpoints unchanged), else a
    :class:`Schedule`. ``total``: the run's steps (default ``cfg.steps``; a fine-tuning run may
    count epochs)."""
    total = cfg.steps if total is None else total
    if cfg.lr_scheduler == "cosine":
        return CosineWarmup(optimizer, cfg.lr, cfg.warmup, total)
    cooldown = cfg.lr_cooldown_steps if cfg.lr_scheduler == "const-cooldown" else 0
    if cooldown > total:
        raise ValueError(f"lr_cooldown_steps {cooldown}: more than the run's {total} steps")
    return Schedule(optimizer, cfg.lr, cfg.warmup, total, cfg.lr_scheduler, cooldown, cfg.lr_cooldown_power,
                    cfg.lr_cooldown_end)


__all__ = ["SCHEDULERS", "const_lr", "const_cooldown_lr", "Schedule", "make_schedule"]
