"""bf16 vs fp32 training: the same loss curve within seed noise, and the speed of the real loop.

For each dataset (built-in scenes; Flickr8k from ../shared/data when present) three runs of
``clipforge train`` with the same model, data, schedule and step count: fp32 with seed 0, fp32
with seed 1 (the seed noise), and ``amp_bf16`` with seed 0 (bf16 products through the fast
layer, fp32 master weights). Reported: the mean absolute loss gap bf16 - fp32 (seed 0) over the
second half of training beside the fp32 seed-to-seed gap, the final evaluation (scenes: held-out
zero-shot tasks), and the loop's samples/s (data loading included). Writes JSON and a PNG with
the curves overlaid. Run folders live in ``--workdir`` and are reused/resumed.

    python benchmarks/bf16_training.py [--steps 400] [--datasets scenes,flickr8k] [--workdir /tmp/cf-bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402
from hard_negatives import _train  # noqa: E402  (reuse / resume a run folder of the same config)
from train_real import DEFAULT_DATA, build_manifest  # noqa: E402

RUNS = (("fp32", 0), ("fp32", 1), ("amp_bf16", 0))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r:
            out.append((int(r["step"]), float(r["loss"])))
    return out


def _gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    """Mean |loss_a - loss_b| over the logged steps of the second half of training."""
    bd = dict(b)
    last = max(s for s, _ in a)
    pairs = [(la, bd[s]) for s, la in a if s in bd and s > last / 2]
    return statistics.fmean(abs(x - y) for x, y in pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--datasets", default="scenes,flickr8k")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cf-bf16"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from matplotlib.figure import Figure

    from clipforge import fast
    from clipforge.training import TrainConfig

    started = time.time()
    results: dict[str, Any] = {}
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    fig = Figure(figsize=(6 * len(datasets), 4.2))
    for i, name in enumerate(datasets):
        if name == "scenes":
            data, extra = "builtin:scenes", {"eval_every": args.steps}
        elif name == "flickr8k":
            folder = args.workdir / "flickr8k-data"
            manifest = folder / "manifest.jsonl"
            if not manifest.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                build_manifest(args.data, folder)
            data, extra = str(manifest), {"eval_every": 0}
        else:
            raise SystemExit(f"unknown dataset {name!r} (scenes | flickr8k)")
        runs: dict[str, Any] = {}
        for precision, seed in RUNS:
            label = f"{precision} seed {seed}"
            run_dir = args.workdir / name / f"{precision}-s{seed}"
            config = TrainConfig(model=args.model, data=data, steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                                 wd=0.1, warmup=max(1, args.steps // 10), grad_clip=1.0, seed=seed, out=str(run_dir),
                                 save_every=100, keep_last=1, log_every=5, num_workers=1, threads=args.threads,
                                 precision=precision, progress=False, **extra)
            print(f"{name}: {label} ...", file=sys.stderr, flush=True)
            summary = _train(config, run_dir)
            runs[label] = {"losses": _losses(run_dir), "samples_per_s": summary.get("samples_per_s_median"),
                           "final_loss": summary.get("final_loss"), "last_eval": summary.get("last_eval"),
                           "backend": summary.get("backend"), "reused": bool(summary.get("reused"))}
        ref, other, bf16 = (runs[f"{p} seed {s}"] for p, s in RUNS)
        res = {"runs": runs, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
               "loss_gap_bf16_vs_fp32": _gap(bf16["losses"], ref["losses"]),
               "loss_gap_seed_noise_fp32": _gap(other["losses"], ref["losses"]),
               "samples_per_s_ratio_bf16_over_fp32": (bf16["samples_per_s"] or 0) / (ref["samples_per_s"] or 1)}
        results[name] = res
        ax = fig.add_subplot(1, len(datasets), i + 1)
        for label, run in runs.items():
            steps, losses = zip(*run["losses"])
            ax.plot(steps, losses, label=label, lw=1.2, ls="--" if "seed 1" in label else "-")
        ax.set_title(f"{name}: {args.model}, batch {args.batch_size}")
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    png = REPO / "benchmarks" / "results" / "bf16_training.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    path = write_results("bf16_training", {"env": environment(), "backend": fast.backend_record(),
                                           "precision_probe_gflops": fast.matmul_speed_by_precision(),
                                           "results": results, "plot": str(png.relative_to(REPO)),
                                           "wall_s": time.time() - started})
    print(f"\n{'dataset':<10}{'run':<16}{'final loss':>11}{'samples/s':>11}  final eval")
    for name, res in results.items():
        for label, run in res["runs"].items():
            ev = run["last_eval"] or {}
            evs = ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float) and k != "step")[:90]
            print(f"{name:<10}{label:<16}{run['final_loss']:>11.4f}{run['samples_per_s'] or 0:>11.1f}  {evs}")
        print(f"{name}: mean |loss gap| 2nd half: bf16 vs fp32 {res['loss_gap_bf16_vs_fp32']:.4f}, fp32 seed 1 vs "
              f"seed 0 {res['loss_gap_seed_noise_fp32']:.4f}; loop speed bf16/fp32 "
              f"{res['samples_per_s_ratio_bf16_over_fp32']:.2f}x")
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
