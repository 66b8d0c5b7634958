"""Which kernel runs fp32 CPU linears ("torch" = ``F.linear``/MKL, "onednn"), and which reduced
precision ``precision="auto"`` means: chosen once per machine, written down, never re-timed.

Kernels round differently, so a choice made by timing in every process made results depend on the
machine's load (two processes could pick differently; a resumed training run then diverged from
the uninterrupted one). Now the request comes from, in this order: ``set_backend(...)`` (training
sets it from its config, a resumed run from its run folder), the environment variable
``CLIPFORGE_LINEAR`` = ``torch`` | ``onednn`` | ``auto``, else ``auto``. ``auto`` reads the machine's
cache file ``$CLIPFORGE_CACHE_DIR`` (default ``~/.cache/clipforge``) ``/linear-<key>.json``, keyed by
CPU model, ISA flags and torch version; the first process on a machine to need it times both kernels
once and publishes the file atomically (a hard link, so when two race the first file wins and the
other re-reads it). ``backend_record()`` says what was used and why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import DTYPES
from .linear import OneDNNLinear, onednn_available, onednn_linear

ENV = "CLIPFORGE_LINEAR"
CACHE_ENV = "CLIPFORGE_CACHE_DIR"
CHOICES = ("auto", "torch", "onednn")

# The one piece of process state: an explicit request, like ``torch.set_num_threads``.
_requested: str | None = None


def _check(name: str, where: str) -> str:
    value = str(name).strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{where} must be one of {', '.join(CHOICES)}, got {name!r}")
    return value


def set_backend(name: str | None) -> str | None:
    """Request the linear backend for this process (``None``: back to ``CLIPFORGE_LINEAR`` /
    ``auto``). Returns the previous request."""
    global _requested
    previous = _requested
    _requested = None if name is None else _check(name, "backend")
    return previous


@contextlib.contextmanager
def using_backend(name: str | None) -> Iterator[None]:
    """``set_backend(name)`` for the duration of a block (a training run), restored after."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def requested_backend() -> tuple[str, str]:
    """``(choice, source)``: what was asked for (possibly ``auto``) and by whom."""
    if _requested is not None:
        return _requested, "set_backend"
    env = os.environ.get(ENV)
    if env:
        return _check(env, ENV), f"env {ENV}"
    return "auto", "default"


def linear_backend() -> str:
    """The backend fp32 CPU linears use now: ``"torch"`` or ``"onednn"``."""
    choice, _ = requested_backend()
    if choice == "auto":
        return machine_linear_choice()["choice"]
    if choice == "onednn" and not onednn_available():
        _warn_once("oneDNN's linear is not available in this torch build/CPU; using torch's")
        return "torch"
    return choice


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# --- the dispatch -------------------------------------------------------------------------------
def tracing() -> bool:
    """Tracing for ONNX / TorchScript records standard ops and a data-independent graph."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def plain_kernels() -> bool:
    """Traced or compiled code gets plain ops: ``torch.compile`` does its own weight packing."""
    return tracing() or torch.compiler.is_compiling()


def use_packed() -> bool:
    """Whether prepacked inference weights may be used now: no autograd, no autocast (it picks the
    product's dtype), not traced/compiled."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and not plain_kernels()


def packs(weight: torch.Tensor) -> bool:
    """Whether inference weights like ``weight`` are prepacked: CPU fp32 when the linear backend
    is oneDNN, CPU bf16 wherever oneDNN runs (torch's own bf16 CPU products are oneDNN's)."""
    if weight.device.type != "cpu" or not onednn_available():
        return False
    return ((weight.dtype == torch.bfloat16 and onednn_bf16_available())
            or (weight.dtype == torch.float32 and linear_backend() == "onednn"))


@functools.lru_cache(maxsize=None)
def onednn_bf16_available() -> bool:
    """Whether this CPU runs oneDNN's bf16 products (AVX-512 BF16 / AVX-NE-CONVERT): without them
    torch's bf16 weight reorder raises, and bf16 inference takes the unpacked products."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; through oneDNN (with its own backward) for fp32 CPU tensors when the backend
    is ``onednn`` (not under autocast, which runs reduced precision, nor traced/compiled)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and not plain_kernels()
            and not torch.is_autocast_enabled("cpu") and linear_backend() == "onednn"):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return OneDNNLinear.apply(x, weight, bias)
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """``nn.Linear`` through :func:`linear` (the same Parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# --- the machine cache ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def machine_key() -> dict[str, str]:
    """What a measured choice depends on: CPU model, ISA flags, torch version."""
    cpu, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:  # not Linux
        pass
    cpu = cpu or platform.processor() or platform.machine()
    isa = torch.backends.cpu.get_cpu_capability()
    return {"cpu": cpu, "isa": isa, "cpu_flags_sha1": hashlib.sha1(flags.encode()).hexdigest()[:12],
            "torch": str(torch.__version__)}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clipforge")


def cache_path(kind: str) -> Path:
    digest = hashlib.sha1(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{kind}-{digest}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("machine") == machine_key() else None


def read_or_measure(kind: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The machine's stored record ``kind``, or ``measure()`` once, published first-wins."""
    path = cache_path(kind)
    record = _read(path)
    if record is not None:
        return {**record, "cache_file": str(path)}
    mine = {"machine": machine_key(), **measure()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(mine, indent=1) + "\n")
        with contextlib.suppress(FileExistsError):  # another process published first: theirs wins
            os.link(tmp, path)
    except OSError as e:
        _warn_once(f"cannot store the measured {kind} choice in {path} ({e}); set {CACHE_ENV} to a "
                   f"writable folder, or {ENV}, to make the choice stable across processes")
        return {**mine, "cache_file": None}
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return {**(_read(path) or mine), "cache_file": str(path)}


def _best_time(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _measure_linear() -> dict[str, Any]:
    if not onednn_available():
        return {"choice": "torch", "why": "oneDNN linear unavailable"}
    x, w, b = torch.randn(512, 768), torch.randn(2304, 768), torch.randn(2304)
    t_onednn = t_torch = float("inf")
    with torch.no_grad():
        for _ in range(3):  # interleaved, best of all: a burst of load hits both
            t_onednn = min(t_onednn, _best_time(lambda: onednn_linear(x, w, b)))
            t_torch = min(t_torch, _best_time(lambda: F.linear(x, w, b)))
    return {"choice": "onednn" if t_onednn * 1.1 < t_torch else "torch", "seconds": {
        "onednn": t_onednn, "torch": t_torch}, "threads": torch.get_num_threads(),
        "why": "oneDNN kept only if >= 10% faster than torch's linear on a 512x768x2304 product"}


@functools.lru_cache(maxsize=None)
def machine_linear_choice() -> dict[str, Any]:
    """The ``auto`` linear backend of this machine (read once per process)."""
    return read_or_measure("linear", _measure_linear)


def _measure_precision() -> dict[str, Any]:
    m, k, n = 1024, 768, 3072
    out: dict[str, float] = {}
    for name, dtype in DTYPES.items():
        x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        try:
            with torch.no_grad():
                out[name] = 2 * m * k * n / _best_time(lambda: linear(x, w), reps=3) / 1e9
        except RuntimeError:  # no kernel for this dtype here
            out[name] = 0.0
    return {"gflops": out}


@functools.lru_cache(maxsize=None)
def _precision_record(backend: str) -> dict[str, Any]:
    return read_or_measure(f"precision-{backend}", _measure_precision)


def matmul_speed_by_precision() -> dict[str, float]:
    """Throughput (GFLOP/s) of a transformer-sized linear in fp32 (through :func:`linear`), bf16
    and fp16, measured once per machine and linear backend. Whether reduced precision pays
    depends on the CPU: with AVX512-BF16 bf16 is about 2x fp32; without it (or AMX) it can be
    half as fast; fp16 matmul is slow on most CPUs."""
    return dict(_precision_record(linear_backend())["gflops"])


def fastest_precision(min_gain: float = 1.3) -> str:
    """``"bf16"`` or ``"fp16"`` when its stored matmul speed is at least ``min_gain`` x fp32's,
    else ``"fp32"`` (what ``precision="auto"`` means on this machine)."""
    speed = matmul_speed_by_precision()
    best = max(("bf16", "fp16"), key=lambda p: speed[p])
    return best if speed[best] >= min_gain * speed["fp32"] else "fp32"


def backend_record() -> dict[str, Any]:
    """What this process computes with, for run folders and benchmark records."""
    choice, source = requested_backend()
    record: dict[str, Any] = {"linear": linear_backend(), "requested": choice, "source": source,
                              "machine": machine_key(), "threads": torch.get_num_threads(),
                              "deterministic": torch.are_deterministic_algorithms_enabled()}
    if choice == "auto":
        record["cache_file"] = machine_linear_choice().get("cache_file")
    return record
