"""The training recipes beyond plain CLIP (open_clip's flag names; docs/recipes.md): their
config checks and the one place they act on the model before the optimiser is built.

- Patch dropout (FLIP, Li et al. 2023; open_clip's ``--force-patch-dropout``): each training
  image keeps ``round((1 - p) * grid^2)`` of its patch tokens (and the class token), drawn from
  torch's generator (checkpointed, so resumption is exact; replayed under accumulation, see
  :mod:`.replay`); the fast ViT never computes the dropped ones. Off in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable

from ..models import CLIP

Need = Callable[[bool, str, str], None]


def check_recipes(cfg: Any, need: Need) -> None:
    """Validate the recipe fields of a ``TrainConfig`` (``need(cond, key, message)`` raises)."""
    need(isinstance(cfg.patch_dropout, (int, float)) and 0.0 <= cfg.patch_dropout < 1.0, "patch_dropout",
         "must be in [0, 1) (the fraction of patch tokens dropped per training image)")


def set_patch_dropout(model: CLIP, p: float) -> None:
    """Drop the fraction ``p`` of each training image's patch tokens (ViT image towers only)."""
    if p and model.config.vision.kind != "vit":
        raise ValueError(f"patch_dropout {p}: needs a ViT image tower, this model's is {model.config.vision.kind!r}")
    model.visual.patch_dropout = float(p)


def apply_recipes(model: CLIP, cfg: Any) -> None:
    """Everything the recipes of ``cfg`` change on the model before its optimiser is built."""
    set_patch_dropout(model, cfg.patch_dropout)


__all__ = ["check_recipes", "set_patch_dropout", "apply_recipes"]
