"""``clipforge experiment``: the paper's own experiments at small scale, on this machine.

  objectives   Figure 2: contrastive vs bag-of-words vs caption prediction, same images, zero-shot
               accuracy vs images seen, and how many more images the predictive objectives need.
  scaling      Figure 9: a family of model sizes, one recipe, zero-shot error and validation loss vs
               counted training compute, power-law fits and a prediction of the largest size.

Both write results.json and a PNG into --out, show progress, reuse finished runs and resume
unfinished ones when run again (so --minutes can spread an experiment over several sittings).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import (ListAction, add_device_option, add_precision_option, add_progress_option, any_int,
                      non_negative_float, non_negative_int, nonempty_str, output_dir, positive_float, positive_int)

OBJECTIVES = ("contrastive", "bow", "caption")  # checked again by ObjectivesConfig
SIZES = ("s32", "s48", "s64", "s96", "s128", "s192", "s256", "s384")  # checked again by ScalingConfig


def _one_of(names: tuple[str, ...]) -> Any:
    def check(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return text
    return check


def _common(p: argparse.ArgumentParser, out: str, steps: int) -> None:
    p.add_argument("--out", default=out, type=output_dir, help="experiment folder (runs, results.json, plot)")
    p.add_argument("--steps", type=positive_int, default=steps, help="optimiser steps per run (images = steps x batch)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="pairs per step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (the demo's recipe)")
    p.add_argument("--wd", type=non_negative_float, default=0.1, help="weight decay")
    p.add_argument("--warmup", type=non_negative_int, default=50, help="warm-up steps (at most a fifth of --steps)")
    p.add_argument("--minutes", type=positive_float,
                   help="wall-clock budget for the whole experiment; unfinished runs resume on the next call")
    p.add_argument("--threads", type=positive_int, help="torch threads (default torch's)")
    p.add_argument("--workers", dest="num_workers", type=non_negative_int, default=1, help="data-loading processes")
    add_device_option(p)
    add_precision_option(p, "train")
    add_progress_option(p)


def _finish(result: dict[str, Any], table: str, what: str) -> int:
    print()
    print(table)
    print(f"\nresults: {result['plot'].rsplit('/', 1)[0]}/results.json, plot: {result['plot']}")
    if result.get("interrupted"):
        print(f"{what}: stopped by a signal; run the same command again to resume", file=sys.stderr)
        return 130
    if result["status"] != "complete":
        print(f"{what}: the budget ran out before every run finished; run the same command again to continue",
              file=sys.stderr)
        return 3
    return 0


def _config(cls: Any, args: argparse.Namespace) -> Any:
    """The experiment config from the options of the same names (unset ones keep its defaults)."""
    import dataclasses

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


def objectives_cmd(args: argparse.Namespace) -> int:
    from ..experiments import ObjectivesConfig, format_objectives, run_objectives

    result = run_objectives(_config(ObjectivesConfig, args))
    return _finish(result, format_objectives(result), "experiment objectives")


def scaling_cmd(args: argparse.Namespace) -> int:
    from ..experiments import ScalingConfig, format_scaling, run_scaling

    result = run_scaling(_config(ScalingConfig, args))
    return _finish(result, format_scaling(result), "experiment scaling")


def register(subparsers: Any) -> None:
    from .options import add_subparsers

    p = subparsers.add_parser("experiment", help="the paper's experiments at small scale (objectives, scaling)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = add_subparsers(p, dest="experiment", metavar="EXPERIMENT")

    o = sub.add_parser("objectives", help="Figure 2: contrastive vs bag-of-words vs caption, accuracy vs images seen",
                       description="Train the same image tower with each objective on the same images and compare "
                                   "zero-shot accuracy vs images seen (results.json, objectives.png).")
    _common(o, "runs/objectives", 1000)
    o.add_argument("--objectives", action=ListAction, item=_one_of(OBJECTIVES), default=list(OBJECTIVES),
                   help="which objectives (comma-separated; ratios are to contrastive)")
    o.add_argument("--seeds", action=ListAction, item=any_int, default=[0],
                   help="seeds (comma-separated): one run per objective each")
    o.add_argument("--model", default="tiny-vit-p16", help="architecture: zoo name or CLIPConfig .json")
    o.add_argument("--data", type=nonempty_str,
                   help="training pairs (any `clipforge train --data` spec); default: the built-in scenes")
    o.add_argument("--zeroshot", type=nonempty_str,
                   help="labelled dataset to score zero-shot on (e.g. cifar10_test.npz, an image folder); "
                        "needed with --data")
    o.add_argument("--task", default="heldout_colour_shape",
                   help="scene task scored when training on the built-in scenes")
    o.add_argument("--zeroshot-n", type=positive_int, default=500,
                   help="images of --zeroshot (class-stratified, fixed)")
    o.add_argument("--templates", help="prompt templates for --zeroshot: built-in set (cifar10, imagenet, ...) or file "
                                       "(default: 'a photo of a {}.')")
    o.add_argument("--classnames", help="class names for --zeroshot: built-in set or file (default: the dataset's)")
    o.add_argument("--eval-every", type=positive_int, default=50, help="steps between zero-shot evaluations")
    o.add_argument("--first-eval", type=positive_int,
                   help="also evaluate at this step and its doublings below --eval-every (it must divide it): "
                        "the early points of a log-x curve (default: none)")
    o.set_defaults(func=objectives_cmd)

    s = sub.add_parser("scaling", help="Figure 9: zero-shot error vs training compute over model sizes, power-law fit",
                       description="Train a family of model sizes with one recipe on the built-in scenes, count each "
                                   "run's FLOPs, measure held-out zero-shot error and validation loss, and fit power "
                                   "laws (results.json, scaling.png).")
    _common(s, "runs/scaling", 600)
    s.add_argument("--sizes", action=ListAction, item=_one_of(SIZES),
                   help=f"sizes of the family, comma-separated: {', '.join(SIZES)} (the width; depth 2-6) "
                        "(default s32..s192)")
    s.add_argument("--seed", type=any_int, default=0, help="seed of every run")
    s.add_argument("--eval-per-class", type=positive_int, default=100, help="held-out scenes per class of each task")
    s.add_argument("--val-pairs", type=positive_int, default=1000, help="held-out pairs for the validation loss")
    s.add_argument("--lr-rule", choices=("fixed", "width"), default="fixed",
                   help="learning rate per size: fixed (--lr for all) or width (--lr x base width / width, the "
                        "muP-style 1/width rule for Adam applied to the whole model) (default fixed)")
    s.add_argument("--lr-base-width", type=positive_int, default=128,
                   help="the width at which --lr-rule width gives --lr (default 128, the demo model tiny-vit-p16 = s128)")
    s.add_argument("--lr-multipliers", action=ListAction, item=positive_float, metavar="M,M",
                   help="sweep these multiples of each size's rate; the run with the lowest validation loss is "
                        "kept (default 1: no sweep)")
    s.add_argument("--selection-per-type", type=non_negative_int, default=0,
                   help="also fit the built-in caption-selection errors (group and text), with this many minimal "
                        "pairs per negative type (default 0: off)")
    s.set_defaults(func=scaling_cmd)
