"""Contrastive training of CLIP models: ``clipforge.train(TrainConfig(...)) -> summary dict``.

Modules: ``config`` (TrainConfig), ``loss`` (symmetric InfoNCE, global-batch aware),
``distributed`` (torchrun/DDP plumbing, feature gather), ``optim`` (AdamW grouping, cosine
schedule), ``step`` (one optimiser step with contrastive-exact gradient accumulation),
``checkpoint`` (resumable training state), ``metrics`` (JSONL, TensorBoard, curves), ``signals``
(graceful stop), ``evaluation`` (periodic zero-shot / validation), ``budget`` (fitting a run to
a wall-time budget), ``loop`` (the run), ``demo`` and ``report`` (the built-in scenes demo).

This package is itself callable (``clipforge.train(config)`` is ``clipforge.train.train(config)``):
the name ``clipforge.train`` is both the subpackage and the entry point, and Python binds the
subpackage to that attribute whenever it is imported, so the module has to be the function too.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .config import TrainConfig
from .loop import train


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["train", "TrainConfig"]
