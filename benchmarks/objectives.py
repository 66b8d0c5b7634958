"""The paper's Figure 2 on built-in scenes: which objective learns zero-shot transfer fastest?

Three runs of ``clipforge train`` with the demo's model, data, optimiser, schedule, batch and seed,
the same number of steps (= the same image samples), differing only in ``--objective``:
``contrastive`` (CLIP), ``bow`` (predict the caption's bag of BPE tokens) and ``caption`` (predict the
caption token by token). Every ``--eval-every`` steps the training loop's scene evaluation scores
zero-shot accuracy on held-out scenes through ``ZeroShotClassifier`` (cosine head / bag score /
caption likelihood). Reported: accuracy vs images seen (JSON + PNG, log x), and the images each
objective needed to first reach the accuracy every objective reached, as ratios to contrastive
(the paper: bag-of-words 3x faster than a caption LM, contrastive another 4x).

    python benchmarks/objectives.py [--steps 600] [--eval-every 50] [--task heldout_colour_shape] [--workdir DIR]

Runs live in ``--workdir`` and are reused/resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402
from hard_negatives import _train  # noqa: E402  (reuse / resume a run folder of the same config)

OBJECTIVES = ("contrastive", "bow", "caption")


def _curve(run_dir: Path, key: str, batch: int) -> list[tuple[int, float]]:
    """(images seen, accuracy) of every evaluation in the run's metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r and "step" in r:
            out.append((int(r["step"]) * batch, float(r[key])))
    return sorted(out)


def _first_reach(curve: list[tuple[int, float]], level: float) -> float | None:
    """Images seen when the curve first reaches ``level`` (linear between evaluations)."""
    prev = (0, 0.0)
    for n, acc in curve:
        if acc >= level:
            n0, a0 = prev
            return float(n) if acc == a0 else n0 + (level - a0) / (acc - a0) * (n - n0)
        prev = (n, acc)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--task", default="heldout_colour_shape", help="the scene task the ratios are computed on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cf-objectives"))
    args = p.parse_args()

    from matplotlib.figure import Figure

    from clipforge.demo import DemoSettings
    from clipforge.demo.run import train_config

    started = time.time()
    settings = DemoSettings(out=str(args.workdir), seed=args.seed, progress=False)
    key = f"eval/{args.task}_acc"
    runs = {}
    for objective in OBJECTIVES:
        run_dir = args.workdir / objective
        config = dataclasses.replace(train_config(settings, args.steps, None, args.threads), objective=objective,
                                     eval_every=args.eval_every, out=str(run_dir), progress=False)
        t = time.time()
        print(f"{objective}: {args.steps} steps of {config.batch_size} ...", file=sys.stderr, flush=True)
        summary = _train(config, run_dir)
        runs[objective] = {"curve": _curve(run_dir, key, config.batch_size), "wall_s": time.time() - t,
                           "final_loss": summary.get("final_loss"), "last_eval": summary.get("last_eval"),
                           "reused": bool(summary.get("reused"))}
    level = min(max(a for _, a in r["curve"]) for r in runs.values())
    reach = {o: _first_reach(r["curve"], level) for o, r in runs.items()}
    ratios = {o: (reach[o] / reach["contrastive"]) if reach[o] and reach["contrastive"] else None for o in OBJECTIVES}
    result = {"env": environment(), "task": args.task, "steps": args.steps, "batch_size": settings.batch_size,
              "model": settings.model, "eval_every": args.eval_every, "runs": runs,
              "common_level": level, "images_to_reach_common_level": reach,
              "ratio_to_contrastive": ratios, "wall_s": time.time() - started}

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for o, r in runs.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", ms=3, label=o)
    ax.axhline(level, color="grey", lw=0.8, ls=":", label=f"level all reach ({level:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("images seen")
    ax.set_ylabel(f"zero-shot accuracy ({args.task.replace('_', ' ')})")
    ax.set_title(f"objectives on built-in scenes ({settings.model}, batch {settings.batch_size})")
    ax.legend()
    fig.tight_layout()
    png = REPO / "benchmarks" / "results" / "objectives.png"
    fig.savefig(png, dpi=110)
    result["plot"] = str(png.relative_to(REPO))
    path = write_results("objectives", result)
    print(f"\n{'objective':<12}{'final acc':>10}{'best acc':>10}{'images to ' + format(level, '.2f'):>18}{'x contrastive':>15}"
          f"{'wall s':>8}")
    for o, r in runs.items():
        n = reach[o]
        print(f"{o:<12}{r['curve'][-1][1]:>10.3f}{max(a for _, a in r['curve']):>10.3f}"
              f"{(f'{n:,.0f}' if n else '-'):>18}{(f'{ratios[o]:.2f}' if ratios[o] else '-'):>15}{r['wall_s']:>8.0f}")
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
