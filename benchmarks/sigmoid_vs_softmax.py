"""Sigmoid (SigLIP) vs softmax (CLIP) loss on real photos: the same tiny CLIP trained on Flickr8k
(6,000 training images x 5 captions, ../shared/data) with each loss at batch 32 and batch 128,
the same number of optimiser steps, seed, learning rate and schedule for all four runs; then the
test split's retrieval Recall@1/5/10 (Flickr protocol, 1,000 images x 5 captions), beside chance.

The SigLIP paper (Zhai et al. 2023, Figure 2 / Table 3) reports the sigmoid loss ahead of the
softmax at small batch; this measures it at the scale a CPU trains, and reports what it shows.
Only the loss differs between a pair of runs: the sigmoid run's model also gets the paper's init
(temperature 10, bias -10), the softmax run CLIP's (temperature 1/0.07); the towers start from the
same seeded weights. Numbers are fixed by steps and seeds (not by timing):

    python benchmarks/sigmoid_vs_softmax.py [--steps 500] [--batch-sizes 32,128] [--model tiny-vit-p16]
                                            [--lr 1e-3] [--data ../shared/data] [--workdir DIR]
                                            [--out benchmarks/results/sigmoid_vs_softmax.json]

``--quick`` (a few steps, first 200 test images) only checks the pipeline; its numbers mean nothing and
go to ``sigmoid_vs_softmax_quick.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, print_table  # noqa: E402
from train_real import DEFAULT_DATA, REPO, build_manifest, chance, test_retrieval  # noqa: E402

KEYS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]


def _quick_manifest(manifest: Path, n_test: int) -> Path:
    """The manifest with only the first ``n_test`` test images' captions (a fast pipeline check)."""
    import json

    keep: list[str] = []
    out = manifest.with_name("manifest_quick.jsonl")
    with open(manifest, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            row = json.loads(line)
            if row["split"] == "test":
                if row["image"] not in keep:
                    if len(keep) >= n_test:
                        continue
                    keep.append(row["image"])
            g.write(line)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=500, help="optimiser steps of every run")
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--model", default="tiny-vit-p16")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="pipeline check: 6 steps, 200 test images")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.quick:
        args.steps = 6
    out = args.out or REPO / "benchmarks" / "results" / (
        "sigmoid_vs_softmax_quick.json" if args.quick else "sigmoid_vs_softmax.json")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    from clipforge.checkpoints import load_model
    from clipforge.training import TrainConfig, train
    from clipforge.utils import write_json

    torch.set_num_threads(args.threads)
    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flickr8k-") as tmp:
        tmp_path = Path(tmp)
        manifest = build_manifest(args.data, tmp_path)
        if args.quick:
            manifest = _quick_manifest(manifest, 200)
        root = args.workdir or tmp_path / "runs"
        for batch in batch_sizes:
            for loss in ("clip", "siglip"):
                run_dir = root / f"{loss}_b{batch}"
                cfg = TrainConfig(model=args.model, data=str(manifest), loss=loss, steps=args.steps, batch_size=batch,
                                  lr=args.lr, wd=args.wd, warmup=min(100, max(1, args.steps // 10)), grad_clip=1.0,
                                  num_workers=args.workers, seed=args.seed, out=str(run_dir), save_every=0,
                                  keep_last=1, log_every=10, threads=args.threads, progress=False)
                t0 = time.time()
                summary = train(cfg)
                train_s = time.time() - t0
                model = load_model(run_dir / "final.safetensors")
                m = test_retrieval(model, manifest)
                row = {"loss": loss, "batch_size": batch, "steps": summary["steps_done"],
                       "samples_seen": summary["samples_seen"], "final_loss": summary["final_loss"],
                       "final_temperature": summary["final_temperature"],
                       "final_logit_bias": summary.get("final_logit_bias"), "train_wall_s": train_s,
                       "n_images": m["n_images"], "n_texts": m["n_texts"],
                       **{k: m[k] for k in KEYS + ["mean_recall"]}}
                rows.append(row)
                print(f"{loss} b{batch}: mean recall {row['mean_recall']:.4f} ({train_s:.0f} s)", file=sys.stderr)
    per_image = round(rows[0]["n_texts"] / max(1, rows[0]["n_images"]))
    record = {
        "dataset": "flickr8k/test", "model": args.model, "task": "zeroshot_retrieval", "quick": args.quick,
        "settings": {"steps": args.steps, "batch_sizes": batch_sizes, "lr": args.lr, "wd": args.wd, "seed": args.seed,
                     "threads": args.threads, "grad_clip": 1.0,
                     "init": {"clip": "temperature 1/0.07, no bias", "siglip": "temperature 10, bias -10"}},
        "runs": rows, "chance": chance(rows[0]["n_images"], rows[0]["n_texts"], per_image),
        "total_wall_s": time.time() - started, "environment": environment(),
    }
    write_json(out, record)
    table = [{**r, **{k.replace("_retrieval_recall@", " R@"): r[k] for k in KEYS}} for r in rows]
    print(f"\nFlickr8k test ({rows[0]['n_images']} images, {rows[0]['n_texts']} captions), {args.model}, "
          f"{args.steps} steps each, seed {args.seed}")
    print_table(table, [("batch_size", "batch", "d"), ("loss", "loss", "s")]
                + [(k.replace("_retrieval_recall@", " R@"), k.replace("_retrieval_recall@", " R@").replace("image", "t->i")
                    .replace("text", "i->t"), ".3f") for k in KEYS]
                + [("mean_recall", "mean", ".4f"), ("final_temperature", "T", ".1f"), ("final_logit_bias", "bias", ".2f"),
                   ("train_wall_s", "train s", ".0f")])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
