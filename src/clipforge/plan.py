"""Compute and memory planning for a contrastive training run, before any hardware is booked.

FLOPs are *counted*, not estimated: the plain :class:`~clipforge.models.CLIP` (the reference
computation, as OpenAI's released code runs it: every Transformer block over every token, the text
over its full 77-token context) is built on the ``meta`` device (shapes only, no memory, no
arithmetic) and one training step (image tower, text tower, forward and backward) runs under
``torch.utils.flop_counter.FlopCounterMode`` at a tiny batch, divided by the batch. That is the
basis for comparing with the CLIP paper, whose runs computed exactly this. The contrastive loss is
counted separately at the real global batch ``N``, because its ``N x N`` logits make its cost per
sample grow with ``N``. Convention: one multiply-accumulate = 2 FLOPs; only matrix products and
convolutions are counted (elementwise ops, norms and softmax are not), as in MFU accounting.

A second figure counts what clipforge's own training computes by default (``clipforge.fast``,
``TrainConfig.fast_paths``): the last block of each Transformer tower run for the pooled token
only, text still at the full context. Its padding trim (after the batch's longest caption) needs
the ids' values, which meta tensors lack, so real captions cost less still; that saving depends on
the data and is not counted. Days are planned from the plain count.

Memory is *measured* on the plain model the same way: every tensor autograd saves for the backward
pass is caught by ``saved_tensors_hooks`` (each storage counted once, parameters excluded), at two
batch sizes, giving activation bytes per sample (clipforge's fast path keeps somewhat less: its last
block saves the pooled rows only). Attention is measured as the fused GPU kernels run it
(``_scaled_dot_product_efficient_attention``: queries, keys, values, output and log-sum-exp; no
``L x L`` matrix), not as the CPU's math fallback. Weights, gradients and AdamW's two moments are
the parameter bytes in the precision's weight dtype (:mod:`clipforge.precision`).

Time = total model FLOPs / (devices x peak FLOP/s x MFU). MFU (model-FLOP utilisation) counts
model FLOPs only, so activation recomputation under gradient checkpointing shows up as a lower
achievable MFU, not as extra FLOPs (the recompute is reported on its own line).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from . import precision as _precision
from . import fast as _fast
from .config import CLIPConfig, get_model_config
from .fast.text import FastTextTransformer
from .models import CLIP
from .models.layers import ResidualAttentionBlock
from .models.vision_resnet import Bottleneck
from .training import contrastive_loss

GB = 1e9
SECONDS_PER_DAY = 86400.0


# --- accelerators -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    """Dense peak throughput (TFLOP/s) per compute dtype and memory (GB = 1e9 bytes) of one device."""

    name: str
    memory_gb: float
    peak_tflops: dict[str, float]
    source: str = "user-supplied"

    def peak(self, compute: str) -> float:
        if compute not in self.peak_tflops:
            raise ValueError(f"accelerator {self.name} has no {compute} peak (known: "
                             f"{', '.join(self.peak_tflops)}); pass --peak-tflops")
        return self.peak_tflops[compute]


_V100 = ("NVIDIA Tesla V100 datasheet (SXM2): 15.7 TFLOPS single precision, 125 TFLOPS tensor "
         "(fp16 in, fp32 accumulate), 16 or 32 GB HBM2; no bf16/tf32")
_A100 = ("NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5 TFLOPS, TF32 156, BF16/FP16 312 (dense; "
         "the 312/624 figures are with sparsity), 40 GB HBM2 or 80 GB HBM2e")
_H100 = ("NVIDIA H100 Tensor Core GPU datasheet (SXM): FP32 67 TFLOPS, TF32 989 / BF16 1,979 / "
         "FP16 1,979 with sparsity, i.e. 494 / 989 / 989 dense; 80 GB HBM3")

ACCELERATORS: dict[str, Accelerator] = {
    "V100": Accelerator("V100-SXM2-32GB", 32, {"fp32": 15.7, "fp16": 125.0}, _V100),
    "V100-16GB": Accelerator("V100-SXM2-16GB", 16, {"fp32": 15.7, "fp16": 125.0}, _V100),
    "A100": Accelerator("A100-80GB", 80, {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, _A100),
    "A100-40GB": Accelerator("A100-40GB", 40, {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, _A100),
    "H100": Accelerator("H100-SXM-80GB", 80, {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0}, _H100),
}


def get_accelerator(name: str) -> Accelerator:
    """A named preset (case-insensitive), or ``ValueError`` listing them."""
    for key, acc in ACCELERATORS.items():
        if key.lower() == name.strip().lower():
            return acc
    raise ValueError(f"unknown accelerator {name!r}; presets: {', '.join(ACCELERATORS)} "
                     f"(or give --peak-tflops and --memory-gb)")


def compute_dtype(precision: str, tf32: bool = False) -> str:
    """The dtype the matrix products of ``precision`` run in: its peak FLOP/s applies."""
    p = _precision.get_precision(precision)
    dtype = p.autocast_dtype or (p.weight_dtype if p.weight_scope != "none" else None)
    if dtype is None:
        return "tf32" if tf32 else "fp32"
    return next(name for name, d in _precision.DTYPES.items() if d == dtype)


# --- building the model on meta -----------------------------------------------------------------

def resolve_config(model: str | CLIPConfig) -> CLIPConfig:
    """A zoo name, a CLIPConfig JSON file, or a config."""
    if isinstance(model, CLIPConfig):
        return model
    if str(model).endswith(".json"):
        return CLIPConfig.from_json(model)
    return get_model_config(str(model))


def meta_model(config: CLIPConfig, precision: str = "fp32", grad_checkpointing: bool = False,
               emulate_autocast: bool = True, fast: bool = False) -> CLIP:
    """The real model on the meta device, in training mode, weights cast as ``precision`` says
    (``fast``: with clipforge's fast training paths, ``clipforge.fast.enable``).
    The autocast precisions (``amp*``) keep float32 weights; with ``emulate_autocast`` their
    matmuls are modelled by casting the matmul weights to the autocast dtype instead (meta tensors
    cannot autocast), which gives the activations autocast produces, to within the float32
    outputs of its norms."""
    p = _precision.get_precision(precision)
    with torch.device("meta"):
        model = CLIP(config)
    if p.autocast_dtype is not None and emulate_autocast:
        p = _precision.Precision(p.name, p.autocast_dtype, "matmul")
    _precision.cast_weights(model, p)
    model.set_grad_checkpointing(grad_checkpointing)
    if fast:
        _fast.enable(model)
    return model.train()


def _inputs(config: CLIPConfig, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    s, ctx = config.vision.image_size, config.text.context_length
    images = torch.empty(batch, 3, s, s, device="meta", dtype=dtype)
    ids = torch.empty(batch, ctx, device="meta", dtype=torch.long)
    return images, ids


def _image_features(model: CLIP, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.visual(images).float(), dim=-1)


def _text_features(model: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """The text half of :class:`~clipforge.training.step.FeatureModel`, over the full context. The
    fast tower's ``forward`` first trims padding after the batch's longest caption, which needs the
    ids' values (meta tensors have none), and in training packs the real tokens of shorter
    captions; at full context both are no-ops, so its pooled forward is exactly what runs for a
    batch whose captions fill the context: an upper bound for real captions."""
    text = model.text
    out = text.forward_pooled(ids) if isinstance(text, FastTextTransformer) else text(ids)
    return F.normalize(out.float(), dim=-1)


def _features(model: CLIP, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`~clipforge.training.step.FeatureModel` computes (text over its full context)."""
    return _image_features(model, images), _text_features(model, ids)


# --- FLOPs --------------------------------------------------------------------------------------

@dataclass
class ModelFlops:
    """FLOPs per sample of the two towers (forward, backward) and of recompute under checkpointing."""

    image_forward: float
    text_forward: float
    backward: float
    recompute: float = 0.0

    @property
    def forward(self) -> float:
        return self.image_forward + self.text_forward

    @property
    def train(self) -> float:
        return self.forward + self.backward


def _count(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _step_flops(model: CLIP, batch: int, precision: str, backward: bool = True) -> tuple[float, float, float]:
    images, ids = _inputs(model.config, batch, _precision.get_precision(precision).input_dtype)
    out: dict[str, torch.Tensor] = {}
    f_img = _count(lambda: out.__setitem__("img", _image_features(model, images)))
    f_txt = _count(lambda: out.__setitem__("txt", _text_features(model, ids)))
    # The backward of a sum is elementwise (not counted): what remains is the towers' backward.
    f_bwd = _count(lambda: (out["img"].sum() + out["txt"].sum()).backward()) if backward else 0.0
    return f_img, f_txt, f_bwd


def count_model_flops(config: CLIPConfig, precision: str = "fp32", batch: int = 2,
                      backward: bool = True, fast: bool = False) -> ModelFlops:
    """Per-sample FLOPs of one training step of both towers of the plain model (every token, full
    context), counted on the meta device at a tiny ``batch`` and divided by it (every counted
    product is linear in the batch, with no per-batch constant; tests/test_plan.py holds this
    against a direct count at another batch). Recompute is the extra backward count with gradient
    checkpointing on. ``backward=False`` counts the forward pass only (backward and recompute left
    0). ``fast``: clipforge's fast training path instead (pooled last blocks, full context)."""
    model = meta_model(config, precision, fast=fast)
    img, txt, bwd = (f / batch for f in _step_flops(model, batch, precision, backward))
    if not backward:
        return ModelFlops(img, txt, 0.0, 0.0)
    model.set_grad_checkpointing(True)
    recompute = _step_flops(model, batch, precision)[2] / batch - bwd
    return ModelFlops(img, txt, bwd, recompute)


def _rank_loss(b: int, n: int, dim: int, local_loss: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One rank's contrastive loss over a global batch ``n`` on meta tensors, as
    :class:`~clipforge.training.loss.ClipLoss` computes it (``b`` local rows; with ``local_loss``
    only this rank's ``[b, n]`` rows of each direction). Returns the loss and its leaf features."""
    leaves = [torch.empty(n, dim, device="meta", requires_grad=True) for _ in range(2)]
    scale = torch.empty((), device="meta", requires_grad=True)
    all_img, all_txt = leaves
    if not local_loss or b >= n:
        return contrastive_loss(all_img, all_txt, scale), leaves + [scale]
    img, txt = all_img[:b], all_txt[:b]
    labels = torch.empty(b, device="meta", dtype=torch.long)
    loss = (F.cross_entropy(scale * img @ all_txt.t(), labels)
            + F.cross_entropy(scale * txt @ all_img.t(), labels)) / 2
    return loss, leaves + [scale]


def count_loss_flops(local_batch: int, global_batch: int, embed_dim: int, local_loss: bool = False) -> float:
    """FLOPs of one rank's contrastive loss (forward + backward) for one optimiser step: with the
    global loss every rank builds the whole ``N x N`` logits; with ``local_loss`` its ``b x N`` rows."""
    holder: dict[str, torch.Tensor] = {}
    fwd = _count(lambda: holder.__setitem__("loss", _rank_loss(local_batch, global_batch, embed_dim, local_loss)[0]))
    bwd = _count(lambda: holder["loss"].backward())
    return fwd + bwd


# --- memory -------------------------------------------------------------------------------------

class _FusedAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to the memory-efficient fused kernel, whose saved
    tensors (q, k, v, output, log-sum-exp) are what a GPU keeps; the meta/CPU default is the math
    path, which would also save the ``L x L`` attention probabilities."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            q, k, v = args
            causal = bool(kwargs.get("is_causal", False))
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def _saved_bytes(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Collects ``{storage id: bytes}`` of every tensor autograd saves (storages in ``exclude``,
    i.e. parameters, skipped). The tensors are kept alive so storage ids stay unique."""
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s._cdata
        if key not in exclude:
            seen[key] = s.nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


# The units gradient checkpointing wraps (one is recomputed at a time in the backward pass).
_CHECKPOINTED_BLOCKS = (ResidualAttentionBlock, Bottleneck)


def measure_activation_bytes(config: CLIPConfig, batch: int, precision: str = "fp32",
                             grad_checkpointing: bool = False, model: CLIP | None = None) -> tuple[int, int]:
    """``(bytes saved for backward by the two towers at this batch, largest bytes saved inside one
    checkpointable block)``. With checkpointing the first number is what stays alive through the
    forward pass; the second is recreated while that block is recomputed in the backward pass.
    ``model``: the :func:`meta_model` of ``config`` and ``precision``, to reuse one."""
    model = model or meta_model(config, precision)
    model.set_grad_checkpointing(grad_checkpointing)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    images, ids = _inputs(config, batch, _precision.get_precision(precision).input_dtype)
    block_bytes: list[int] = []
    hooks = []
    with _saved_bytes(params) as seen, _FusedAttention():
        if not grad_checkpointing:
            start: list[int] = []
            for m in model.modules():
                if isinstance(m, _CHECKPOINTED_BLOCKS):
                    hooks.append(m.register_forward_pre_hook(lambda *_: start.append(sum(seen.values()))))
                    hooks.append(m.register_forward_hook(
                        lambda *_: block_bytes.append(sum(seen.values()) - start.pop())))
        try:
            _features(model, images, ids)
        finally:
            for h in hooks:
                h.remove()
        total = sum(seen.values())
    return total, max(block_bytes, default=0)


def measure_loss_bytes(local_batch: int, global_batch: int, embed_dim: int, local_loss: bool = False) -> int:
    """Bytes one rank's loss keeps for backward (gathered features, logits, log-softmax outputs),
    plus its largest saved tensor once more for that tensor's gradient in the backward pass."""
    with _saved_bytes(set()) as seen:
        _rank_loss(local_batch, global_batch, embed_dim, local_loss)
        total = sum(seen.values())
        largest = max(seen.values(), default=0)
    return total + largest


@dataclass
class MemoryModel:
    """Per-device bytes of a training step: fixed parts plus activations linear in the micro-batch
    (``act_base + act_per_sample * b``) and the loss at the global batch."""

    weights: int
    gradients: int
    optimizer: int
    autocast_cache: int
    act_per_sample: float
    act_base: float
    act_per_sample_ckpt: float
    act_base_ckpt: float
    ckpt_block_per_sample: float
    embed_dim: int
    reserve: int
    local_loss: bool = False

    def activations(self, micro_batch: int, grad_checkpointing: bool) -> float:
        if grad_checkpointing:
            return self.act_base_ckpt + (self.act_per_sample_ckpt + self.ckpt_block_per_sample) * micro_batch
        return self.act_base + self.act_per_sample * micro_batch

    def loss(self, local_batch: int, global_batch: int) -> int:
        return measure_loss_bytes(local_batch, global_batch, self.embed_dim, self.local_loss)

    def breakdown(self, micro_batch: int, local_batch: int, global_batch: int,
                  grad_checkpointing: bool) -> dict[str, float]:
        parts = {"weights": self.weights, "gradients": self.gradients, "adamw_states": self.optimizer,
                 "autocast_weight_copies": self.autocast_cache,
                 "activations": self.activations(micro_batch, grad_checkpointing),
                 "loss_logits_and_gathered_features": self.loss(local_batch, global_batch),
                 "reserve": self.reserve}
        parts["total"] = sum(parts.values())
        return {k: float(v) for k, v in parts.items()}

    def total(self, micro_batch: int, local_batch: int, global_batch: int, grad_checkpointing: bool) -> float:
        return self.breakdown(micro_batch, local_batch, global_batch, grad_checkpointing)["total"]

    def largest_micro_batch(self, local_batch: int, global_batch: int, grad_checkpointing: bool,
                            capacity: float) -> int:
        """The largest micro-batch ``b <= local_batch`` whose step fits in ``capacity`` bytes (0 if
        not even one sample fits). Total memory only grows with ``b``, so a bisection is exact."""
        fits = lambda b: self.total(b, local_batch, global_batch, grad_checkpointing) <= capacity
        if not fits(1):
            return 0
        lo, hi = 1, local_batch
        if fits(hi):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def build_memory_model(config: CLIPConfig, precision: str = "fp32", local_loss: bool = False,
                       reserve_gb: float = 2.0, batches: tuple[int, int] = (2, 3)) -> MemoryModel:
    """Measure everything :class:`MemoryModel` needs on the meta device."""
    p = _precision.get_precision(precision)
    model = meta_model(config, precision, emulate_autocast=False)
    trainable = [q for q in model.parameters() if q.requires_grad]
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    grads = sum(q.numel() * q.element_size() for q in trainable)
    cache = 0
    if p.autocast_dtype is not None:  # autocast keeps a low-precision copy of every matmul weight
        cast = meta_model(config, precision)
        cache = sum(q.numel() * q.element_size() for q in cast.parameters() if q.dtype == p.autocast_dtype)
    b1, b2 = batches
    m = meta_model(config, precision)
    a1, _ = measure_activation_bytes(config, b1, precision, False, m)
    a2, blk = measure_activation_bytes(config, b2, precision, False, m)
    c1, _ = measure_activation_bytes(config, b1, precision, True, m)
    c2, _ = measure_activation_bytes(config, b2, precision, True, m)
    per, per_c = (a2 - a1) / (b2 - b1), (c2 - c1) / (b2 - b1)
    return MemoryModel(weights=weights, gradients=grads, optimizer=2 * grads, autocast_cache=cache,
                       act_per_sample=per, act_base=a1 - per * b1, act_per_sample_ckpt=per_c,
                       act_base_ckpt=c1 - per_c * b1, ckpt_block_per_sample=blk / b2,
                       embed_dim=config.embed_dim, reserve=int(reserve_gb * GB), local_loss=local_loss)


# --- the plan -----------------------------------------------------------------------------------

@dataclass
class PlanConfig:
    """A training run to plan. ``samples`` is the dataset size (pairs), ``global_batch`` pairs per
    optimiser step over all ``devices``; ``mfu`` the model-FLOP utilisation assumed for the time."""

    model: str = "ViT-B/32"
    samples: int = 400_000_000
    epochs: float = 32
    global_batch: int = 32768
    precision: str = "amp"
    accelerator: str = "V100"
    devices: int = 256
    mfu: float = 0.3
    peak_tflops: float | None = None
    memory_gb: float | None = None
    tf32: bool = False
    local_loss: bool = False
    reserve_gb: float = 2.0

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"plan: {key}: {msg} (got {getattr(self, key)!r})")

        need(self.samples >= 1, "samples", "must be >= 1")
        need(self.epochs > 0, "epochs", "must be > 0")
        need(self.global_batch >= 1, "global_batch", "must be >= 1")
        need(self.devices >= 1, "devices", "must be >= 1")
        need(self.global_batch >= self.devices, "global_batch", f"must be >= devices ({self.devices})")
        need(0 < self.mfu <= 1, "mfu", "must be in (0, 1]")
        need(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be > 0")
        need(self.memory_gb is None or self.memory_gb > 0, "memory_gb", "must be > 0")
        need(self.reserve_gb >= 0, "reserve_gb", "must be >= 0")
        _precision.get_precision(self.precision)

    def accelerator_spec(self) -> Accelerator:
        """The preset, with ``peak_tflops`` / ``memory_gb`` overriding it (``custom``: both needed)."""
        dtype = compute_dtype(self.precision, self.tf32)
        if self.accelerator.lower() == "custom":
            if self.peak_tflops is None or self.memory_gb is None:
                raise ValueError("plan: accelerator custom needs --peak-tflops and --memory-gb")
            return Accelerator("custom", self.memory_gb, {dtype: self.peak_tflops})
        acc = get_accelerator(self.accelerator)
        peaks = dict(acc.peak_tflops)
        if self.peak_tflops is not None:
            peaks[dtype] = self.peak_tflops
        return Accelerator(acc.name, self.memory_gb or acc.memory_gb, peaks,
                           acc.source if self.peak_tflops is None and self.memory_gb is None else
                           acc.source + " (overridden by the user)")


def _local_batch(cfg: PlanConfig) -> int:
    return math.ceil(cfg.global_batch / cfg.devices)


def make_plan(cfg: PlanConfig, flops: ModelFlops | None = None, memory: MemoryModel | None = None,
              fast_flops: ModelFlops | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready record (``flops`` of the plain model, ``fast_flops`` of the fast
    training path and ``memory`` may be passed in to reuse a count). Time comes from ``flops``."""
    config = resolve_config(cfg.model)
    acc = cfg.accelerator_spec()
    dtype = compute_dtype(cfg.precision, cfg.tf32)
    peak = acc.peak(dtype) * 1e12
    flops = flops or count_model_flops(config, cfg.precision)
    fast = fast_flops or count_model_flops(config, cfg.precision, fast=True)
    memory = memory or build_memory_model(config, cfg.precision, cfg.local_loss, cfg.reserve_gb)
    n, w = cfg.global_batch, cfg.devices
    b_local = _local_batch(cfg)
    loss_rank_step = count_loss_flops(b_local, n, config.embed_dim, cfg.local_loss)
    loss_per_sample = loss_rank_step * w / n  # every rank's loss work, shared over the step's samples
    per_sample = flops.train + loss_per_sample
    fast_per_sample = fast.train + loss_per_sample
    seen = cfg.samples * cfg.epochs
    steps = math.ceil(seen / n)
    total = per_sample * seen
    seconds = total / (w * peak * cfg.mfu)
    capacity = acc.memory_gb * GB
    mem = {}
    for ckpt in (False, True):
        key = "with_checkpointing" if ckpt else "without_checkpointing"
        bd = memory.breakdown(b_local, b_local, n, ckpt)
        largest = memory.largest_micro_batch(b_local, n, ckpt, capacity)
        mem[key] = {"bytes": bd, "fits": bd["total"] <= capacity, "largest_micro_batch": largest,
                    "accum_steps_needed": math.ceil(b_local / largest) if largest else None}
    return {
        "model": config.name or str(cfg.model),
        "inputs": {**asdict(cfg), "compute_dtype": dtype},
        "accelerator": {"name": acc.name, "peak_tflops": acc.peak(dtype), "memory_gb": acc.memory_gb,
                        "source": acc.source},
        "flops_per_sample": {
            "image_forward": flops.image_forward, "text_forward": flops.text_forward,
            "backward": flops.backward, "loss_fwd_bwd": loss_per_sample, "total": per_sample,
            "recompute_with_checkpointing": flops.recompute,
            "convention": "2 FLOPs per multiply-accumulate; matmuls and convolutions only; plain model "
                          "(OpenAI's computation: every token in every block, text at its full context)"},
        "fast_path_flops_per_sample": {
            "image_forward": fast.image_forward, "text_forward": fast.text_forward, "backward": fast.backward,
            "loss_fwd_bwd": loss_per_sample, "total": fast_per_sample,
            "what": "clipforge's default training path (clipforge.fast): last block of each Transformer tower for "
                    "the pooled token only, text at full context (its data-dependent padding trim not counted)"},
        "local_batch": b_local,
        "steps": steps,
        "samples_seen": seen,
        "total_flops": total,
        "fast_path_total_flops": fast_per_sample * seen,
        "time": {"seconds": seconds, "days": seconds / SECONDS_PER_DAY, "mfu": cfg.mfu,
                 "device_days": seconds * w / SECONDS_PER_DAY},
        "memory_per_device": mem,
    }


# --- the paper check ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PaperRun:
    """A training run reported in Radford et al. 2021 (section 2.5): 32 epochs over 400M pairs at
    batch 32,768 in mixed precision on V100s."""

    model: str
    devices: int
    days: float


PAPER_RUNS = (PaperRun("RN50x64", 592, 18.0), PaperRun("ViT-L/14", 256, 12.0))
# Section 2.5: mixed precision, gradient checkpointing (the memory table shows both ways), and "the calculation of embedding
# similarities was also sharded with individual GPUs computing only the subset of the pairwise
# similarities necessary for their local batch of embeddings" (clipforge's --local-loss).
PAPER_SETTINGS = {"samples": 400_000_000, "epochs": 32, "global_batch": 32768, "precision": "amp",
                  "accelerator": "V100", "local_loss": True}


def paper_check(mfu: float) -> list[dict[str, Any]]:
    """The planner's time for each paper run at ``mfu``, the ratio to the reported days, and the MFU
    that would reproduce the reported days exactly."""
    rows = []
    for run in PAPER_RUNS:
        plan = make_plan(PlanConfig(model=run.model, devices=run.devices, mfu=mfu, **PAPER_SETTINGS))
        days = plan["time"]["days"]
        rows.append({"model": run.model, "devices": run.devices, "paper_days": run.days,
                     "flops_per_sample": plan["flops_per_sample"]["total"], "total_flops": plan["total_flops"],
                     "fast_path_flops_per_sample": plan["fast_path_flops_per_sample"]["total"],
                     "planned_days": days, "ratio": days / run.days, "implied_mfu": mfu * days / run.days,
                     "plan": plan})
    return rows


__all__ = [
    "ACCELERATORS",
    "PAPER_RUNS",
    "PAPER_SETTINGS",
    "Accelerator",
    "MemoryModel",
    "ModelFlops",
    "PlanConfig",
    "build_memory_model",
    "compute_dtype",
    "count_loss_flops",
    "count_model_flops",
    "get_accelerator",
    "make_plan",
    "measure_activation_bytes",
    "measure_loss_bytes",
    "meta_model",
    "paper_check",
    "resolve_config",
]
