"""Load test of `clipforge serve` (server in its own process, uvicorn + the product app).

Suites (``--suite``, default all):

- ``batching``: closed-loop clients (``--clients-list``, default 1,8,32,128) sending unique text
  queries (no cache hits) to /search (``text``: encode + search of the index) and to /embed
  (``embed``: one text per request, the encode alone), or image uploads, against a server with batching on (``--max-batch``,
  ``--batch-wait-ms``) and with ``--max-batch 1``, in fp32 and bf16 (``--precisions``; bf16 is
  skipped, with the reason, where the CPU has no bf16 GEMM, as benchmarks/encode.py decides).
  Per row: QPS, p50/p99 latency, mean batch size (from the server's /metrics), 503s (a full
  queue: by design) apart from other 5xx. The clients are one asyncio process speaking raw
  HTTP/1.1 over keep-alive sockets (a few hundred microseconds of CPU per request, where httpx
  took ~2 ms: on a 2-core machine the load generator must not eat the server's CPU). Also the
  offline batched text and image encode rates of the same model, precision and thread count in
  this process, and the goal ratios at 32 text clients: batched / unbatched QPS (goal >= 3),
  batched QPS / offline rate (goal >= 0.7), p99 / (2 x single-client p50 + batch wait) (goal < 1).
- ``costs``: what the goals allow on this machine, from the server's own parts timed in this process
  (medians of ``--cost-reps``): the exact (batch-invariant) encode of 1, 16 and 32 texts and the plain
  batched encode of 16 and 32 on the server's encode threads, one flat-index search by FAISS (a
  query alone) and the server's batched search of 32 queries (``search_flat_exact``, 1 thread). From them: the most QPS the cores could give if they did nothing but
  encode and search (``ceiling_qps``; also with the search free), against the 70% goal; and, by
  Little's law (32 closed-loop clients: mean latency = 32 / QPS), the QPS the p99 goal needs with the
  single-client latency measured by ``batching`` in the same run.
- ``hardening``: ``--clients`` clients (text + search-by-item) with and without one client
  sending 10 MB JSON bodies; then four clients uploading a 169-megapixel PNG (a few tens of KB)
  back to back; then ``--idle`` idle connections held open. Each phase polls /health every
  100 ms and reads the server's RSS (now / peak) before and after.

Printed as tables; written to benchmarks/results/serve_load.json (or --out). Exit 1 on any 5xx
other than 503 (503 is the server shedding load by design; counted apart).

    python benchmarks/serve_load.py                               # everything, ViT-B/32
    python benchmarks/serve_load.py --suite batching --duration 10 --precisions fp32
    python benchmarks/serve_load.py --suite batching,costs --precisions fp32       # the goals and what bounds them
    python benchmarks/serve_load.py --model tiny-vit --n 500 --duration 1 --clients-list 1,4 --idle 300  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, median_time, print_table

SERVER = """
import json, socket, sys
from clipforge.loading import load_for_inference
from clipforge.search.server import ServerLimits, connection_budget, uvicorn_server
from clipforge.search.service import create_app, default_encode_threads
cfg = json.loads(sys.argv[1])
limits = connection_budget(ServerLimits(max_connections=cfg["max_connections"]))
model, pre = load_for_inference(cfg["model"], precision=cfg["precision"], random_init=True, seed=0)
app = create_app(cfg["index"], model, pre, workers=cfg["threads"], max_batch=cfg["max_batch"],
                 batch_wait_ms=cfg["wait_ms"], max_pending=4096, query_cache=cfg["cache"],
                 exact_batches=cfg["exact"], encode_threads=cfg["encode_threads"] or default_encode_threads(),
                 batch_searches=cfg["batch_searches"])
sock = socket.socket(); sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn_server(app, limits, log_level="warning", access_log=False).run(sockets=[sock])
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


class Server:
    """The server process for one configuration."""

    def __init__(self, idx: Path, args: argparse.Namespace, *, max_batch: int, precision: str, cache: int = 1024):
        import httpx

        cfg = {"index": str(idx), "model": args.model, "threads": args.threads, "max_batch": max_batch,
               "wait_ms": args.batch_wait_ms, "precision": precision, "cache": cache,
               "max_connections": args.max_connections, "exact": args.exact,
               "encode_threads": args.encode_threads, "batch_searches": args.batch_searches}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

    def rss(self) -> dict[str, float]:
        """Resident memory now and at its peak (MiB), from /proc."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"] = int(line.split()[1]) / 1024
        return out

    def batch_stats(self, kind: str) -> tuple[float, float]:
        import httpx

        text = httpx.get(self.base + "/metrics", timeout=30).text
        get = lambda what: float((re.search(rf'clipforge_batch_size_{what}{{kind="{kind}"}} (\S+)', text) or [0, 0])[1])
        return get("sum"), get("count")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def query_images(n: int = 16) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = Image.fromarray(rng.integers(0, 256, (240 + 8 * i, 320, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


class RawClient:
    """A minimal HTTP/1.1 keep-alive client (asyncio streams): the load generator's CPU per
    request stays small next to the server's. Reconnects when the server closes."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> int:
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(head + body)
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed")
                status = int(status_line.split()[1])
                length, close = 0, False
                while True:
                    line = await self.reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                await self.reader.readexactly(length)
                if close:
                    self.close()
                return status
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def json_request(port: int, path: str, payload: dict) -> tuple[bytes, bytes]:
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head, body


def upload_request(port: int, image: bytes, k: int = 10) -> tuple[bytes, bytes]:
    b = "clipforgeloadboundary"
    body = (f"--{b}\r\ncontent-disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{b}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"content-type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{b}--\r\n".encode()
    head = (f"POST /search HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: multipart/form-data; boundary={b}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    return head, body


async def closed_loop(port: int, clients: int, duration: float, kind: str, seed: int) -> dict:
    """``clients`` closed loops of unique text queries (``text``: /search; ``embed``: /embed, the
    encode alone) or image uploads for ``duration`` s."""
    lat: list[float] = []
    codes: Counter = Counter()
    images = query_images()
    uploads = [upload_request(port, im) for im in images]
    stop = time.perf_counter() + duration

    async def client(i: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        j = 0
        c = RawClient("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                if kind in ("text", "embed"):  # unique: the query cache never answers
                    text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) + f" {i} {j}"
                    head, body = (json_request(port, "/search", {"text": text, "k": 10}) if kind == "text"
                                  else json_request(port, "/embed", {"texts": [text]}))
                else:
                    head, body = uploads[(i + j) % len(uploads)]
                t = time.perf_counter()
                try:
                    codes[await c.request(head, body)] += 1
                except (OSError, asyncio.IncompleteReadError) as e:
                    codes[type(e).__name__] += 1
                lat.append(1000 * (time.perf_counter() - t))
                j += 1
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = sum(v for k, v in codes.items() if k == 200)
    return {"count": len(lat), "qps": ok / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "busy_503": codes.get(503, 0),
            "errors_5xx": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500 and k != 503),
            "status": {str(k): v for k, v in sorted(codes.items(), key=str)}}


def offline_rates(args: argparse.Namespace, precision: str, batch: int = 32, n: int = 256) -> dict[str, float]:
    """Texts and images per second when they come as batches of ``batch`` (same model and
    precision, this process's torch thread count: the offline reference the goals are against)."""
    import torch

    from clipforge.inference import embed_images, embed_texts
    from clipforge.loading import load_for_inference
    from clipforge.utils import torch_threads

    model, _ = load_for_inference(args.model, precision=precision, random_init=True, seed=0)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) + f" {i}" for i in range(n)]
    images = torch.randn(max(n // 4, batch), 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    with torch_threads(args.offline_threads):
        embed_texts(model, texts[:batch], batch_size=batch)  # warm-up
        t = time.perf_counter()
        embed_texts(model, texts, batch_size=batch)
        text_rate = n / (time.perf_counter() - t)
        embed_images(model, images[:batch], batch_size=batch)
        t = time.perf_counter()
        embed_images(model, images, batch_size=batch)
        image_rate = len(images) / (time.perf_counter() - t)
    return {"text": text_rate, "image": image_rate}


def costs_suite(idx: Path, args: argparse.Namespace, precision: str = "fp32") -> dict:
    """The server's parts timed alone, in this process, on the server's encode threads: the
    exact encode (:func:`clipforge.search.exact.encode_texts_exact`, the server's default), the
    plain batched encode, one flat-index search; and the offline rate the goals are against."""
    import os

    from clipforge.inference import embed_texts
    from clipforge.loading import load_for_inference
    import torch

    from clipforge.search.exact import encode_texts_exact, flat_vectors, search_flat_exact
    from clipforge.search.index import load_index
    from clipforge.search.service import default_encode_threads
    from clipforge.utils import torch_threads

    threads = args.encode_threads or default_encode_threads()
    cores = len(os.sched_getaffinity(0))
    model, _ = load_for_inference(args.model, precision=precision, random_init=True, seed=0)
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) + f" {i}" for i in range(32)]
    index = load_index(idx)
    q = np.ascontiguousarray(rng.standard_normal((1, index.info["dim"])).astype(np.float32))
    out: dict = {"precision": precision, "encode_threads": threads, "cores": cores, "reps": args.cost_reps}
    with torch_threads(threads):
        for b in (1, 16, 32):
            out[f"exact_{b}_ms"] = 1000 * median_time(lambda: encode_texts_exact(model, texts[:b]), args.cost_reps)
        for b in (16, 32):
            out[f"plain_{b}_ms"] = 1000 * median_time(lambda: embed_texts(model, texts[:b], batch_size=b), args.cost_reps)
    out["search_1_ms"] = 1000 * median_time(lambda: index.search(q, 10), args.cost_reps)
    vectors = flat_vectors(index)
    if vectors is not None:  # the server's batched search of an exact index: 32 queries, max_k + 1 each
        qs = torch.from_numpy(rng.standard_normal((32, index.info["dim"])).astype(np.float32))
        with torch_threads(1):
            out["search_batched_32_ms"] = 1000 * median_time(lambda: search_flat_exact(vectors, qs, 101), args.cost_reps)
    out["offline_per_s"] = offline_rates(args, precision)["text"]
    # CPU-milliseconds per query of the server's two heavy parts at a batch of 32
    enc = out["exact_32_ms"] * threads / 32
    out["exact_core_ms_per_text"] = enc
    out["plain_core_ms_per_text"] = out["plain_32_ms"] * threads / 32
    out["search_core_ms_per_query"] = out.get("search_batched_32_ms", 32 * out["search_1_ms"]) / 32
    out["ceiling_qps"] = 1000 * cores / (enc + out["search_core_ms_per_query"])
    out["ceiling_qps_search_free"] = 1000 * cores / enc
    out["ceiling_of_offline"] = out["ceiling_qps"] / out["offline_per_s"]
    out["ceiling_search_free_of_offline"] = out["ceiling_qps_search_free"] / out["offline_per_s"]
    out["batch16_over_single"] = out["exact_16_ms"] / out["exact_1_ms"]
    return out


def p99_needs(costs: dict, rows: list[dict], args: argparse.Namespace, clients: int = 32) -> dict:
    """Little's law for ``clients`` closed-loop clients with no think time: mean latency =
    clients / QPS. The p99 goal (p99 < 2 x single-client p50 + batch wait) then needs at least
    QPS > clients / bound (a p99 under the mean would need a latency spread these runs do not show:
    ``batching`` reports p50 and p99)."""
    one = next((r for r in rows if r.get("precision") == costs["precision"] and r.get("kind") == "text"
                and r.get("max_batch") == args.max_batch and r.get("clients") == 1), None)
    if one is None:
        return {}
    bound = 2 * one["p50_ms"] + args.batch_wait_ms
    need = 1000 * clients / bound
    return {"clients": clients, "single_p50_ms": one["p50_ms"], "p99_bound_ms": bound, "qps_needed": need,
            "needed_of_offline": need / costs["offline_per_s"], "needed_of_ceiling": need / costs["ceiling_qps"]}


def bf16_missing() -> str | None:
    """Why bf16 rows cannot run here (None if they can): benchmarks/encode.py's test, a bf16
    GEMM through oneDNN (a small one: only whether the kernel exists matters)."""
    from _common import matmul_peak_gflops

    if not matmul_peak_gflops(n=128, reps=1)["bf16_peak"]:
        return "this CPU has no bf16 GEMM (oneDNN refuses bf16 products: no AVX512-BF16 / AMX / AVX-NE-CONVERT)"
    return None


def batching_suite(idx: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for precision in args.precisions:
        why = bf16_missing() if precision == "bf16" else None
        if why is None:
            try:
                offline = offline_rates(args, precision)
            except RuntimeError as e:  # e.g. bf16 packing needs AVX512-BF16 / AVX-NE-CONVERT on this CPU
                why = str(e).splitlines()[0]
        if why is not None:
            print(f"  skipping {precision}: {why}", flush=True)
            rows.append({"precision": precision, "skipped": why, "status": {}})
            continue
        print(f"  offline {precision}: {offline['text']:.1f} texts/s, {offline['image']:.1f} images/s", flush=True)
        for max_batch in (args.max_batch, 1):
            server = Server(idx, args, max_batch=max_batch, precision=precision, cache=0)
            try:
                asyncio.run(closed_loop(server.port, 2, 1.0, "text", 99))  # warm-up
                for kind in ("text", "embed", "image"):
                    batcher = "text" if kind == "embed" else kind
                    for clients in args.clients_list:
                        s0, c0 = server.batch_stats(batcher)
                        r = asyncio.run(closed_loop(server.port, clients, args.duration, kind, args.seed))
                        s1, c1 = server.batch_stats(batcher)
                        rows.append({"precision": precision, "max_batch": max_batch, "kind": kind, "clients": clients,
                                     **r, "mean_batch": (s1 - s0) / max(c1 - c0, 1), "offline_per_s": offline[batcher],
                                     "of_offline": r["qps"] / offline[batcher]})
                        print(f"  {precision} max_batch={max_batch} {kind} x{clients}: {r['qps']:.1f} q/s "
                              f"(503: {r['busy_503']}, other 5xx: {r['errors_5xx']})", flush=True)
            finally:
                server.close()
    return rows


def goals(rows: list[dict], args: argparse.Namespace, clients: int = 32) -> list[dict]:
    """The batching goals at ``clients`` text clients, per precision and kind."""
    out = []
    for precision in args.precisions:
        for kind in ("text", "embed", "image"):
            get = {(r["max_batch"], r["clients"]): r for r in rows
                   if r.get("precision") == precision and r.get("kind") == kind}
            on, off, one = get.get((args.max_batch, clients)), get.get((1, clients)), get.get((args.max_batch, 1))
            if on is None or off is None:
                continue
            bound = 2 * one["p50_ms"] + args.batch_wait_ms if one else float("nan")
            out.append({"precision": precision, "kind": kind, "clients": clients,
                        "vs_unbatched": on["qps"] / max(off["qps"], 1e-9), "of_offline": on["of_offline"],
                        "p99_ms": on["p99_ms"], "p99_bound_ms": bound, "p99_over_bound": on["p99_ms"] / bound})
    return out


async def health_during(base: str, duration: float, load) -> dict:
    """Poll /health every 100 ms while ``load`` (a coroutine) runs for ``duration`` s."""
    import httpx

    lat: list[float] = []
    codes: Counter = Counter()
    stop = time.perf_counter() + duration

    async def poll() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    codes[(await c.get("/health")).status_code] += 1
                except httpx.HTTPError as e:
                    codes[type(e).__name__] += 1
                lat.append(1000 * (time.perf_counter() - t))
                await asyncio.sleep(0.1)

    other = await asyncio.gather(poll(), load(stop))
    return {"health_count": len(lat), "health_p50_ms": pct(lat, 50), "health_p99_ms": pct(lat, 99),
            "health_max_ms": max(lat) if lat else float("nan"),
            "health_status": " ".join(f"{k}:{v}" for k, v in sorted(codes.items(), key=str)), **(other[1] or {})}


def bomb_png(side: int = 13_000) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, "PNG")
    return buf.getvalue()


def idle_flood(port: int, n: int, stop: float, result) -> None:
    """Open ``n`` connections that never send a byte, hold them until ``stop``, report to ``result``."""
    socks, refused, t0 = [], 0, time.perf_counter()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            refused += 1
            s.close()
            continue
        socks.append(s)
    opened_s = time.perf_counter() - t0
    result.put({"idle_opened": len(socks), "idle_failed": refused, "idle_open_seconds": round(opened_s, 2)})
    time.sleep(max(stop - time.perf_counter(), 0))
    for s in socks:
        s.close()


def hardening_suite(idx: Path, args: argparse.Namespace) -> dict:
    import httpx

    server = Server(idx, args, max_batch=args.max_batch, precision="fp32")
    out: dict = {}
    try:
        asyncio.run(run_phase(server.base, 4, 2.0, False, args.n, args.seed + 99))  # warm-up
        for name, abusive in (("baseline", False), ("abuse", True)):
            out[name] = asyncio.run(run_phase(server.base, args.clients, args.duration, abusive, args.n, args.seed))
        bomb = bomb_png()

        async def bombs(stop: float) -> dict:
            codes: Counter = Counter()

            async def one() -> None:
                async with httpx.AsyncClient(base_url=server.base, timeout=120) as c:
                    while time.perf_counter() < stop:
                        r = await c.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
                        codes[r.status_code] += 1
            await asyncio.gather(*(one() for _ in range(4)))
            return {"load_status": " ".join(f"{k}:{v}" for k, v in sorted(codes.items()))}

        before = server.rss()
        r = asyncio.run(health_during(server.base, args.duration, bombs))
        out["bomb"] = {**r, "bomb_bytes": len(bomb), "rss_before_mib": before["rss_mib"], **server.rss()}

        async def idle(stop: float) -> dict:
            # the flood lives in its own process: opening ~20k sockets blocks for tens of seconds
            # (ephemeral port search), which must not stall the /health poller's event loop
            ctx = multiprocessing.get_context("fork")
            result = ctx.Queue()
            proc = ctx.Process(target=idle_flood, args=(server.port, args.idle, stop, result))
            proc.start()
            while time.perf_counter() < stop:
                await asyncio.sleep(0.1)
            out = await asyncio.to_thread(result.get)
            await asyncio.to_thread(proc.join)
            return out

        before = server.rss()
        r = asyncio.run(health_during(server.base, args.duration, idle))
        out["idle_flood"] = {**r, "rss_before_mib": before["rss_mib"], **server.rss()}
    finally:
        server.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=lambda t: t.split(","), default=["all"],
                    help="comma-separated: all, batching, costs, hardening (default all)")
    ap.add_argument("--cost-reps", type=int, default=7, help="costs: timed calls per part (median)")
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    ap.add_argument("--model", default="ViT-B/32", help="zoo architecture (random weights)")
    ap.add_argument("--clients", type=int, default=50, help="hardening: clients of the baseline/abuse phases")
    ap.add_argument("--clients-list", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32, 128])
    ap.add_argument("--precisions", type=lambda t: t.split(","), default=["fp32", "bf16"])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                    help="server's --exact-batches (fixed-shape chunks: the same bits whatever the batch)")
    ap.add_argument("--batch-searches", action=argparse.BooleanOptionalAction, default=True,
                    help="server's --batch-searches (flat-index searches of a batch together, chunks of 4)")
    ap.add_argument("--encode-threads", type=int, default=None,
                    help="server's torch threads for the encodes (default: clipforge serve's, cores - 1)")
    ap.add_argument("--offline-threads", type=int, default=None,
                    help="torch threads of the offline reference rates (default: torch's, all cores)")
    ap.add_argument("--idle", type=int, default=20_000, help="hardening: idle connections of the flood")
    ap.add_argument("--max-connections", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per row / phase")
    ap.add_argument("--threads", type=int, default=4, help="server worker threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = ap.parse_args()
    unknown = set(args.suite) - {"all", "batching", "costs", "hardening"}
    if unknown:
        ap.error(f"unknown suite(s) {sorted(unknown)}: choose from all, batching, costs, hardening")
    wants = lambda name: "all" in args.suite or name in args.suite  # noqa: E731

    import clipforge
    from clipforge.search.server import raise_fd_limit

    soft = raise_fd_limit()
    if args.idle > soft - 256:
        print(f"note: --idle {args.idle} lowered to {soft - 256} (this process may open {soft} descriptors)")
        args.idle = max(soft - 256, 0)
    dim = clipforge.get_model_config(args.model).embed_dim
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "environment": environment()}
    server_errors = 0
    with tempfile.TemporaryDirectory() as tmp:
        idx = build_index(Path(tmp), args.n, dim, args.seed)
        rows: list[dict] = []
        if wants("batching"):
            rows = batching_suite(idx, args)
            out["batching"] = rows
            print_table([r for r in rows if "skipped" not in r], [("precision", "precision", ""), ("max_batch", "max batch", "d"), ("kind", "kind", ""),
                               ("clients", "clients", "d"), ("qps", "QPS", ".1f"), ("p50_ms", "p50 ms", ".1f"),
                               ("p99_ms", "p99 ms", ".1f"), ("mean_batch", "mean batch", ".1f"),
                               ("busy_503", "503", "d"), ("errors_5xx", "other 5xx", "d"),
                               ("offline_per_s", "offline /s", ".1f"), ("of_offline", "of offline", ".2f")])
            out["goals"] = goals(rows, args, 32 if 32 in args.clients_list else max(args.clients_list))
            print_table(out["goals"] or [{}], [("precision", "precision", ""), ("kind", "kind", ""), ("clients", "clients", "d"),
                                       ("vs_unbatched", "QPS / unbatched (>= 3)", ".2f"),
                                       ("of_offline", "QPS / offline (>= 0.70)", ".2f"), ("p99_ms", "p99 ms", ".1f"),
                                       ("p99_bound_ms", "2 x 1-client p50 + wait", ".1f"),
                                       ("p99_over_bound", "p99 / that (< 1)", ".2f")])
            for r in rows:
                if "skipped" in r:
                    print(f"{r['precision']}: skipped ({r['skipped']})")
            server_errors += sum(r.get("errors_5xx", 0) for r in rows)
            out["busy_503"] = sum(r.get("busy_503", 0) for r in rows)
        if wants("costs"):
            costs = costs_suite(idx, args)
            costs["p99_needs"] = p99_needs(costs, rows, args)
            out["costs"] = costs
            print_table([costs], [("encode_threads", "encode threads", "d"), ("exact_1_ms", "exact 1 ms", ".1f"),
                                  ("exact_16_ms", "exact 16 ms", ".1f"), ("exact_32_ms", "exact 32 ms", ".1f"),
                                  ("plain_16_ms", "plain 16 ms", ".1f"), ("plain_32_ms", "plain 32 ms", ".1f"),
                                  ("search_1_ms", "1 search ms", ".1f"), ("search_batched_32_ms", "32 batched ms", ".1f"),
                                  ("offline_per_s", "offline /s", ".1f")])
            print_table([costs], [("exact_core_ms_per_text", "encode core-ms/text", ".1f"),
                                  ("search_core_ms_per_query", "search core-ms/query", ".1f"),
                                  ("ceiling_qps", "ceiling QPS", ".1f"), ("ceiling_of_offline", "of offline", ".2f"),
                                  ("ceiling_search_free_of_offline", "search free: of offline", ".2f"),
                                  ("batch16_over_single", "16 texts / 1 text", ".1f")])
            if costs["p99_needs"]:
                print_table([costs["p99_needs"]], [("clients", "clients", "d"), ("single_p50_ms", "1-client p50 ms", ".1f"),
                                                   ("p99_bound_ms", "p99 bound ms", ".1f"), ("qps_needed", "QPS needed", ".1f"),
                                                   ("needed_of_offline", "of offline", ".2f"),
                                                   ("needed_of_ceiling", "of ceiling", ".2f")])
        if wants("hardening"):
            phases = hardening_suite(idx, args)
            out["hardening"] = phases
            rows = [{"phase": phase, "request": kind, **r, "codes": " ".join(f"{k}:{v}" for k, v in r["status"].items())}
                    for phase in ("baseline", "abuse") for kind, r in phases[phase].items()]
            print_table(rows, [("phase", "phase", ""), ("request", "request", ""), ("count", "count", "d"),
                               ("per_s", "req/s", ".1f"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
                               ("max_ms", "max ms", ".1f"), ("codes", "status", "")])
            rows = [{"phase": p, **phases[p]} for p in ("bomb", "idle_flood")]
            print_table(rows, [("phase", "phase", ""), ("health_count", "/health n", "d"),
                               ("health_p50_ms", "p50 ms", ".1f"), ("health_p99_ms", "p99 ms", ".1f"),
                               ("health_max_ms", "max ms", ".1f"), ("health_status", "/health status", ""),
                               ("rss_before_mib", "RSS before MiB", ".0f"), ("rss_mib", "RSS after MiB", ".0f"),
                               ("peak_rss_mib", "peak MiB", ".0f")])
            print(f"bomb uploads: {phases['bomb'].get('load_status')}; idle flood: "
                  f"{phases['idle_flood'].get('idle_opened')} opened, {phases['idle_flood'].get('idle_failed')} failed")
            codes = Counter()
            for p in ("baseline", "abuse"):
                for r in phases[p].values():
                    codes.update({int(k): v for k, v in r["status"].items() if k.isdigit()})
            for p in ("bomb", "idle_flood"):
                codes.update({int(x.split(":")[0]): int(x.split(":")[1]) for x in phases[p]["health_status"].split()
                              if x.split(":")[0].isdigit()})
            server_errors += sum(v for k, v in codes.items() if k >= 500 and k != 503)
            out["busy_503"] = out.get("busy_503", 0) + codes.get(503, 0)
    print(f"503 (server busy, by design): {out.get('busy_503', 0)}; other 5xx responses: {server_errors}")
    out["server_errors_5xx"] = server_errors
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 1 if server_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
