"""Load test of `clipforge serve`: 50 concurrent clients, with and without one abusive client.

The server runs in its own process (uvicorn, the product app from ``create_app``) over an exact
index of ``--n`` synthetic unit vectors, with a ``--model`` zoo architecture in random weights (the
text tower's cost is what matters, not its answers). An asyncio + httpx client then runs two phases
of ``--duration`` seconds each:

- ``baseline``: ``--clients`` clients in closed loops, each sending text queries (random 3-6 word
  phrases from a small vocabulary, so the query cache hits some) and search-by-item queries;
- ``abuse``: the same, plus one client sending 10 MB JSON text queries back to back (alternately
  with Content-Length, refused on the header, and chunked, refused once 256 KiB have arrived).

Meanwhile ``/health`` is polled every 100 ms. Printed: p50/p99/max latency and counts per request
kind and phase, the status codes seen (a 5xx is a failure); written to
benchmarks/results/serve_load.json (or --out).

    python benchmarks/serve_load.py                      # 50 clients, 20 s per phase
    python benchmarks/serve_load.py --duration 5 --n 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, print_table

SERVER = """
import socket, sys
import uvicorn
import clipforge
from clipforge.inference import optimize_for_inference
from clipforge.search.service import create_app
index, model_name, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = optimize_for_inference(clipforge.create_model(model_name, seed=0))
app = create_app(index, model, workers=threads)
sock = socket.socket(); sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
"""
WORDS = ("dog cat beach red blue car tree house river mountain city night snow bird flower street boat "
         "child old green small large running sitting photo painting").split()


def build_index(root: Path, n: int, dim: int, seed: int) -> Path:
    from clipforge.embeddings import (
        EMB_DIRS,
        FORMAT,
        ShardPaths,
        rebuild_summary,
        write_shard,
    )
    from clipforge.search.index import build_index as build

    rng = np.random.default_rng(seed)
    shard = 10_000
    for i in range(-(-n // shard)):
        m = min(shard, n - i * shard)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        rows = [{"key": f"v{i * shard + j}", "image_path": None, "member": None, "caption": f"item {i * shard + j}",
                 "width": None, "height": None} for j in range(m)]
        write_shard(ShardPaths(root / "emb", "image", i), x, rows, [])
    rebuild_summary(root / "emb", "image", {"format": FORMAT, "kind": "image", "embedding_dir": EMB_DIRS["image"],
                                            "dim": dim, "model": None, "source": {"type": "synthetic"}}, None)
    build(root / "emb", root / "idx", n_queries=100, progress=False)
    return root / "idx"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_phase(base: str, clients: int, duration: float, abusive: bool, n: int, seed: int) -> dict:
    import httpx

    lat: dict[str, list[float]] = defaultdict(list)
    codes: dict[str, Counter] = defaultdict(Counter)
    stop = time.perf_counter() + duration
    big = json.dumps({"text": "dog " * (10 * 2**20 // 4)}).encode()

    async def timed(kind: str, coro) -> None:
        t = time.perf_counter()
        try:
            r = await coro
            codes[kind][r.status_code] += 1
        except httpx.HTTPError as e:  # the server may close an oversized upload mid-send
            codes[kind][type(e).__name__] += 1
        lat[kind].append(1000 * (time.perf_counter() - t))

    async def client(i: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            while time.perf_counter() < stop:
                if rng.random() < 0.8:
                    text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
                    await timed("text", c.post("/search", json={"text": text, "k": 10}))
                else:
                    await timed("item", c.post("/search", json={"item_id": int(rng.integers(0, n)), "k": 10}))

    async def abuser() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            chunked = False
            while time.perf_counter() < stop:
                if chunked:
                    async def body():
                        for s in range(0, len(big), 1 << 20):
                            yield big[s:s + (1 << 20)]
                    await timed("abuse_chunked", c.post("/search", content=body(),
                                                        headers={"content-type": "application/json"}))
                else:
                    await timed("abuse_10MB", c.post("/search", content=big,
                                                     headers={"content-type": "application/json"}))
                chunked = not chunked

    async def health() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            while time.perf_counter() < stop:
                await timed("health", c.get("/health"))
                await asyncio.sleep(0.1)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)), health(), *([abuser()] if abusive else []))
    wall = time.perf_counter() - t0
    return {kind: {"count": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "max_ms": max(v),
                   "per_s": len(v) / wall, "status": {str(k): c for k, c in sorted(codes[kind].items(), key=str)}}
            for kind, v in sorted(lat.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    ap.add_argument("--model", default="ViT-B/32", help="zoo architecture (random weights)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--threads", type=int, default=4, help="server worker threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = ap.parse_args()

    import clipforge

    dim = clipforge.get_model_config(args.model).embed_dim
    with tempfile.TemporaryDirectory() as tmp:
        idx = build_index(Path(tmp), args.n, dim, args.seed)
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(idx), args.model, str(args.threads)],
                                stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            base = f"http://127.0.0.1:{port}"
            import httpx

            for _ in range(600):
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            asyncio.run(run_phase(base, 4, 2.0, False, args.n, args.seed + 99))  # warm-up
            phases = {name: asyncio.run(run_phase(base, args.clients, args.duration, abusive, args.n, args.seed))
                      for name, abusive in (("baseline", False), ("abuse", True))}
        finally:
            proc.terminate()
            proc.wait(30)
    rows = [{"phase": phase, "request": kind, **r, "codes": " ".join(f"{k}:{v}" for k, v in r["status"].items())}
            for phase, res in phases.items() for kind, r in res.items()]
    print_table(rows, [("phase", "phase", ""), ("request", "request", ""), ("count", "count", "d"),
                       ("per_s", "req/s", ".1f"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
                       ("max_ms", "max ms", ".1f"), ("codes", "status", "")])
    server_errors = sum(v for res in phases.values() for r in res.values() for k, v in r["status"].items()
                        if k.isdigit() and int(k) >= 500)
    print(f"5xx responses: {server_errors}")
    out = {"config": vars(args) | {"out": str(args.out)}, "environment": environment(), "phases": phases,
           "server_errors_5xx": server_errors}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 1 if server_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
