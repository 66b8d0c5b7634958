"""Convolutions with their pointwise epilogue fused, through oneDNN (inference only).

After BatchNorm is folded into the convolutions (``inference.fold_batchnorm``) a ResNet
bottleneck is conv+ReLU, conv+ReLU, pool, conv + residual add + ReLU. PyTorch ships oneDNN's
fused forms as ``torch.ops.mkldnn._convolution_pointwise`` (the ops its compiler emits): the
ReLU and the residual add happen while the output tile is still in registers instead of as
extra passes over the activation map. Same arithmetic, same results; no autograd.
"""

from __future__ import annotations

import torch
from torch import nn


def fused_conv_available() -> bool:
    return (getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None) is not None
            and torch.backends.mkldnn.is_available())


def _args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups  # type: ignore[arg-type]


def conv_act(x: torch.Tensor, conv: nn.Conv2d, activation: str = "none") -> torch.Tensor:
    """``activation(conv(x))`` with ``activation`` in ``"none"``, ``"relu"``."""
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *_args(conv), activation, [], "")


def conv_add_relu(x: torch.Tensor, residual: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``relu(conv(x) + residual)``: the end of a residual block in one op."""
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, conv.weight, conv.bias, *_args(conv),
                                                          "add", None, "relu", [], "")
