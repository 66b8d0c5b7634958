"""Where a model runs and in what precision: one device spec and one precision vocabulary for every
command (training, evaluation, embedding, search, curation).

Devices: ``auto`` (CUDA if available, then Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N``,
``mps``. Under torchrun (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean this rank's own GPU,
``cuda:LOCAL_RANK``. Batches reach an accelerator through :func:`to_device` (pinned host memory,
non-blocking copy); on the CPU it is a no-op.

Precisions use open_clip's names with open_clip's meaning (``open_clip_train --precision``):

============  ==================================================  ===========================
name          weights                                             autocast
============  ==================================================  ===========================
fp32          float32                                             none
bf16 / fp16   Linear/Conv/attention/projection weights cast       none
              (LayerNorm, embeddings, logit scale stay float32;
              OpenAI's and open_clip's ``convert_weights_to_lp``)
pure_bf16,    every parameter cast                                none
pure_fp16
amp_bf16,     float32                                             bfloat16
amp_bfloat16
amp           float32                                             float16 + gradient scaler (CUDA)
int8          inference only (CPU): Transformer products by dynamic int8 quantization, the rest fp32
auto          inference: ``bf16``, ``fp16`` or ``fp32``, whichever the machine's stored matmul probe
              finds >= 1.3x faster on this CPU (``fast.fastest_precision``); fp32 on a GPU.
              training: ``amp_bf16`` where bf16 pays (that probe on a CPU; a CUDA GPU with bf16),
              else ``fp32`` (CPU) / ``amp`` (older GPU), resolved once per run and recorded
============  ==================================================  ===========================

On a CPU, ``amp_bf16`` training takes the fast layer's bf16 path (``clipforge.fast``): bf16
products, float32 master weights, LayerNorm, attention softmax, loss and temperature.

Before this vocabulary, ``clipforge train --precision bf16`` meant bfloat16 *autocast*; that run
is now spelled ``amp_bf16`` (and the old ``fp16`` autocast is ``amp``). Inference commands cast the
whole model for ``bf16``/``fp16`` (``optimize_for_inference``), which is what ``pure_*`` means;
embeddings agree with fp32 to ~1e-2 either way.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from .utils import rank_env

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_spec(spec: str) -> str:
    """``spec`` lower-cased if it is a device spec, else ``ValueError`` listing the accepted forms."""
    s = str(spec).strip().lower()
    if not _DEVICE_RE.match(s):
        raise ValueError(f"unknown device {spec!r} (expected {DEVICE_CHOICES})")
    return s


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for a spec; asking for a device that is not there is a ``ValueError``.

    ``local_rank`` defaults to ``$LOCAL_RANK`` (torchrun), so each rank of a job takes its own GPU;
    where exactly one GPU is visible (one bound per task) every rank takes it.
    """
    s = check_device_spec(spec)
    if local_rank is None:
        local_rank = rank_env().local_rank
    if s == "auto":
        s = "cuda" if torch.cuda.is_available() else ("mps" if _mps_available() else "cpu")
    if s.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but no CUDA GPU is available (use --device cpu or auto)")
        index = local_rank if s == "cuda" else int(s.split(":")[1])
        if s == "cuda" and torch.cuda.device_count() == 1:
            # A scheduler that binds one GPU per task (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES
            # per rank) shows each rank only its own GPU, as cuda:0, whatever its local rank.
            index = 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", index)
    if s == "mps" and not _mps_available():
        raise ValueError(f"device {spec!r} requested but Apple MPS is not available (use --device cpu or auto)")
    return torch.device(s)


def pin_memory_for(device: torch.device | str) -> bool:
    """Whether host batches bound for ``device`` should be pinned (only CUDA benefits)."""
    return torch.device(device).type == "cuda"


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move a host batch to ``device``: pinned + non-blocking for CUDA; unchanged if already there."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")


# --- precision ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """What a precision name does: weight dtype and scope, autocast dtype, gradient scaler."""

    name: str
    weight_dtype: torch.dtype = torch.float32
    weight_scope: str = "none"  # "none" | "matmul" (Linear/Conv/attention/projections) | "all"
    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype images are fed in (open_clip's ``get_input_dtype``)."""
        return self.weight_dtype if self.weight_scope != "none" else torch.float32


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32"),
    "bf16": Precision("bf16", torch.bfloat16, "matmul"),
    "fp16": Precision("fp16", torch.float16, "matmul"),
    "pure_bf16": Precision("pure_bf16", torch.bfloat16, "all"),
    "pure_fp16": Precision("pure_fp16", torch.float16, "all"),
    "amp_bf16": Precision("amp_bf16", autocast_dtype=torch.bfloat16),
    "amp_bfloat16": Precision("amp_bfloat16", autocast_dtype=torch.bfloat16),
    "amp": Precision("amp", autocast_dtype=torch.float16, grad_scaler=True),
}
TRAIN_PRECISIONS = tuple(PRECISIONS)
# What a training run may ask for: a concrete name, or "auto" (resolved by training.run_precision).
TRAIN_PRECISION_CHOICES = TRAIN_PRECISIONS + ("auto",)
# Inference casts weights (optimize_for_inference); "auto" measures. Autocast names are training-only.
INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16", "int8", "auto")


def get_precision(name: str) -> Precision:
    """The :class:`Precision` of a training precision name (``ValueError`` listing the names)."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r} (expected one of {', '.join(TRAIN_PRECISIONS)})") from None


def inference_precision(name: str) -> str:
    """The name ``optimize_for_inference`` takes: fp32 | bf16 | fp16 | int8 | auto."""
    if name not in INFERENCE_PRECISIONS:
        hint = " (autocast precisions are for training; inference casts the weights: use bf16 or fp16)" \
            if name in PRECISIONS else ""
        raise ValueError(f"unknown inference precision {name!r}; expected one of "
                         f"{', '.join(INFERENCE_PRECISIONS)}{hint}")
    return name.removeprefix("pure_")


def cast_weights(model: torch.nn.Module, precision: Precision | str) -> torch.nn.Module:
    """Cast ``model``'s weights as ``precision`` says (in place; returns the model)."""
    p = get_precision(precision) if isinstance(precision, str) else precision
    if p.weight_scope == "all":
        model.to(p.weight_dtype)
    elif p.weight_scope == "matmul":
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                m.to(p.weight_dtype)
            for name in ("in_proj_weight", "in_proj_bias", "text_projection", "proj"):
                t = m._parameters.get(name)
                if t is not None:
                    t.data = t.data.to(p.weight_dtype)
    return model


def autocast(precision: Precision | str, device: torch.device | str) -> ContextManager[Any]:
    """torch autocast for the ``amp*`` precisions; a null context otherwise. float16 autocast
    (``amp``) needs CUDA: on another device it is a ``ValueError`` naming the alternatives."""
    p = get_precision(precision) if isinstance(precision, str) else precision
    device = torch.device(device)
    if p.autocast_dtype is None:
        return contextlib.nullcontext()
    if p.autocast_dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"precision {p.name} (float16 autocast with a gradient scaler) needs a CUDA GPU; "
                         f"on {device.type} use amp_bf16, bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=p.autocast_dtype)


__all__ = ["DEVICE_CHOICES", "check_device_spec", "resolve_device", "pin_memory_for", "to_device", "Precision",
           "PRECISIONS", "TRAIN_PRECISIONS", "TRAIN_PRECISION_CHOICES", "INFERENCE_PRECISIONS", "get_precision", "inference_precision",
           "cast_weights", "autocast"]
