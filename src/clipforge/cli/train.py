"""``clipforge train``: contrastive training from flags and/or a YAML/JSON config file.

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


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; defaults are None so only given flags override."""
    g = p.add_argument_group("model and data")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
    g.add_argument("--model", help="zoo name (tiny-vit, ViT-B/32, ...) or a CLIPConfig .json (default tiny-vit)")
    g.add_argument("--init", metavar="CKPT", help="start from these weights (any checkpoint format)")
    g.add_argument("--data", help="builtin:scenes | manifest .csv/.tsv/.jsonl | shard pattern (default builtin:scenes)")
    g.add_argument("--val-data", help="validation pairs for periodic evaluation (same spec forms)")
    g.add_argument("--workers", dest="num_workers", type=int, help="data-loading processes per rank (default 2)")
    _bool_flag(g, "--resampled", "sample shards with replacement instead of epochs")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimiser steps (default 1000)")
    g.add_argument("--batch-size", type=int, help="pairs per micro-batch per process (default 128)")
    g.add_argument("--accum-steps", type=int, help="micro-batches per step; the loss sees all of them (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    g.add_argument("--wd", type=float, help="AdamW weight decay on weight matrices (default 0.1)")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="AdamW betas (default 0.9 0.98)")
    g.add_argument("--eps", type=float, help="AdamW epsilon (default 1e-6)")
    g.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay (default 100)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (default off)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="fp32 | bf16 autocast | fp16 (GPU)")
    _bool_flag(g, "--grad-checkpointing", "recompute activations in backward (less memory)")
    _bool_flag(g, "--lock-image", "freeze the image tower (LiT); needs --init to be useful")
    _bool_flag(g, "--local-loss", "each process computes only its rows of the logits (needs --gather-with-grad)")
    _bool_flag(g, "--gather-with-grad", "back-propagate through the feature all-gather")
    g.add_argument("--seed", type=int, help="seed for init, data order and augmentation (default 0)")
    _bool_flag(g, "--deterministic", "deterministic kernels (bit-exact resumption)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", help="run folder (default runs/train)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps; 0 = only at the end (default 500)")
    g.add_argument("--keep-last", type=int, help="checkpoints to keep (default 2)")
    g.add_argument("--log-every", type=int, help="metrics record every N steps (default 10)")
    g.add_argument("--eval-every", type=int, help="zero-shot / validation evaluation every N steps (0 = off)")
    _bool_flag(g, "--tensorboard", "also log to <out>/tensorboard (if tensorboard is installed)")
    g.add_argument("--time-limit", dest="time_limit_minutes", type=float, metavar="MIN",
                   help="stop (with a checkpoint) after this many minutes")
    _bool_flag(g, "--progress", "show the progress bar (default on)")


_NOT_OPTIONS = {"config", "command", "func", "debug"}


def config_from_args(args: argparse.Namespace) -> Any:
    """Resolve defaults < --config file < flags into a TrainConfig (or the resume config)."""
    from ..training import TrainConfig
    from ..training.config import load_config_file

    given = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}
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
        "train", help="train a CLIP model contrastively",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=run_train)
