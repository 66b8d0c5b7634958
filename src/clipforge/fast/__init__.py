"""Fast paths, as a layer over the plain model (``clipforge.models``, the reference computation).

- ``enable(model)``: fast subclasses swapped in, same Parameters and state_dict (training uses it):
  linears through the machine's backend (oneDNN with its own backward, or torch's), the last
  Transformer block run for the pooled rows only, text padding after the last end-of-text trimmed;
  without gradients also text length buckets, a shared prompt prefix computed once, ViT chunks.
- ``optimize_for_inference(model, precision=...)``: ``enable`` + frozen weights packed in oneDNN's
  layout with the MLP activation fused, ResNets with BatchNorm folded and fused convolutions.
- ``set_backend`` / ``CLIPFORGE_LINEAR`` / ``backend_record``: which linear kernel runs, chosen once
  per machine (``fast.backend``), never by per-process timing.

tests/models/test_fast_paths.py holds every path to 1e-4 of the plain model, gradients included.
"""

from __future__ import annotations

from .apply import disable, enable, is_enabled, optimize_for_inference
from .backend import (backend_record, fastest_precision, linear_backend, matmul_speed_by_precision,
                      set_backend, using_backend)
from .resnet import fold_batchnorm
from .transformer import computes_int8

__all__ = ["enable", "disable", "is_enabled", "optimize_for_inference", "set_backend", "using_backend",
           "linear_backend", "backend_record", "fastest_precision", "matmul_speed_by_precision",
           "fold_batchnorm", "computes_int8"]
