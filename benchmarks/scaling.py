"""The paper's Figure 9 on this machine: does zero-shot error fall as a power law of training
compute? ``clipforge experiment scaling`` (:func:`clipforge.experiments.run_scaling`): a family of
ViT sizes (width and depth grown together; the demo model is ``s128``) trained on the built-in
scenes with one recipe (the demo's optimiser and schedule, the same images for every size, one
seed); each run's FLOPs counted with torch's flop counter (:mod:`clipforge.plan`); each finished
model measured on fresh held-out scenes (zero-shot error per task and their mean, validation
loss). Fits: error = a * compute^b (log-log least squares, 95% CI of b), and the fit on all but the
largest size used to predict the largest.

    python benchmarks/scaling.py [--sizes s32,s48,s64,s96,s128,s192,s256] [--steps 600] [--workdir /tmp/cf-exp]
                                 [--lr-rule fixed|width] [--lr-multipliers 0.5,1,2] [--selection-per-type 50]
                                 [--name scaling]

``--lr-rule width`` scales the peak rate as 1/width (muP-style: s128, the demo model, keeps
--lr 1e-3; s256 gets 5e-4, the rate that restored the size order in the previous measurement);
``--lr-multipliers`` sweeps multiples of each size's rate, keeping the lowest validation loss;
``--selection-per-type`` adds the built-in caption-selection errors as targets (they do not
saturate at the smallest size as three of the five scene tasks do).

Runs live in ``--workdir/scaling`` and are reused / resumed; results go to
benchmarks/results/scaling.{json,png}. Seeds: run once per ``--seed`` (own ``--workdir`` and
``--name``), then ``--combine A.json,B.json --name NAME`` averages each size's targets over the seeds,
fits the means and reports each seed's own hold-out error beside them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="s32,s48,s64,s96,s128,s192,s256")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, help="budget; re-run to continue")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cf-exp"))
    p.add_argument("--lr-rule", choices=("fixed", "width"), default="fixed")
    p.add_argument("--lr-multipliers", default="1", help="comma-separated multiples of each size's rate")
    p.add_argument("--selection-per-type", type=int, default=0)
    p.add_argument("--name", default="scaling", help="results file name (benchmarks/results/NAME.json/.png)")
    p.add_argument("--combine", help="comma-separated results files of one study run with different --seed: "
                                     "the sizes' targets averaged over the seeds and fitted (nothing is trained)")
    args = p.parse_args()
    if args.combine:
        return combine(args)

    from clipforge.experiments import ScalingConfig, format_scaling, run_scaling

    config = ScalingConfig(out=str(args.workdir / "scaling"), sizes=tuple(args.sizes.split(",")), steps=args.steps,
                           seed=args.seed, threads=args.threads, minutes=args.minutes, progress=False,
                           lr_rule=args.lr_rule, lr_multipliers=tuple(float(m) for m in args.lr_multipliers.split(",")),
                           selection_per_type=args.selection_per_type)
    result = run_scaling(config)
    png = REPO / "benchmarks" / "results" / f"{args.name}.png"
    shutil.copyfile(result["plot"], png)
    result = {**result, "env": environment(), "plot": str(png.relative_to(REPO))}
    path = write_results(args.name, result)
    print(format_scaling(result))
    print(f"\nwrote {path} and {png}")
    return 0 if result["status"] == "complete" else 3


def combine(args: argparse.Namespace) -> int:
    import json

    from clipforge.experiments.scaling import combine_seeds, format_scaling

    results = [json.loads(Path(f).read_text()) for f in args.combine.split(",")]
    png = REPO / "benchmarks" / "results" / f"{args.name}.png"
    result = combine_seeds(results, png)
    result = {**result, "env": environment(), "plot": str(png.relative_to(REPO)), "combined": args.combine.split(",")}
    path = write_results(args.name, result)
    print(format_scaling(result))
    for target, errs in result["per_seed_holdout_relative_error"].items():
        print(f"{target}: hold-out relative error per seed " + ", ".join("-" if e is None else f"{e:+.1%}" for e in errs))
    print(f"\nwrote {path} and {png}")
    return 0 if result["status"] == "complete" else 3


if __name__ == "__main__":
    sys.exit(main())
