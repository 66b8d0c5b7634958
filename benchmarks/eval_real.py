"""Real-data evaluation of one checkpoint: zero-shot (with the prompt-ensembling comparison),
linear probe and few-shot on CIFAR-10 and MNIST test sets, and image<->text retrieval on the
Flickr8k test split (1,000 images x 5 captions). Writes a table and JSON records.

CIFAR-10/MNIST ship only their test sets here, so probes use a stratified 50/50 split of each
(train half for fitting, test half for scoring; zero-shot is scored on the full set and, inside
the few-shot record, on the same test half for the few-shot vs zero-shot comparison).

    python benchmarks/eval_real.py --model runs/flickr8k/final.safetensors
    python benchmarks/eval_real.py --model tiny-vit --random-init --quick     # smoke test
"""

from __future__ import annotations

import argparse
import csv
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from clipforge.data import Sample, open_labelled  # noqa: E402
from clipforge.eval.datasets import Subset  # noqa: E402
from clipforge.eval.linear_probe import stratified_split  # noqa: E402
from clipforge.loading import load_for_inference, model_label  # noqa: E402
from clipforge.eval.records import records_table, save_record  # noqa: E402
from clipforge.eval.tasks import EvalContext, run_fewshot, run_linear_probe, run_retrieval, run_zeroshot  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Flickr8kPairs:
    """Flickr8k split from the shared data layout (tar of JPEGs + captions.tsv), as Samples."""

    def __init__(self, root: Path, split: str = "test", limit: int | None = None) -> None:
        caps: dict[str, list[str]] = {}
        with open(root / "captions.tsv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if row["split"] == split:
                    caps.setdefault(row["image"], []).append(row["caption"])
        self.samples: list[Sample] = []
        with tarfile.open(root / f"images_128_{split}.tar") as tf:
            for m in tf.getmembers()[:limit]:
                img = Image.open(tf.extractfile(m))
                img.load()
                self.samples.append(Sample(m.name, img.convert("RGB"), caps.get(m.name, [])))
        self.name = f"flickr8k-{split}"

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)


def subset(spec: str, n: int | None):
    ds = open_labelled(spec)
    if not n or n >= len(ds):
        return ds
    _, keep = stratified_split(ds.labels, n / len(ds), seed=0)
    return Subset(ds, keep, name=ds.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint path (or a zoo name with --random-init)")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true", help="1,000 images per classification set, 200 Flickr8k images")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cache-dir", default=None, help="feature / zero-shot head cache (default ~/.cache/clipforge)")
    ap.add_argument("--records-dir", type=Path, default=Path(__file__).resolve().parent / "results" / "eval_real")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: cifar10,mnist,flickr8k")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    model, preprocess = load_for_inference(args.model, random_init=args.random_init, seed=0 if args.random_init else None)
    name = model_label(args.model, random_init=args.random_init, seed=0 if args.random_init else None)
    ctx = EvalContext(model, preprocess, name, batch_size=args.batch_size, cache_dir=args.cache_dir, progress=True)
    n_cls = 1000 if args.quick else None
    shots = [int(s) for s in args.shots.split(",")]
    records = []
    t_all = time.perf_counter()
    for key, spec in (("cifar10", args.data / "cifar10_test" / "cifar10_test.npz"),
                      ("mnist", args.data / "mnist_test" / "mnist_test.npz")):
        if key in skip:
            continue
        if not spec.is_file():
            print(f"skipping {key}: {spec} not found", file=sys.stderr)
            continue
        ds = subset(str(spec), n_cls)
        print(f"== {key}: {len(ds)} images ==")
        records.append(run_zeroshot(ctx, ds, templates=key, compare_prompts=True))
        records.append(run_linear_probe(ctx, ds, test_fraction=0.5, seed=0))
        records.append(run_fewshot(ctx, ds, test_fraction=0.5, seed=0, shots=shots, seeds=args.seeds, templates=key))
    if "flickr8k" not in skip:
        root = args.data / "flickr8k"
        if (root / "captions.tsv").is_file():
            pairs = Flickr8kPairs(root, "test", 200 if args.quick else None)
            print(f"== flickr8k test: {len(pairs)} images ==")
            records.append(run_retrieval(ctx, pairs))
        else:
            print(f"skipping flickr8k: {root} not found", file=sys.stderr)
    for r in records:
        save_record(args.records_dir, r)
    print()
    print(records_table(records))
    summary = []
    for r in records:
        m = r["metrics"]
        if r["task"] == "zeroshot_classification":
            summary.append(f"{r['dataset']}: zero-shot top-1 {m['acc1']:.4f} (bare class name {m['acc1_classname_only']:.4f}, "
                           f"one template {m['acc1_single_template']:.4f}, ensemble gain {m['ensemble_gain_over_classname']:+.4f})")
        elif r["task"] == "fewshot":
            summary.append(f"{r['dataset']}: few-shot matches zero-shot at k = {m['shots_to_match_zeroshot']} ({r['matching_note']})")
    print("\n".join(summary))
    payload = {"model": name, "quick": args.quick, "seconds": time.perf_counter() - t_all,
               "environment": environment(), "records": records}
    path = write_results("eval_real" + ("_quick" if args.quick else ""), payload)
    print(f"wrote {path} and {len(records)} records under {args.records_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
