"""Contrastive training of CLIP models: ``clipforge.train(TrainConfig(...)) -> summary dict``.

Modules: ``config`` (TrainConfig), ``loss`` (symmetric InfoNCE, global-batch aware),
``distributed`` (torchrun/DDP plumbing, feature gather), ``optim`` (AdamW grouping, cosine
schedule), ``step`` (one optimiser step with contrastive-exact gradient accumulation),
``checkpoint`` (resumable training state), ``metrics`` (JSONL, TensorBoard, curves), ``signals``
(graceful stop), ``evaluation`` (periodic zero-shot / validation), ``loop`` (the run),
``demo`` (the built-in scenes demonstration and its report).
"""

from __future__ import annotations

from .config import TrainConfig
from .loop import train

__all__ = ["train", "TrainConfig"]
