"""Train a tiny CLIP from scratch on real photos (Flickr8k, 6,000 training images x 5 captions)
for a fixed CPU budget, then report test-split retrieval Recall@1/5/10 with the Flickr protocol
(1,000 test images, 5 captions each: text->image over 1,000 images, image->text over 5,000
captions, a hit if any of the image's 5 captions is retrieved), beside chance and beside the
same architecture untrained.

The shared data's tar shards are unpacked into a temporary folder with a JSONL manifest
(image, split, caption); nothing is written into the repository except the result JSON.

    python benchmarks/train_real.py [--minutes 10] [--model tiny-vit-p16] [--batch-size 128]
                                     [--data ../shared/data] [--out benchmarks/results/train_real.json]

The step count is fitted to the budget by timing a few real steps first (so the cosine schedule
completes); times are wall-clock on a CPU possibly shared with other jobs.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
SPLITS = {"train": "train", "dev": "dev", "test": "test"}


def build_manifest(data: Path, folder: Path) -> Path:
    """Unpack the 128px Flickr8k shards and write ``manifest.jsonl`` (one row per caption)."""
    flickr = data / "flickr8k"
    if not (flickr / "captions.tsv").is_file():
        raise FileNotFoundError(f"Flickr8k not found under {flickr} (expected captions.tsv and images_128_*.tar)")
    names: dict[str, str] = {}
    for split in SPLITS:
        with tarfile.open(flickr / f"images_128_{split}.tar") as tf:
            for m in tf.getmembers():
                if m.isfile():
                    target = folder / "images" / split / Path(m.name).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
                    names[Path(m.name).name] = f"images/{split}/{Path(m.name).name}"
    manifest = folder / "manifest.jsonl"
    n = 0
    with open(flickr / "captions.tsv", newline="", encoding="utf-8") as f, open(manifest, "w", encoding="utf-8") as out:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] in SPLITS and row["image"] in names:
                out.write(json.dumps({"image": names[row["image"]], "split": row["split"],
                                      "caption": row["caption"]}) + "\n")
                n += 1
    print(f"manifest: {n} captions of {len(names)} images in {manifest}", file=sys.stderr)
    return manifest


def test_retrieval(model: Any, manifest: Path) -> dict[str, float]:
    """Flickr-protocol Recall@1/5/10 on the test split (5 captions per image)."""
    from clipforge.data import open_pairs
    from clipforge.eval.retrieval import embed_pairs, retrieval_metrics

    source = open_pairs(str(manifest), split="test")
    feats = embed_pairs(model, source.iter_samples(shuffle=False), batch_size=128, total=len(source))
    m = retrieval_metrics(feats.image_features, feats.text_features, feats.text_to_image, ks=(1, 5, 10))
    return {"n_images": int(feats.image_features.shape[0]), "n_texts": int(feats.text_features.shape[0]),
            "skipped": feats.skipped, **m}


def chance(n_images: int, n_texts: int, per_image: int, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    from clipforge.demo import chance_recall

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = chance_recall(n_images, 1, k)
        out[f"text_retrieval_recall@{k}"] = chance_recall(n_texts, per_image, k)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget (wall time, excluding evaluation)")
    p.add_argument("--steps", type=int, help="train exactly this many steps instead of fitting the budget")
    p.add_argument("--model", default="tiny-vit-p16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_real.json")
    p.add_argument("--keep", type=Path, help="keep the run folder here (default: a temporary folder)")
    args = p.parse_args()

    import torch

    from clipforge.checkpoints import load_model
    from clipforge.training import TrainConfig, measure_step_time, train
    from clipforge.demo import plan_steps, thread_candidates
    from clipforge.training.loop import build_model
    from clipforge.utils import write_json

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="flickr8k-") as tmp:
        tmp_path = Path(tmp)
        manifest = build_manifest(args.data, tmp_path)
        run_dir = args.keep or tmp_path / "run"

        def config(steps: int, threads: int | None, limit_s: float | None) -> TrainConfig:
            return TrainConfig(model=args.model, data=str(manifest), steps=steps, batch_size=args.batch_size,
                               lr=args.lr, wd=args.wd, warmup=min(100, max(1, steps // 10)), grad_clip=1.0,
                               num_workers=args.workers, seed=args.seed, out=str(run_dir), save_every=0,
                               keep_last=1, log_every=10, threads=threads,
                               time_limit_minutes=limit_s / 60 if limit_s else None)

        timing = measure_step_time(config(1000, None, None), thread_candidates())
        threads = min(timing, key=timing.__getitem__)
        budget_s = args.minutes * 60
        steps = args.steps or plan_steps(budget_s, timing[threads])
        print(f"step time {timing} -> {threads} thread(s), {steps} steps", file=sys.stderr)
        t0 = time.time()
        summary = train(config(steps, threads, None if args.steps else budget_s * 1.25))
        train_s = time.time() - t0

        torch.set_num_threads(threads)
        model = load_model(run_dir / "final.safetensors")
        t1 = time.time()
        trained = test_retrieval(model, manifest)
        eval_s = time.time() - t1
        untrained = test_retrieval(build_model(config(steps, threads, None)).eval(), manifest)
    per_image = round(trained["n_texts"] / max(1, trained["n_images"]))
    rand = chance(trained["n_images"], trained["n_texts"], per_image)
    keys = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    record = {
        "dataset": "flickr8k/test", "model": args.model, "task": "zeroshot_retrieval",
        "metrics": {k: trained[k] for k in keys + ["mean_recall", "image_retrieval_median_rank", "text_retrieval_median_rank"]},
        "chance": rand, "untrained": {k: untrained[k] for k in keys},
        "training": {"steps": summary["steps_done"], "planned_steps": steps, "status": summary["status"],
                     "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd, "threads": threads,
                     "step_time_calibration_s": timing, "samples_seen": summary["samples_seen"],
                     "epochs": summary["samples_seen"] / 30000, "final_loss": summary["final_loss"],
                     "train_wall_s": train_s, "peak_rss_mb": summary["peak_rss_mb"],
                     "skip_stats": summary["skip_stats"], "budget_minutes": args.minutes},
        "eval": {"n_images": trained["n_images"], "n_texts": trained["n_texts"], "wall_s": eval_s},
        "total_wall_s": time.time() - started,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "note": "shared 2-core CPU; other jobs may have been running"},
    }
    write_json(args.out, record)
    print(f"\nFlickr8k test ({trained['n_images']} images, {trained['n_texts']} captions); "
          f"{summary['steps_done']} steps x {args.batch_size} = {record['training']['epochs']:.1f} epochs "
          f"in {train_s / 60:.1f} min")
    print(f"{'':<24}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for label, d in (("text->image", "image"), ("image->text", "text")):
        for name, src in (("trained", trained), ("untrained", untrained), ("chance", rand)):
            print(f"{label + ' ' + name:<24}" + "".join(f"{src[f'{d}_retrieval_recall@{k}']:>8.3f}" for k in (1, 5, 10)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
