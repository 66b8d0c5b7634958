"""Training of CLIP models: ``clipforge.train(TrainConfig(...)) -> summary dict`` (re-exported from here);
contrastive by default, or the paper's bag-of-words / captioning baselines (``TrainConfig.objective``).

Modules: ``config`` (TrainConfig), ``loss`` (symmetric InfoNCE, global-batch aware), ``token_losses``
(bag-of-words and caption losses, the module DDP wraps for them),
``distributed`` (torchrun/DDP plumbing, feature gather), ``optim`` (AdamW grouping, cosine
schedule), ``step`` (one optimiser step with contrastive-exact gradient accumulation),
``checkpoint`` (resumable training state), ``metrics`` (JSONL, TensorBoard, curves), ``signals``
(graceful stop), ``evaluation`` (periodic zero-shot / validation through ``clipforge.eval``),
``timing`` (seconds per step of a config on this machine), ``loop`` (the run).
Other packages use only the names exported here (the demo lives in :mod:`clipforge.demo`).
"""

from __future__ import annotations

from .checkpoint import (capture_rng, checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                         prune_checkpoints, restore_rng, save_checkpoint)
from .config import TrainConfig
from .distill import DistillLoss, Teacher
from .evaluation import LabelledZeroShot, SceneZeroShot, ValRetrieval, default_evaluator, task_accuracy
from .loop import resolve_model_config, train
from .loss import contrastive_loss
from .token_losses import bow_loss, caption_loss
from .metrics import MetricsLog
from .optim import CosineWarmup, build_optimizer
from .recipes import (MODEL_RECIPE_FIELDS, ModelRecipes, apply_model_recipes, check_model_recipes, finish_recipes,
                      lr_scales)
from .schedule import make_schedule
from .signals import StopRequest
from .timing import measure_step_time

__all__ = ["train", "TrainConfig", "resolve_model_config", "list_checkpoints", "measure_step_time",
           "default_evaluator", "SceneZeroShot", "LabelledZeroShot", "ValRetrieval", "task_accuracy", "contrastive_loss",
           "bow_loss", "caption_loss",
           # building blocks other training-like runs reuse (clipforge.finetune): optimiser, schedule,
           # resumable checkpoints, JSONL metrics, graceful stop
           "build_optimizer", "CosineWarmup", "checkpoint_path", "latest_checkpoint", "save_checkpoint",
           "load_checkpoint", "prune_checkpoints", "capture_rng", "restore_rng", "MetricsLog", "StopRequest",
           # the recipes acting on the model (docs/recipes.md), shared with clipforge finetune
           "ModelRecipes", "MODEL_RECIPE_FIELDS", "check_model_recipes", "apply_model_recipes", "finish_recipes",
           "lr_scales", "make_schedule", "Teacher", "DistillLoss"]
