"""``clipforge train``: training (contrastive, or the paper's bag-of-words / captioning baselines with
``--objective``) from flags and/or a YAML/JSON config file.

Precedence: built-in defaults < ``--config FILE`` < explicit flags. ``--resume RUN_DIR`` continues
a run from its saved config and newest checkpoint (only logging/saving cadence, workers and the
time limit may be changed). Exit codes: 0 finished (or stopped by --time-limit), 1 bad input,
130/143 stopped by SIGINT/SIGTERM after writing a checkpoint.
Multi-process: ``torchrun --nproc-per-node N $(which clipforge) train ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import (ListAction, add_device_option, add_precision_option, add_trust_torchscript_option, any_int,
                      existing_dir, existing_file, existing_path, non_negative_float, non_negative_int, nonempty_str,
                      output_dir, positive_float, positive_int)
from .train_recipes import add_recipe_arguments


def _bool_flag(p: Any, name: str, help: str) -> None:
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def _run_dir_or_url(text: str) -> str:
    """``--resume``: an existing run folder, or the URL of its ``--remote-sync`` copy."""
    return text if "://" in text and not text.startswith("file://") else existing_dir(text)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; defaults are None so only given flags override (the
    defaults shown are TrainConfig's)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--config", metavar="FILE", type=existing_file,
                   help="YAML or JSON file of options (flags override it; values converted to the option types)")
    g.add_argument("--model", help="architecture to train from scratch: zoo name (tiny-vit, ViT-B/32, ...) or a "
                                   "CLIPConfig .json (default tiny-vit); a checkpoint path here = --init CKPT")
    g.add_argument("--init", "--pretrained", dest="init", metavar="CKPT", type=existing_path,
                   help="start from these weights (any checkpoint format; the architecture is the checkpoint's)")
    add_trust_torchscript_option(g)
    g.add_argument("--objective", choices=("contrastive", "bow", "caption"),
                   help="what the image tower learns from the captions (the paper's Figure 2): contrastive "
                        "(CLIP), bow (predict the caption's bag of BPE tokens), caption (predict its tokens "
                        "in order with CLIP's text Transformer as decoder) (default contrastive)")
    g.add_argument("--loss", choices=("clip", "siglip"),
                   help="contrastive loss: clip (softmax over the batch) or siglip (a sigmoid per image-text "
                        "pair with a learned logit bias; the model gets bias -10 and temperature 10 at init "
                        "unless it has a bias already) (default clip)")
    g.add_argument("--siglip", dest="loss", action="store_const", const="siglip",
                   help="= --loss siglip (open_clip_train's flag)")
    g.add_argument("--data", type=nonempty_str,
                   help="builtin:scenes | manifest .csv/.tsv/.jsonl | shards: path, brace pattern (shards/{00000..00099}.tar), "
                        "glob or folder, also as http(s)://, s3://, gs:// URL or 'pipe:CMD' (default builtin:scenes)")
    g.add_argument("--val-data", type=nonempty_str,
                   help="validation pairs for periodic evaluation (same spec forms; default none)")
    g.add_argument("--csv-separator", metavar="SEP",
                   help="CSV/TSV manifest delimiter, as open_clip_train's --csv-separator ('\\t' or tab, ',', ';'); "
                        "default: tab for .tsv, sniffed from the header line for .csv")
    g.add_argument("--csv-img-key", metavar="COLUMN",
                   help="manifest column of image paths (open_clip_train: filepath); default: auto-detected among "
                        "filepath, image, path, file, image_path, filename, img")
    g.add_argument("--csv-caption-key", metavar="COLUMN",
                   help="manifest column of captions (open_clip_train: title); default: auto-detected among "
                        "caption, text, title, captions, sentence")
    g.add_argument("--workers", dest="num_workers", type=non_negative_int,
                   help="data-loading worker processes per rank (default 2)")
    _bool_flag(g, "--resampled", "sample shards with replacement instead of epochs (default off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, help="optimiser steps (default 1000)")
    g.add_argument("--batch-size", type=positive_int, help="pairs per micro-batch per process (default 128)")
    g.add_argument("--accum-steps", type=positive_int,
                   help="micro-batches per step; the loss sees all of them (default 1)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (default 5e-4)")
    g.add_argument("--wd", type=non_negative_float, help="AdamW weight decay on weight matrices (default 0.1)")
    g.add_argument("--betas", action=ListAction, item=non_negative_float, count=2, metavar="B1,B2",
                   help="AdamW betas (default 0.9,0.98)")
    g.add_argument("--eps", type=positive_float, help="AdamW epsilon (default 1e-6)")
    g.add_argument("--warmup", type=non_negative_int,
                   help="linear warm-up steps before the cosine decay (default 100)")
    g.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm to this value (default off)")
    add_precision_option(g, "train", default=None)
    g.add_argument("--hard-negatives", choices=("none", "swap", "mirror", "swap,mirror"),
                   help="swap: add rule-built negative captions per caption (left<->right, above<->below, "
                        "colours, objects swapped, counts changed) as extra columns of their own image's row "
                        "of the loss, NegCLIP-style; mirror: add each sample's re-arranged scene / flipped photo "
                        "with its left/right-swapped caption as one more pair of the batch; swap,mirror: both "
                        "(default none)")
    g.add_argument("--hard-negatives-other", choices=("skip", "flip"),
                   help="mirror, photos whose caption has no left/right word: skip (no companion) or flip "
                        "(flip their own image half the time, caption unchanged) (default skip)")
    g.add_argument("--hard-negatives-per-caption", type=positive_int, metavar="N",
                   help="at most N hard negatives per caption, drawn with --seed when more rules apply (default 3)")
    _bool_flag(g, "--grad-checkpointing", "recompute activations in backward (less memory; default off)")
    _bool_flag(g, "--local-loss", "each process computes only its rows of the logits (needs --gather-with-grad; "
                                  "default off)")
    _bool_flag(g, "--gather-with-grad", "back-propagate through the feature all-gather (default off)")
    g.add_argument("--seed", type=any_int, help="seed for init, data order and augmentation (default 0)")
    _bool_flag(g, "--deterministic", "deterministic kernels (bit-exact resumption; default off)")
    add_device_option(g, default=None)
    g.add_argument("--threads", type=positive_int, help="torch threads per process (default: torch's choice)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", type=output_dir, help="run folder (default runs/train)")
    g.add_argument("--resume", metavar="RUN_DIR", type=_run_dir_or_url,
                   help="continue this run from its newest checkpoint; a URL: the copy --remote-sync made, "
                        "continued in --out (default: start a new run)")
    g.add_argument("--save-every", type=non_negative_int,
                   help="checkpoint every N steps; 0 = only at the end (default 500)")
    g.add_argument("--keep-last", type=positive_int, help="checkpoints to keep (default 2)")
    g.add_argument("--log-every", type=positive_int, help="metrics record every N steps (default 10)")
    g.add_argument("--eval-every", type=non_negative_int,
                   help="zero-shot / validation evaluation every N steps (0 = off, the default)")
    _bool_flag(g, "--tensorboard", "also log to <out>/tensorboard (if tensorboard is installed; default off)")
    g.add_argument("--time-limit", dest="time_limit_minutes", type=positive_float, metavar="MIN",
                   help="stop (with a checkpoint) after this many minutes (default: no limit)")
    _bool_flag(g, "--progress", "show the progress bar (default on)")
    add_recipe_arguments(p)


_NOT_OPTIONS = {"config", "command", "func", "debug", "log_level"}


def _is_checkpoint_path(spec: str) -> bool:
    """``--model`` names weights (not an architecture) when it is an existing path that is not a
    CLIPConfig ``.json`` and not a zoo name."""
    from pathlib import Path

    from ..loading import is_architecture_name

    p = Path(spec)
    return p.exists() and not (p.is_file() and p.suffix.lower() == ".json") and not is_architecture_name(spec)


def config_from_args(args: argparse.Namespace) -> Any:
    """Resolve defaults < --config file < flags into a TrainConfig (or the resume config)."""
    from ..training import TrainConfig
    from ..training.config import load_config_file

    given = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}
    if not given.get("trust_torchscript"):
        given.pop("trust_torchscript", None)  # a store_true flag not given: a --config file's value stands
    if given.get("model") and _is_checkpoint_path(given["model"]):
        if given.get("init"):
            raise ValueError(f"--model {given['model']} is a checkpoint and --init {given['init']} another: give one")
        given["init"] = given.pop("model")  # the architecture comes with the weights
    if given.get("precision") in ("bf16", "fp16"):
        print(f"note: --precision {given['precision']} casts the weights (open_clip's meaning); "
              f"autocast is amp_bf16 / amp", file=sys.stderr)
    if given.get("resume"):
        if args.config:
            given = {**load_config_file(args.config), **given}
        run_dir = given.pop("resume")
        return TrainConfig.for_resume(run_dir, **given)
    if args.config:
        return TrainConfig.from_file(args.config, given)
    return TrainConfig.from_dict(given, source="command line")


def run_train(args: argparse.Namespace) -> int:
    from ..training import train

    config = config_from_args(args)
    try:
        summary = train(config)
    except FloatingPointError as e:  # diverged: say so in one line, like other user-facing errors
        print(f"clipforge train: error: {e}", file=sys.stderr)
        return 1
    if summary.get("rank", 0) == 0:
        keys = ("status", "steps_done", "final_loss", "final_temperature", "samples_per_s_median",
                "wall_time_s", "peak_rss_mb", "final_model", "last_checkpoint")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
        skipped = (summary.get("skip_stats") or {}).get("total", 0)
        if skipped:
            print(f"skipped {skipped} bad samples: {summary['skip_stats'].get('counts')}", file=sys.stderr)
    return int(summary.get("exit_code", 0))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a CLIP model (contrastive, or --objective bow|caption)",
        description=__doc__)
    add_train_arguments(p)
    p.set_defaults(func=run_train)
