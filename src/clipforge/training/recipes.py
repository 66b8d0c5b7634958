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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

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


@dataclass(kw_only=True)
class ModelRecipes:
    """The recipe fields of every run that trains a CLIP (``TrainConfig`` and ``FinetuneConfig``
    both derive from this, so ``clipforge train`` and ``clipforge finetune`` share one definition,
    one set of flags and one check): what acts on the model, its optimiser groups and its schedule."""

    patch_dropout: float = 0.0  # open_clip's --force-patch-dropout: fraction of patch tokens dropped (FLIP)
    lock_image: bool = False  # freeze the image tower (LiT) but its last lock_image_unlocked_groups (.lock)
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False  # with lock_image: BatchNorm running statistics fixed
    lock_text: bool = False  # freeze the text tower (but its last lock_text_unlocked_layers groups)
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False  # also freeze the LayerNorms of the locked text part
    layer_decay_image: float = 1.0  # layer-wise LR decay per tower group (1: off)
    layer_decay_text: float = 1.0
    lora_rank: int = 0  # LoRA adapters of this rank (0: off); only they train (.lora)
    lora_alpha: float = 16.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["attn", "mlp"])
    lora_towers: list[str] = dataclasses.field(default_factory=lambda: ["image", "text"])
    distill_model: str | None = None  # teacher checkpoint (any format clipforge.load reads) (.distill)
    distill_weight: float = 1.0  # weight of the distillation term beside the contrastive loss
    distill_precision: str = "fp32"  # the teacher's inference precision (fp32, bf16, auto, ...)
    lr_scheduler: Literal["cosine", "const", "const-cooldown"] = "cosine"  # (.schedule)
    lr_cooldown_steps: int = 0  # const-cooldown: the last N steps decay to lr_cooldown_end
    lr_cooldown_end: float = 0.0
    lr_cooldown_power: float = 1.0  # 1: linear


MODEL_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelRecipes))


def check_model_recipes(cfg: Any, need: Need) -> None:
    """Validate the :class:`ModelRecipes` fields of ``cfg`` (``need(cond, key, message)`` raises).
    ``cfg.steps`` may be None (a fine-tuning length in epochs: checked when the run starts)."""
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
    need(isinstance(cfg.lora_rank, int) and cfg.lora_rank >= 0, "lora_rank", "must be an integer >= 0 (0: off)")
    need(cfg.lora_alpha > 0, "lora_alpha", "must be > 0")
    try:
        expand_targets(cfg.lora_targets)
    except ValueError as e:
        need(False, "lora_targets", str(e))
    need(bool(cfg.lora_towers) and all(t in TOWERS for t in cfg.lora_towers), "lora_towers",
         f"must name towers among {', '.join(TOWERS)}")
    need(cfg.distill_weight > 0, "distill_weight", "must be > 0")
    need(cfg.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}")
    need(isinstance(cfg.lr_cooldown_steps, int) and 0 <= cfg.lr_cooldown_steps
         and (cfg.steps is None or cfg.lr_cooldown_steps <= cfg.steps), "lr_cooldown_steps",
         "must be an integer in [0, steps]")
    need(cfg.lr_scheduler != "const-cooldown" or cfg.lr_cooldown_steps > 0, "lr_cooldown_steps",
         "const-cooldown needs the number of cooldown steps (> 0)")
    need(0 <= cfg.lr_cooldown_end < cfg.lr, "lr_cooldown_end", "must be in [0, lr)")
    need(cfg.lr_cooldown_power > 0, "lr_cooldown_power", "must be > 0")
    for key in ("layer_decay_image", "layer_decay_text"):
        need(isinstance(getattr(cfg, key), (int, float)) and 0 < getattr(cfg, key) <= 1, key, "must be in (0, 1]")


def check_recipes(cfg: Any, need: Need) -> None:
    """Validate the recipe fields of a ``TrainConfig`` (``need(cond, key, message)`` raises)."""
    check_model_recipes(cfg, need)
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
    if cfg.distill_model is not None:
        need(cfg.objective == "contrastive", "distill_model", "distils contrastive logits: objective contrastive only")
        need(not cfg.local_loss, "distill_model", "is not combined with local_loss (the distillation term "
             "needs the full logits)")
        need("mirror" not in cfg.hard_negatives, "distill_model", "is not combined with mirror companions "
             "(the teacher scores the batch as it was drawn)")
        need(getattr(cfg, "loss", "clip") == "clip", "distill_model", "distils softmax (clip) logits; with the "
             "sigmoid loss (siglip) it is not offered")
    for key in ("image_mean", "image_std"):
        v = getattr(cfg, key)
        need(v is None or (len(v) == 3 and all(isinstance(x, (int, float)) for x in v)), key, "needs 3 numbers")
    need(cfg.image_std is None or all(x > 0 for x in cfg.image_std), "image_std", "values must be > 0")
    need(cfg.image_interpolation in (None, "bicubic", "bilinear"), "image_interpolation", "must be bicubic or bilinear")
    need(cfg.image_resize_mode in (None, "shortest", "squash"), "image_resize_mode", "must be shortest or squash")


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
    apply_model_recipes(model, cfg)


def apply_model_recipes(model: CLIP, cfg: Any) -> None:
    """The :class:`ModelRecipes` of ``cfg`` on the model: patch dropout, locking, LoRA (in this
    order; LoRA last, as it freezes every base weight)."""
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


def lr_scales(model: CLIP, cfg: Any, prefix: str = "") -> dict[str, float] | None:
    """The optimiser's per-parameter learning-rate factors (layer decay), or None when off.
    ``prefix``: the CLIP's name inside the module the optimiser sees (``"clip."`` in a classifier)."""
    if cfg.layer_decay_image == 1.0 and cfg.layer_decay_text == 1.0:
        return None
    return {prefix + k: v for k, v in layer_decay_scales(model, cfg.layer_decay_image, cfg.layer_decay_text).items()}


__all__ = ["ModelRecipes", "MODEL_RECIPE_FIELDS", "check_model_recipes", "check_recipes", "set_patch_dropout", "apply_recipes", "apply_model_recipes", "attach_distillation", "finish_recipes", "lr_scales", "train_transform"]
