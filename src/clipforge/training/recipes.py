"""The training recipes beyond plain CLIP (open_clip's flag names; docs/recipes.md): their
config checks and the one place they act on the model before the optimiser is built.

- Patch dropout (FLIP, Li et al. 2023; open_clip's ``--force-patch-dropout``): each training
  image keeps ``round((1 - p) * grid^2)`` of its patch tokens (and the class token), drawn from
  torch's generator (checkpointed, so resumption is exact; replayed under accumulation, see
  :mod:`.replay`); the fast ViT never computes the dropped ones. Off in eval mode.
- Partial locking and layer-wise learning-rate decay of either tower: :mod:`.lock`.
- Zero-shot on a labelled dataset while training (open_clip's ``--imagenet-val`` and
  ``--zeroshot-frequency``, here in steps): :class:`.evaluation.LabelledZeroShot` at its own cadence.
- Augmentation (``--aug-cfg``, open_clip's ``AugmentationCfg`` names): :mod:`clipforge.augment`.
- LoRA adapters (:mod:`.lora`): only they train; at the end ``lora.safetensors`` (adapters
  alone) and ``final.safetensors`` (merged).
- Distillation from a teacher checkpoint (open_clip's ``--distill-model``): :mod:`.distill`.
- Learning-rate schedules ``cosine | const | const-cooldown``: :mod:`.schedule`.
- Preprocessing overrides (open_clip's ``--image-mean/--image-std/--image-interpolation/
  --image-resize-mode``): written into the model's ``PreprocessConfig``, so the saved model
  carries them and evaluation prepares images as training did.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..augment import AugmentationConfig
from ..config import PreprocessConfig
from ..models import CLIP
from ..preprocess import Preprocess, image_transform
from .lock import layer_decay_scales, lock_image, lock_text
from .distill import DistillLoss, Teacher
from .distributed import DistEnv
from .lora import TOWERS, add_lora, expand_targets, merge_lora, save_lora
from .schedule import SCHEDULERS

Need = Callable[[bool, str, str], None]


def check_recipes(cfg: Any, need: Need) -> None:
    """Validate the recipe fields of a ``TrainConfig`` (``need(cond, key, message)`` raises)."""
    need(isinstance(cfg.patch_dropout, (int, float)) and 0.0 <= cfg.patch_dropout < 1.0, "patch_dropout",
         "must be in [0, 1) (the fraction of patch tokens dropped per training image)")
    for key in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        need(isinstance(getattr(cfg, key), int) and getattr(cfg, key) >= 0, key, "must be an integer >= 0")
    for key, lock in (("lock_image_unlocked_groups", "lock_image"), ("lock_image_freeze_bn_stats", "lock_image"),
                      ("lock_text_unlocked_layers", "lock_text"), ("lock_text_freeze_layer_norm", "lock_text")):
        need(not getattr(cfg, key) or getattr(cfg, lock), key, f"acts on a locked tower: set {lock} too")
    need(not (cfg.patch_dropout and cfg.lock_image and not cfg.lock_image_unlocked_groups), "patch_dropout",
         "a fully locked image tower runs in eval mode, where patch dropout is off; unlock some groups "
         "(lock_image_unlocked_groups) or drop one of the two")
    need(isinstance(cfg.zeroshot_frequency, int) and cfg.zeroshot_frequency >= 0, "zeroshot_frequency",
         "must be an integer >= 0 (0: at eval_every)")
    need(not cfg.zeroshot_data or cfg.zeroshot_frequency or cfg.eval_every, "zeroshot_frequency",
         "zeroshot_data needs a cadence: zeroshot_frequency N (steps) or eval_every N")
    need(isinstance(cfg.zeroshot_n, int) and cfg.zeroshot_n >= 1, "zeroshot_n", "must be an integer >= 1")
    need(isinstance(cfg.aug_cfg, dict), "aug_cfg", "must be a mapping of AugmentationCfg names to values")
    try:
        cfg.aug_cfg = AugmentationConfig.from_dict(cfg.aug_cfg).to_dict()  # canonical: only non-defaults
    except (ValueError, TypeError) as e:
        need(False, "aug_cfg", str(e))
    need(isinstance(cfg.lora_rank, int) and cfg.lora_rank >= 0, "lora_rank", "must be an integer >= 0 (0: off)")
    need(cfg.lora_alpha > 0, "lora_alpha", "must be > 0")
    try:
        expand_targets(cfg.lora_targets)
    except ValueError as e:
        need(False, "lora_targets", str(e))
    need(bool(cfg.lora_towers) and all(t in TOWERS for t in cfg.lora_towers), "lora_towers",
         f"must name towers among {', '.join(TOWERS)}")
    if cfg.distill_model is not None:
        need(cfg.objective == "contrastive", "distill_model", "distils contrastive logits: objective contrastive only")
        need(not cfg.local_loss, "distill_model", "is not combined with local_loss (the distillation term "
             "needs the full logits)")
        need(cfg.distill_weight > 0, "distill_weight", "must be > 0")
        need("mirror" not in cfg.hard_negatives, "distill_model", "is not combined with mirror companions "
             "(the teacher scores the batch as it was drawn)")
        need(getattr(cfg, "loss", "clip") == "clip", "distill_model", "distils softmax (clip) logits; with the "
             "sigmoid loss (siglip) it is not offered")
    need(cfg.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}")
    need(isinstance(cfg.lr_cooldown_steps, int) and 0 <= cfg.lr_cooldown_steps <= cfg.steps, "lr_cooldown_steps",
         "must be an integer in [0, steps]")
    need(cfg.lr_scheduler != "const-cooldown" or cfg.lr_cooldown_steps > 0, "lr_cooldown_steps",
         "const-cooldown needs the number of cooldown steps (> 0)")
    need(0 <= cfg.lr_cooldown_end < cfg.lr, "lr_cooldown_end", "must be in [0, lr)")
    need(cfg.lr_cooldown_power > 0, "lr_cooldown_power", "must be > 0")
    for key in ("image_mean", "image_std"):
        v = getattr(cfg, key)
        need(v is None or (len(v) == 3 and all(isinstance(x, (int, float)) for x in v)), key, "needs 3 numbers")
    need(cfg.image_std is None or all(x > 0 for x in cfg.image_std), "image_std", "values must be > 0")
    need(cfg.image_interpolation in (None, "bicubic", "bilinear"), "image_interpolation", "must be bicubic or bilinear")
    need(cfg.image_resize_mode in (None, "shortest", "squash"), "image_resize_mode", "must be shortest or squash")
    for key in ("layer_decay_image", "layer_decay_text"):
        need(isinstance(getattr(cfg, key), (int, float)) and 0 < getattr(cfg, key) <= 1, key, "must be in (0, 1]")


def set_patch_dropout(model: CLIP, p: float) -> None:
    """Drop the fraction ``p`` of each training image's patch tokens (ViT image towers only)."""
    if p and model.config.vision.kind != "vit":
        raise ValueError(f"patch_dropout {p}: needs a ViT image tower, this model's is {model.config.vision.kind!r}")
    model.visual.patch_dropout = float(p)


def override_preprocess(model: CLIP, cfg: Any) -> None:
    """``image_mean`` / ``image_std`` / ``image_interpolation`` / ``image_resize_mode`` into the
    model's preprocessing config (recorded with the model)."""
    changes = {k: v for k, v in (("mean", cfg.image_mean), ("std", cfg.image_std),
                                 ("interpolation", cfg.image_interpolation), ("resize_mode", cfg.image_resize_mode))
               if v is not None}
    if changes:
        model.config.preprocess = dataclasses.replace(model.config.preprocess, **changes)


def apply_recipes(model: CLIP, cfg: Any) -> None:
    """Everything the recipes of ``cfg`` change on the model before its optimiser is built."""
    override_preprocess(model, cfg)
    set_patch_dropout(model, cfg.patch_dropout)
    if cfg.lock_image:
        lock_image(model, cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        lock_text(model, cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)
    if cfg.lora_rank:  # after fast.enable (the parametrization subclasses the fast classes)
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_towers, seed=cfg.seed)


def attach_distillation(step_fn: Any, model: CLIP, cfg: Any, env: DistEnv) -> None:
    """With ``cfg.distill_model``: the step's loss becomes contrastive + weight x distillation."""
    if cfg.distill_model is None:
        return
    teacher = Teacher(cfg.distill_model, model, env.device, cfg.distill_precision)
    step_fn.loss_fn = DistillLoss(step_fn.loss_fn, teacher, cfg.distill_weight, env, cfg.gather_with_grad)


def finish_recipes(model: CLIP, cfg: Any, run_dir: Any) -> CLIP:
    """The model to save as the run's final weights: with LoRA, the adapters are first written
    alone to ``run_dir/lora.safetensors``, then merged into the weights."""
    if cfg.lora_rank:
        save_lora(model, Path(run_dir) / "lora.safetensors", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                  cfg.lora_towers)
        merge_lora(model)
    return model


def train_transform(preprocess: PreprocessConfig, cfg: Any) -> Preprocess:
    """The training images' transform: the model's preprocessing with ``cfg.aug_cfg``."""
    return image_transform(preprocess, train=True, aug=AugmentationConfig.from_dict(cfg.aug_cfg))


def lr_scales(model: CLIP, cfg: Any) -> dict[str, float] | None:
    """The optimiser's per-parameter learning-rate factors (layer decay), or None when off."""
    if cfg.layer_decay_image == 1.0 and cfg.layer_decay_text == 1.0:
        return None
    return layer_decay_scales(model, cfg.layer_decay_image, cfg.layer_decay_text)


__all__ = ["check_recipes", "set_patch_dropout", "apply_recipes", "attach_distillation", "finish_recipes", "lr_scales", "train_transform"]
