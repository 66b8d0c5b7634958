"""Search past one machine's RAM: FAISS with on-disk inverted lists under a RAM ceiling, Milvus
(milvus-lite, embedded) and in-RAM FAISS over the same N x 512 collection.

The collection is benchmarks/search.py's clustered mixture (float16 shards, the real layout).
Each variant is built and then queried in its own fresh process (spawned), with the process's own
memory (RssAnon, sampled by ``clipforge.search.memwatch``) and VmHWM (all resident pages,
page cache of memory-mapped files included) recorded during build and during search:

- ``faiss-ondisk``: ``build_index(on_disk=True, max_memory=--ceiling)`` (IVF-HNSW SQ8, lists memory-mapped)
- ``milvus-lite``:  ``build_milvus_index`` into a local .db (first ``--milvus-n`` vectors)
- ``faiss-ram``:    ``build_index`` (no budget: IVF-HNSW SQ8 in RAM)

Reported per variant: build time, index size on disk, p50/p99 single-query latency, recall@10
against exact search on held-out queries (fresh points of the same mixture), peak memory.

    python benchmarks/search_scale.py --n 5000000 --milvus-n 1000000 --ceiling 1G   # the issue's scale
    python benchmarks/search_scale.py --n 200000 --milvus-n 200000 --ceiling 256M  # smoke
Writes benchmarks/results/search_scale.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, print_table  # noqa: E402
from search import Mixture, exact_truth, write_embeddings  # noqa: E402  (benchmarks/search.py)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _subset(emb: Path, out: Path, n: int, shard_size: int) -> Path:
    """A collection of the first ``n`` vectors of ``emb`` (whole shards, linked, not copied)."""
    from clipforge.embeddings import ShardPaths, rebuild_summary
    from clipforge.utils import read_json

    if n % shard_size:
        raise SystemExit(f"--milvus-n {n} must be a multiple of --shard-size {shard_size}")
    man = read_json(emb / "manifest.json")
    k = n // shard_size
    for i in range(k):
        src, dst = ShardPaths(emb, "image", i), ShardPaths(out, "image", i)
        for a, b in ((src.emb, dst.emb), (src.metadata, dst.metadata), (src.marker, dst.marker)):
            b.parent.mkdir(parents=True, exist_ok=True)
            if not b.exists():
                os.symlink(a, b)
    base = {key: v for key, v in man.items() if key not in ("shards", "total", "skipped", "complete")}
    base["num_shards"] = k
    rebuild_summary(out, "image", base, expected_shards=k)
    return out


def run_variant(variant: str, emb: str, idx: str, ceiling: str | None, queries: np.ndarray, truth: np.ndarray,
                latency_n: int, target: float, seed: int, out_q: "mp.Queue") -> None:
    """In a fresh process: build, then load and query, measuring time and memory."""
    import faiss

    from clipforge.search.index import build_index, load_index, recall_at_k
    from clipforge.search.memwatch import PeakMemory

    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss.omp_set_num_threads(2)
    # one-time costs of the libraries (thread pools, first parquet write), not of the index
    warm = Path(idx + ".warm.parquet")
    pq.write_table(pa.table({"a": [1]}), warm)
    pq.read_table(warm)
    warm.unlink()
    faiss.knn(np.ones((4, 8), "float32"), np.ones((4, 8), "float32"), 2)
    res: dict = {"variant": variant}
    t = time.perf_counter()
    with PeakMemory() as mb:
        if variant == "milvus-lite":
            from clipforge.search.milvus import build_milvus_index

            rep = build_milvus_index(emb, idx, target_recall=target, n_queries=1000, seed=seed, progress=False)
        else:
            rep = build_index(emb, idx, on_disk=variant == "faiss-ondisk",
                              max_memory=ceiling if variant == "faiss-ondisk" else None,
                              target_recall=target, n_queries=1000, seed=seed, progress=False)
    res.update({"n": rep.ntotal, "build_seconds": time.perf_counter() - t, "plan": rep.plan.get("factory"),
                "nprobe": rep.nprobe, "build_recall_at_10": rep.recall_at_10, "build_memory": mb.to_dict(),
                "index_bytes": _dir_bytes(Path(idx))})
    with PeakMemory() as ms:
        t = time.perf_counter()
        index = load_index(idx)
        res["load_seconds"] = time.perf_counter() - t
        k = truth.shape[1]
        _, ids = index.search(queries, k)
        res["recall_at_10"] = recall_at_k(ids, truth)
        lat = []
        for q in queries[:latency_n]:
            t = time.perf_counter()
            index.search(q[None], k)
            lat.append(time.perf_counter() - t)
        index.close()
    lat_ms = np.array(lat) * 1000
    res.update({"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
                "search_memory": ms.to_dict()})
    out_q.put(res)


def _spawn(*args: object) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_variant, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5_000_000, help="vectors for FAISS (default: %(default)s)")
    ap.add_argument("--milvus-n", type=int, default=1_000_000, help="vectors for milvus-lite (default: %(default)s)")
    ap.add_argument("--ceiling", default="1G", help="RAM ceiling (--max-memory) of the on-disk build (default: 1G)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centres", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=500, help="held-out queries for recall (default: 500)")
    ap.add_argument("--latency-queries", type=int, default=300, help="single queries timed (default: 300)")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--shard-size", type=int, default=100_000)
    ap.add_argument("--variants", default="faiss-ondisk,milvus-lite,faiss-ram")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep collections + indexes here (default: temp, deleted)")
    ap.add_argument("--out", default=str(RESULTS / "search_scale.json"))
    args = ap.parse_args()

    # measure live memory, not allocator retention (read at process start, so set before spawning):
    # large arrays always mmapped (returned to the OS when freed), arrow on the system allocator
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cf-search-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        mix = Mixture(args.dim, args.centres, seed=args.seed)
        emb = work / "emb"
        t = time.perf_counter()
        if not (emb / "manifest.json").is_file():
            write_embeddings(emb, mix, args.n, args.shard_size, args.seed)
        print(f"generated {args.n} x {args.dim} vectors in {time.perf_counter() - t:.1f} s", flush=True)
        queries = mix.sample(args.queries, seed=10**9 + args.seed)
        q16 = queries.astype(np.float16).astype(np.float32)
        truth = exact_truth(emb, q16, 10)
        for variant in args.variants.split(","):
            e = emb
            if variant == "milvus-lite" and args.milvus_n < args.n:
                e = _subset(emb, work / f"emb-{args.milvus_n}", args.milvus_n, args.shard_size)
            tr = exact_truth(e, q16, 10) if e != emb else truth
            idx = work / f"idx-{variant}"
            shutil.rmtree(idx, ignore_errors=True)
            print(f"{variant}: building over {e} ...", flush=True)
            r = _spawn(variant, str(e), str(idx), args.ceiling, q16, tr, args.latency_queries, args.target_recall,
                       args.seed)
            r.update({"build_anon_peak_mib": r["build_memory"]["anon_delta_bytes"] / 2**20,
                      "build_hwm_mib": r["build_memory"]["vm_hwm_bytes"] / 2**20,
                      "search_anon_peak_mib": r["search_memory"]["anon_delta_bytes"] / 2**20,
                      "search_hwm_mib": r["search_memory"]["vm_hwm_bytes"] / 2**20,
                      "index_mib": r["index_bytes"] / 2**20})
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.endswith("_memory")}), flush=True)
        print()
        print_table(rows, [("variant", "variant", ""), ("n", "n", ","), ("plan", "index", ""),
                           ("build_seconds", "build s", ".1f"), ("index_mib", "index MiB", ".0f"),
                           ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
                           ("recall_at_10", "recall@10", ".3f"),
                           ("build_anon_peak_mib", "build +anon MiB", ".0f"), ("build_hwm_mib", "build HWM MiB", ".0f"),
                           ("search_anon_peak_mib", "search +anon MiB", ".0f"),
                           ("search_hwm_mib", "search HWM MiB", ".0f")])
        payload = {"benchmark": "search_scale", "args": vars(args), "environment": environment(),
                   "notes": ["run with MALLOC_MMAP_THRESHOLD_=65536 and ARROW_DEFAULT_MEMORY_POOL=system so freed "
                             "memory is returned and the counters show live memory",
                             "+anon: peak RssAnon above the level at the start of the phase (process-owned "
                             "memory: what --ceiling bounds for faiss-ondisk)",
                             "HWM: VmHWM, all resident pages since process start, page cache of memory-mapped "
                             "index files included (reclaimable by the kernel)",
                             "milvus-lite runs in-process (pure Python + faiss), so its memory is in the same counters"],
                   "results": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
