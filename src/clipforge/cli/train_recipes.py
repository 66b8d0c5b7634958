"""The ``clipforge train`` flags of the training recipes (docs/recipes.md), open_clip_train's
names where it has one; each sets the TrainConfig field of the same name."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .options import ListAction, non_negative_float, non_negative_int, positive_float, positive_int


def unit_interval(text: str) -> float:
    """A float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_model_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The recipes acting on the model, its optimiser groups and its schedule, shared by ``train``
    and ``finetune`` (TrainConfig's and FinetuneConfig's ``ModelRecipes`` fields, same names)."""
    g = p.add_argument_group("training recipes acting on the model (docs/recipes.md)")
    g.add_argument("--force-patch-dropout", "--patch-dropout", dest="patch_dropout", type=non_negative_float,
                   metavar="P", help="drop this fraction of each training image's patch tokens (FLIP; ViT only; "
                                     "off at eval; default 0)")
    _bool_flag(g, "--lock-image", "freeze the image tower (LiT); useful from pretrained weights (default off)")
    g.add_argument("--lock-image-unlocked-groups", type=non_negative_int, metavar="N",
                   help="with --lock-image: leave the last N layer groups of the image tower trainable (default 0)")
    _bool_flag(g, "--lock-image-freeze-bn-stats", "with --lock-image: keep the image tower's BatchNorm "
                                                  "statistics fixed (ResNet; default off)")
    _bool_flag(g, "--lock-text", "freeze the text tower (default off)")
    g.add_argument("--lock-text-unlocked-layers", type=non_negative_int, metavar="N",
                   help="with --lock-text: leave the last N layer groups of the text tower trainable (default 0)")
    _bool_flag(g, "--lock-text-freeze-layer-norm", "with --lock-text: freeze the LayerNorms of the locked part "
                                                   "too (default: they train)")
    g.add_argument("--layer-decay-image", type=unit_interval, metavar="D",
                   help="layer-wise LR decay of the image tower: group g of G trains at lr * D^(G-1-g) (default 1: off)")
    g.add_argument("--layer-decay-text", type=unit_interval, metavar="D",
                   help="layer-wise LR decay of the text tower (default 1: off)")
    g.add_argument("--lora-rank", type=non_negative_int, metavar="R",
                   help="train LoRA adapters of rank R instead of the base weights (frozen, temperature too); the run "
                        "leaves lora.safetensors (adapters only) beside the merged model (default 0: off)")
    g.add_argument("--lora-alpha", type=positive_float, metavar="A", help="LoRA scale alpha / rank (default 16)")
    g.add_argument("--lora-targets", action=ListAction, metavar="T,...",
                   help="adapted products: attn, mlp, or in_proj, out_proj, c_fc, c_proj (default attn,mlp)")
    g.add_argument("--lora-towers", action=ListAction, metavar="image,text",
                   help="towers with adapters (default image,text; a ResNet image tower takes none)")
    g.add_argument("--distill-model", metavar="CKPT",
                   help="teacher checkpoint (any format clipforge.load reads): loss = contrastive + "
                        "--distill-weight x CE(teacher logits, student logits), both directions (default off)")
    g.add_argument("--distill-weight", type=positive_float, metavar="W", help="distillation weight (default 1)")
    g.add_argument("--distill-precision", metavar="P",
                   help="the teacher's inference precision: fp32, bf16, auto, ... (default fp32)")
    g.add_argument("--lr-scheduler", choices=("cosine", "const", "const-cooldown"),
                   help="learning-rate schedule after the warm-up (default cosine)")
    g.add_argument("--lr-cooldown-steps", type=non_negative_int, metavar="N",
                   help="const-cooldown: the last N steps decay to --lr-cooldown-end (open_clip: --epochs-cooldown)")
    g.add_argument("--lr-cooldown-end", type=non_negative_float, metavar="LR", help="rate at the end of the cooldown (default 0)")
    g.add_argument("--lr-cooldown-power", type=positive_float, metavar="P",
                   help="cooldown shape (1 - e/E)^P (default 1: linear)")


def model_recipe_values(args: argparse.Namespace) -> dict[str, Any]:
    """The shared recipe flags given on the command line (field name -> value)."""
    from ..training import MODEL_RECIPE_FIELDS

    return {k: getattr(args, k) for k in MODEL_RECIPE_FIELDS if getattr(args, k, None) is not None}


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """``clipforge train``'s recipe flags: the shared ones and the training-only ones."""
    add_model_recipe_arguments(p)
    g = p.add_argument_group("training recipes (docs/recipes.md)")
    g.add_argument("--zeroshot-data", "--imagenet-val", dest="zeroshot_data", metavar="DATASET",
                   help="labelled dataset (any spec clipforge eval reads: folder, manifest, shards, .npz, "
                        "builtin:scenes-<task>) scored zero-shot while training, as eval/zeroshot_acc")
    g.add_argument("--zeroshot-frequency", type=non_negative_int, metavar="N",
                   help="zero-shot every N steps (default 0: at --eval-every)")
    g.add_argument("--zeroshot-classnames", metavar="NAMES",
                   help="class names: built-in set (imagenet, cifar10, ...) or file (default: the dataset's)")
    g.add_argument("--zeroshot-templates", metavar="TEMPLATES",
                   help="prompt templates: built-in set or file (default 'a photo of a {}.')")
    g.add_argument("--aug-cfg", nargs="+", metavar="KEY=VALUE", type=_key_value, action=_KeyValues,
                   help="training augmentation, open_clip's AugmentationCfg names: scale=(0.5,1) ratio=(0.75,1.33) "
                        "color_jitter=0.4 or (b,c,s,h) color_jitter_prob=0.8 gray_scale_prob=0.2 re_prob=0.25 "
                        "re_count=1 interpolation=bicubic|bilinear|nearest (default: crop scale 0.9-1 only)")
    g.add_argument("--image-mean", action=ListAction, item=float, count=3, metavar="R,G,B",
                   help="override the model's normalisation mean (recorded in the saved model's config)")
    g.add_argument("--image-std", action=ListAction, item=positive_float, count=3, metavar="R,G,B",
                   help="override the model's normalisation std")
    g.add_argument("--image-interpolation", choices=("bicubic", "bilinear"),
                   help="override the model's resize interpolation (eval transform)")
    g.add_argument("--image-resize-mode", choices=("shortest", "squash"), help="override the model's resize mode")
    g.add_argument("--report-to", type=_report_to, action=_ReportTo, metavar="tensorboard,wandb",
                   help="also log the scalars to tensorboard (= --tensorboard) and/or wandb (Weights & Biases; needs "
                        "the wandb package; WANDB_MODE=offline for no network) (default: metrics.jsonl only)")
    g.add_argument("--wandb-project-name", metavar="NAME", help="wandb project (default clipforge)")
    g.add_argument("--zeroshot-n", type=positive_int, metavar="N",
                   help="images scored, a fixed class-stratified sample (default 500)")
    g.add_argument("--remote-sync", metavar="URL",
                   help="copy the run folder's finished files (checkpoints, records, final model) to this fsspec URL "
                        "(s3://, gs://, memory://, ...) or path, at each checkpoint and at the end; --resume URL "
                        "--out DIR continues from that copy (default off)")
    g.add_argument("--remote-sync-frequency", type=non_negative_int, metavar="N",
                   help="also sync every N steps (open_clip counts seconds; steps keep runs timing-independent) "
                        "(default 0: at checkpoints only)")
    g.add_argument("--remote-sync-protocol", choices=("fsspec",),
                   help="open_clip's option; fsspec only (an s3:// URL needs s3fs) (default fsspec)")
    g.add_argument("--train-data-upsampling-factors", type=_factors, metavar="F1::F2",
                   help="with --resampled and '::'-joined shard sources in --data: each source's shards are drawn "
                        "with this weight (open_clip's meaning; default: every shard alike)")


def _key_value(text: str) -> tuple[str, Any]:
    from ..augment import parse_key_values  # small, but the CLI imports capabilities when a command runs

    try:
        return next(iter(parse_key_values([text]).items()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _factors(text: str) -> list[float]:
    """``1::3`` -> ``[1.0, 3.0]`` (open_clip's spelling; the count is checked against --data)."""
    try:
        values = [float(x) for x in text.split("::")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers joined by '::' (1::3), got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise argparse.ArgumentTypeError(f"factors must be numbers >= 0, not all 0, got {text!r}")
    return values


def _report_to(text: str) -> set[str]:
    names = {t.strip() for t in text.split(",") if t.strip()}
    if not names or names - {"tensorboard", "wandb"}:
        raise argparse.ArgumentTypeError(f"expected tensorboard, wandb or both (tensorboard,wandb), got {text!r}")
    return names


class _ReportTo(argparse.Action):
    """``--report-to tensorboard,wandb`` -> the ``tensorboard`` and ``wandb`` fields."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        for name in values:
            setattr(namespace, name, True)


class _KeyValues(argparse.Action):
    """``KEY=VALUE ...`` -> a dict (what TrainConfig.aug_cfg holds)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, dict(values))


def _bool_flag(g: Any, name: str, help: str, dest: str | None = None) -> None:
    kw = {"dest": dest} if dest else {}
    g.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help, **kw)
