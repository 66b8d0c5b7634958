"""``clipforge demo``: train a tiny CLIP on the built-in scenes on this CPU within a few minutes,
then print zero-shot accuracy (held-out colour-shape combinations, counting, position) and
retrieval Recall@1/5 beside chance, and write a report folder (results.json, curves.png,
report.html with example retrievals)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def run_demo_cmd(args: argparse.Namespace) -> int:
    from ..training.demo import DemoSettings, run_demo

    settings = DemoSettings(out=args.out, minutes=args.minutes, steps=args.steps, quick=args.quick,
                            seed=args.seed, progress=not args.no_progress)
    for key in ("model", "batch_size", "lr", "num_workers", "threads"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    if settings.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {settings.minutes}")
    if settings.steps is not None and settings.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {settings.steps}")
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
    p.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget including evaluation (default 8)")
    p.add_argument("--steps", type=int, help="train exactly this many steps instead of fitting the budget")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke version (low accuracy expected)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="architecture (default tiny-vit-p16)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--workers", dest="num_workers", type=int, help="data-loading processes (default 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: the faster of 1 and 2, timed at start)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=run_demo_cmd)
