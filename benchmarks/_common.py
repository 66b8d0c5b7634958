"""Shared benchmark utilities: matmul peak, alternating timed runs, medians, RSS sampling, tables.

Benchmarks run clipforge and the reference libraries in ONE process, alternating between them
(so drifting machine load hits both alike), with warm-up, and report medians with min/max.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def openai_reference_module(name: str):
    """A module of OpenAI's reference code (clip-anytorch, e.g. ``model`` or ``simple_tokenizer``)
    loaded by file path, since ``import clip`` needs torchvision; None when not installed."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    mspec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS in a thread (every 2 ms) to get the peak over a block."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def matmul_peak_gflops(n: int = 4096, reps: int = 5) -> dict[str, float]:
    """fp32 GEMM throughput (GFLOP/s) of this machine with the current thread setting, through
    the BLAS behind ``torch.mm`` (MKL) and through oneDNN (when this torch has it); ``peak`` is
    the higher, the ceiling that '% of peak' figures are measured against. ``bf16_peak``: the same
    n^3 product in bf16 through oneDNN (0 where it cannot run), the ceiling for bf16 rows."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"blas": 2 * n**3 / median_time(lambda: torch.mm(a, b), reps) / 1e9}
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is not None:
        bt = b.t().contiguous()
        out["onednn"] = 2 * n**3 / median_time(lambda: op(a, bt, None, "none", [], ""), reps) / 1e9
    out["peak"] = max(out.values())
    try:
        a16, b16 = a.bfloat16(), b.t().contiguous().bfloat16()
        f = (lambda: op(a16, b16, None, "none", [], "")) if op is not None else (lambda: torch.mm(a16, b16.t()))
        out["bf16_peak"] = 2 * n**3 / median_time(f, reps) / 1e9
    except RuntimeError:  # no bf16 kernel here
        out["bf16_peak"] = 0.0
    return out


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median wall seconds of ``reps`` calls of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass
class Timing:
    name: str
    times: list[float] = field(default_factory=list)
    peak_rss: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def summary(self, items: int) -> dict[str, float]:
        return {"median_s": self.median, "min_s": min(self.times), "max_s": max(self.times),
                "items_per_s": items / self.median, "items_per_s_min": items / max(self.times),
                "items_per_s_max": items / min(self.times), "peak_rss_mb": self.peak_rss / 2**20}


def alternate(fns: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Run each function ``warmup`` times, then ``reps`` rounds alternating between them."""
    timings = {name: Timing(name) for name in fns}
    for name, fn in fns.items():
        with PeakRSS() as rss:
            for _ in range(warmup):
                fn()
        timings[name].peak_rss = rss.peak
    for _ in range(reps):
        for name, fn in fns.items():
            with PeakRSS() as rss:
                t = time.perf_counter()
                fn()
                timings[name].times.append(time.perf_counter() - t)
            timings[name].peak_rss = max(timings[name].peak_rss, rss.peak)
    return timings


def environment() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    widths = [max(len(h), *(len(format(r.get(k, ""), f) if r.get(k) is not None else "-") for r in rows))
              for k, h, f in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        cells = []
        for (k, _, f), w in zip(columns, widths):
            v = r.get(k)
            cells.append((format(v, f) if v is not None else "-").rjust(w))
        print("  ".join(cells))


def write_results(name: str, payload: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
