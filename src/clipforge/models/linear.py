"""Dense fp32 linear layers through oneDNN where that is measurably faster than the BLAS.

PyTorch's CPU ``F.linear`` calls MKL's sgemm. On some CPUs MKL takes a slow path (seen: AMD EPYC
with AVX-512, where it reaches about half of what oneDNN's JIT kernels do for the very same fp32
product, ~220 vs ~480 GFLOP/s on 2 cores), and matmuls are ~95% of a CLIP tower's work. PyTorch
ships oneDNN's linear as ``torch.ops.mkldnn._linear_pointwise`` (the op its compiler uses), full
fp32 precision, forward only; :func:`linear` calls it, with a backward made of the same op.

The choice is measured, never assumed: on first use in a process a probe times both on a
transformer-sized product and keeps oneDNN only if it is at least 10% faster. The environment
variable ``CLIPFORGE_LINEAR`` = ``onednn`` | ``torch`` | ``auto`` (default) overrides it.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

_ENV = "CLIPFORGE_LINEAR"


def _op():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_linear_is_faster() -> bool:
    """Whether this process should route fp32 CPU linears through oneDNN (see module doc)."""
    choice = os.environ.get(_ENV, "auto").strip().lower()
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"{_ENV} must be 'auto', 'onednn' or 'torch', got {choice!r}")
    if choice == "torch" or _op() is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(512, 768), torch.randn(2304, 768), torch.randn(2304)
        with torch.no_grad():
            if (_onednn_linear(x, w, b) - F.linear(x, w, b)).abs().max() > 1e-2:
                return False  # not the same product: never use it
            if choice == "onednn":
                return True
            return _best_time(lambda: _onednn_linear(x, w, b)) * 1.1 < _best_time(lambda: F.linear(x, w, b))
    except RuntimeError:  # the op exists but this build/CPU cannot run it
        return False


def _best_time(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class _OneDNNLinear(torch.autograd.Function):
    """``x @ w.T + b`` with forward and backward products run by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = _onednn_linear(grad, w.t().contiguous(), None)  # grad @ w
        if ctx.needs_input_grad[1]:
            gw = _onednn_linear(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # grad^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def _exporting() -> bool:
    """Tracing for ONNX / TorchScript records standard ops only, and ``torch.compile`` does its
    own weight packing (its oneDNN lowering needs frozen weights): both get plain ``F.linear``."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


def use_packed() -> bool:
    """Whether prepacked inference weights may be used now: no autograd and not being traced."""
    return not torch.is_grad_enabled() and not _exporting()


def _autocast() -> bool:
    """Under CPU autocast F.linear runs in reduced precision; leave that to PyTorch."""
    return torch.is_autocast_enabled("cpu")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 CPU tensors when the probe found it faster."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and not _exporting() and not _autocast()
            and onednn_linear_is_faster()):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, bias)
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor, batch_hint: int = 1024) -> torch.Tensor:
    """A copy of ``weight`` in oneDNN's blocked layout, for :func:`packed_linear` (inference:
    the layout is reordered once instead of on every call)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  activation: str = "none") -> torch.Tensor:
    """``activation(x @ W.T + b)`` with a weight from :func:`pack_weight`; ``activation`` is
    ``"none"``, ``"gelu"`` (exact, erf) or ``"swish"`` (x * sigmoid(x)), fused into the product."""
    algorithm = "none" if activation == "gelu" else ""
    b = bias.detach() if bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, activation, [], algorithm)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def matmul_speed_by_precision() -> dict[str, float]:
    """Measured CPU throughput (GFLOP/s) of a transformer-sized linear in fp32 (through
    :func:`linear`), bf16 and fp16. Whether reduced precision pays depends on the CPU: with
    AVX512-BF16 bf16 is about 2x fp32; without it (or AMX) it can be half as fast; fp16 matmul
    is slow on most CPUs. Never assumed: measured once per process."""
    m, k, n = 1024, 768, 3072
    out: dict[str, float] = {}
    for name, dtype in _DTYPES.items():
        x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        try:
            with torch.no_grad():
                out[name] = 2 * m * k * n / _best_time(lambda: linear(x, w), reps=3) / 1e9
        except RuntimeError:  # no kernel for this dtype here
            out[name] = 0.0
    return out


def fastest_precision(min_gain: float = 1.3) -> str:
    """``"bf16"`` or ``"fp16"`` when its measured matmul speed is at least ``min_gain`` x fp32's,
    else ``"fp32"``."""
    speed = matmul_speed_by_precision()
    best = max(("bf16", "fp16"), key=lambda p: speed[p])
    return best if speed[best] >= min_gain * speed["fp32"] else "fp32"


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter`` count the oneDNN product like ``F.linear``."""
    op = _op()
    if op is None:
        return
    try:
        from torch.utils.flop_counter import register_flop_formula

        @register_flop_formula(op)
        def _flops(x_shape, w_shape, *args, **kwargs) -> int:  # noqa: ANN001
            m = 1
            for d in x_shape[:-1]:
                m *= d
            return 2 * m * w_shape[0] * x_shape[-1]
    except Exception:  # an older/newer flop_counter API: counting is a convenience only
        pass


_register_flop_formula()
