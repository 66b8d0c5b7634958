"""Contrastive training of CLIP models: ``clipforge.train(TrainConfig(...)) -> summary dict`` (re-exported from here).

Modules: ``config`` (TrainConfig), ``loss`` (symmetric InfoNCE, global-batch aware),
``distributed`` (torchrun/DDP plumbing, feature gather), ``optim`` (AdamW grouping, cosine
schedule), ``step`` (one optimiser step with contrastive-exact gradient accumulation),
``checkpoint`` (resumable training state), ``metrics`` (JSONL, TensorBoard, curves), ``signals``
(graceful stop), ``evaluation`` (periodic zero-shot / validation), ``budget`` (fitting a run to
a wall-time budget), ``loop`` (the run), ``demo`` and ``report`` (the built-in scenes demo).

"""

from __future__ import annotations

from .config import TrainConfig
from .loop import train

__all__ = ["train", "TrainConfig"]
