"""Curation throughput on real pairs: Flickr8k photos (128 px JPEG) + their first caption,
packed into WebDataset shards in a temp dir, then each step run end to end through
``clipforge.curation.run_step`` (reading shards, decoding, writing shards and reports).

Rows (pairs/s of the whole step, single run each; the machine is shared, so the load average
before and after is recorded too):

* ``score``           tiny-vit (random init: this is about throughput) image + text embedding
* ``filter``          reads the score files, copies kept pairs (no decoding)
* ``dedup exact``     pixel sha1 + caption hash pass, plan, copy
* ``dedup exact+near`` the same + tiny-vit image embeddings + FAISS range search (flat)
* ``balance``         query matching (words + PMI bigrams of the captions) + cap plan + copy

    python benchmarks/curation.py [--n 2000] [--shard-size 500] [--threads N]

Writes benchmarks/results/curation.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, threads, write_results  # noqa: E402

import clipforge  # noqa: E402
from clipforge.curation import (BalanceStep, ClipEmbedder, DedupStep, FilterStep, RunOptions, ScoreStep,  # noqa: E402
                                ScoreTable, open_pool, queries_from_corpus, run_step)

SHARED = Path(os.environ.get("CLIPFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_shards(n: int, shard_size: int, out: Path) -> tuple[list[str], Path]:
    """The first ``n`` Flickr8k train/dev/test images (member order) with caption 0, as
    img2dataset-layout shards (original JPEG bytes). Returns (captions, shard folder)."""
    flickr = SHARED / "flickr8k"
    caps: dict[str, str] = {}
    with open(flickr / "captions.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["caption_idx"] == "0":
                caps[row["image"]] = row["caption"]
    folder = out / "pool"
    folder.mkdir(parents=True)
    written: list[str] = []
    tf_out = None
    for split in ("train", "dev", "test"):
        with tarfile.open(flickr / f"images_128_{split}.tar") as tf:
            for m in tf:
                if len(written) >= n:
                    break
                if len(written) % shard_size == 0:
                    if tf_out is not None:
                        tf_out.close()
                    tf_out = tarfile.open(folder / f"{len(written) // shard_size:05d}.tar", "w")
                key = f"{len(written):09d}"
                data = tf.extractfile(m).read()
                cap = caps[m.name]
                meta = json.dumps({"key": key, "caption": cap, "flickr_image": m.name}).encode()
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", cap.encode()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf_out.addfile(info, io.BytesIO(payload))
                written.append(cap)
        if len(written) >= n:
            break
    if tf_out is not None:
        tf_out.close()
    if len(written) < n:
        print(f"only {len(written)} Flickr8k pairs available")
    return written, folder


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(name: str, fn, n: int) -> dict:
    load0 = loadavg()
    t = time.perf_counter()
    rep = fn()
    dt = time.perf_counter() - t
    row = {"step": name, "pairs": n, "seconds": round(dt, 3), "pairs_per_s": round(n / dt, 1),
           "kept": rep["kept"], "dropped": rep["dropped"], "load_before": load0[0], "load_after": loadavg()[0]}
    print(f"  {name}: {dt:.2f}s ({n / dt:.1f} pairs/s), kept {rep['kept']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="pairs (default %(default)s)")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="curation", help="results name under benchmarks/results/")
    args = ap.parse_args()
    if not (SHARED / "flickr8k" / "captions.tsv").exists():
        sys.exit(f"Flickr8k not found under {SHARED}")
    opts = RunOptions(progress=False)
    rows = []
    with threads(args.threads), tempfile.TemporaryDirectory(prefix="clipforge-curation-bench-") as tmp:
        tmp_path = Path(tmp)
        t = time.perf_counter()
        caps, pool_dir = make_shards(args.n, args.shard_size, tmp_path)
        n = len(caps)
        print(f"{n} Flickr8k pairs in {len(list(pool_dir.glob('*.tar')))} shards ({time.perf_counter() - t:.1f}s); "
              f"torch threads {torch.get_num_threads()}, load {loadavg()}", flush=True)
        pool = str(pool_dir)
        model = clipforge.create_model("tiny-vit", seed=0).eval()
        emb = ClipEmbedder(model, name="tiny-vit (random init)", batch_size=args.batch_size)
        rows.append(timed("score", lambda: run_step(ScoreStep(emb, batch_size=args.batch_size), open_pool(pool),
                                                    tmp_path / "scores", opts), n))
        rows.append(timed("filter", lambda: run_step(FilterStep(ScoreTable(tmp_path / "scores"), min_score=0.0),
                                                     open_pool(pool), tmp_path / "filtered", opts), n))
        rows.append(timed("dedup exact", lambda: run_step(DedupStep(exact="image"), open_pool(pool),
                                                          tmp_path / "dd_exact", opts), n))
        near = {}

        def dedup_near():
            rep = run_step(DedupStep(exact="image", threshold=0.95, embedder=emb, embed_batch_size=args.batch_size),
                           open_pool(pool), tmp_path / "dd_near", opts)
            near.update(rep["step_summary"])
            return rep

        rows.append(timed("dedup exact+near", dedup_near, n))
        corpus = tmp_path / "captions.txt"
        corpus.write_text("\n".join(caps) + "\n", encoding="utf-8")
        ql = queries_from_corpus([corpus], min_count=5, min_pmi=2.0)
        rows.append(timed(f"balance ({len(ql.queries)} queries)",
                          lambda: run_step(BalanceStep(ql.queries, max_per_query=3), open_pool(pool), tmp_path / "bal", opts), n))
    print()
    print_table(rows, [("step", "step", ""), ("pairs", "pairs", "d"), ("seconds", "seconds", ".2f"),
                       ("pairs_per_s", "pairs/s", ".1f"), ("kept", "kept", "d"), ("load_before", "load before", ".2f"),
                       ("load_after", "load after", ".2f")])
    print(f"\nnear-dup clusters at cos>=0.95 with a random-init tiny-vit: {near.get('near', {}).get('clusters')} "
          "(random weights embed all photos close together: the count means nothing; the timing does)")
    path = write_results(args.out, {"benchmark": "curation", "data": "flickr8k 128px, caption 0", "n": n,
                                    "shard_size": args.shard_size, "model": "tiny-vit random init",
                                    "batch_size": args.batch_size, "environment": environment(), "rows": rows,
                                    "dedup_near_summary": {k: near.get(k) for k in ("exact", "near")}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
