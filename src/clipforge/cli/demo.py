"""``clipforge demo``: train a tiny CLIP on the built-in scenes on this CPU within a few minutes,
then print zero-shot accuracy (held-out colour-shape combinations, counting, position) and
retrieval Recall@1/5 beside chance, and write a report folder (results.json, curves.png,
report.html with example retrievals)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import (add_device_option, add_precision_option, add_progress_option, any_int, non_negative_int,
                      output_dir, positive_float, positive_int)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(out=args.out, minutes=args.minutes, steps=args.steps, quick=args.quick,
                            seed=args.seed, progress=args.progress, device=args.device, precision=args.precision)
    for key in ("model", "batch_size", "lr", "num_workers", "threads"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    results = run_demo(settings)
    if results.get("status") != "completed":
        print(f"demo interrupted; run the same command again to resume ({results.get('run_dir')})", file=sys.stderr)
        return int(results.get("exit_code", 130))
    print()
    print(results["table"])
    print(f"\n{results['steps']} steps, wall time {results['wall_time_s'] / 60:.1f} min "
          f"(training {results['train_time_s'] / 60:.1f} min, evaluation {results['eval_time_s']:.0f} s); "
          f"report: {args.out}/report.html")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="train and evaluate a tiny CLIP on built-in scenes (CPU, minutes)",
                              description=__doc__)
    p.add_argument("--out", default="runs/demo", type=output_dir, help="report folder")
    p.add_argument("--minutes", type=positive_float, default=8.0, help="wall-time budget including evaluation")
    p.add_argument("--steps", type=positive_int, help="train exactly this many steps instead of fitting the budget")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke version (low accuracy expected)")
    p.add_argument("--seed", type=any_int, default=0, help="seed for init, data order and augmentation")
    p.add_argument("--model", help="architecture to train from scratch (default tiny-vit-p16)")
    p.add_argument("--batch-size", type=positive_int, help="pairs per step (default 128)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-3)")
    p.add_argument("--workers", dest="num_workers", type=non_negative_int,
                   help="data-loading worker processes (default 1)")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads (default: the faster of 1 and 2, timed at start)")
    add_device_option(p)
    add_precision_option(p, "train")
    add_progress_option(p)
    p.set_defaults(func=run_demo_cmd)
