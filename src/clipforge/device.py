"""Where a model runs: one device spec for every command (training, evaluation, embedding, search,
curation).

Devices: ``auto`` (CUDA if available, then Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N``,
``mps``. Under torchrun (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean this rank's own GPU,
``cuda:LOCAL_RANK``. Batches reach an accelerator through :func:`to_device` (pinned host memory,
non-blocking copy); on the CPU it is a no-op.

Precision names, their meaning, dtypes, autocast and casting live in :mod:`clipforge.precision`
(the old spellings here, ``clipforge.device.get_precision`` and kin, still work and warn once).
"""

from __future__ import annotations

import re

import torch

from .utils import moved, rank_env

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


_MOVED_TO_PRECISION = ("Precision", "PRECISIONS", "TRAIN_PRECISIONS", "TRAIN_PRECISION_CHOICES", "INFERENCE_PRECISIONS",
                       "get_precision", "inference_precision", "cast_weights", "autocast")


def __getattr__(name: str):
    if name in _MOVED_TO_PRECISION:  # precision names moved to clipforge.precision (device.py: devices only)
        return moved(f"clipforge.device.{name}", "clipforge.precision", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEVICE_CHOICES", "check_device_spec", "resolve_device", "pin_memory_for", "to_device"]
