"""oneDNN's fp32 linear, with a backward made of the same op, and prepacked inference weights.

PyTorch's CPU ``F.linear`` calls MKL's sgemm. On some CPUs MKL takes a slow path (seen: AMD EPYC
with AVX-512, where it reaches about half of what oneDNN's JIT kernels do for the very same fp32
product, ~220 vs ~480 GFLOP/s on 2 cores), and matmuls are ~95% of a CLIP tower's work. PyTorch
ships oneDNN's linear as ``torch.ops.mkldnn._linear_pointwise`` (the op its compiler uses), full
fp32 precision, forward only. This module holds the kernels; whether they are used is decided
once per machine in :mod:`clipforge.fast.backend`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _op():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` by oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build and CPU run oneDNN's linear and it computes the same product as
    ``F.linear`` (a correctness check, no timing)."""
    if _op() is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(64, 96, generator=g), torch.randn(80, 96, generator=g),
                   torch.randn(80, generator=g))
        with torch.no_grad():
            return bool((onednn_linear(x, w, b) - F.linear(x, w, b)).abs().max() <= 1e-3)
    except RuntimeError:  # the op exists but this build/CPU cannot run it
        return False


class OneDNNLinear(torch.autograd.Function):
    """``x @ w.T + b`` with forward and backward products run by oneDNN (training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(grad, w.t().contiguous(), None)  # grad @ w
        if ctx.needs_input_grad[1]:
            gw = onednn_linear(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # grad^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


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


def int8_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """``weight`` quantized to int8 per output row (symmetric, scale = max|w| / 127) and prepacked
    with ``bias`` for torch's dynamic quantized linear (:func:`int8_linear`)."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
    with warnings.catch_warnings():  # torch marks its quantized tensors deprecated (torchao succeeds them)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        q = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float().contiguous())


def int8_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """``x @ W.T + b`` with ``W`` from :func:`int8_weight` and ``x`` quantized per call (dynamic
    quantization: activations to 8 bits with a range taken from this call's ``x``, int32 accumulation,
    float32 output). ``reduce_range``: 7-bit activations, the setting that cannot overflow the
    16-bit intermediate sums of x86 int8 kernels without VNNI."""
    shape = x.shape
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), packed, True)
    return y.view(*shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=None)
def int8_available() -> bool:
    """Whether this torch build has a quantized CPU engine that runs :func:`int8_linear` and gets
    the product right (within int8 rounding; no timing)."""
    if "none" == torch.backends.quantized.engine or not torch.backends.quantized.supported_engines:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(16, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
        with torch.no_grad():
            err = (int8_linear(x, int8_weight(w, b)) - F.linear(x, w, b)).abs().max()
            return bool(err <= 0.05 * F.linear(x, w, b).abs().max())
    except (RuntimeError, AttributeError):
        return False


PackKey = tuple[tuple[int, int, torch.dtype, torch.device], ...]


def source_key(*tensors: torch.Tensor | None) -> PackKey:
    """What a packed copy was made from: each tensor's storage, in-place version and dtype. Any
    change to the weights (an optimiser step, ``load_state_dict``, ``.to()``) changes the key."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors if t is not None)


def cached_pack(owner: torch.nn.Module, name: str, sources: tuple[torch.Tensor | None, ...],
                make: Callable[[], Any]) -> Any:
    """``make()`` (packed weights made from ``sources``), cached on ``owner`` under ``name`` and
    made again whenever a source tensor has changed since: a packed copy is never stale."""
    cache = owner.__dict__.get("packed")
    if cache is None:
        cache = owner.__dict__["packed"] = {}
    key = source_key(*sources)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, make())
        cache[name] = hit
    return hit[1]


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
