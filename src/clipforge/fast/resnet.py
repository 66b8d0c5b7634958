"""The fast ResNet image tower for inference: BatchNorm folded into the convolutions and convolutions with their pointwise
epilogue fused.

After folding, a bottleneck is conv+ReLU, conv+ReLU, pool, conv + residual add + ReLU. PyTorch
ships oneDNN's fused forms as ``torch.ops.mkldnn._convolution_pointwise`` (the ops its compiler
emits): the ReLU and the residual add happen while the output tile is still in registers instead
of as extra passes over the activation map. Same arithmetic, no autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models.vision_resnet import Bottleneck, ModifiedResNet
from .backend import use_packed
from .swap import swap_class


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


def _bottleneck_fused(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """A bottleneck with BatchNorm folded away: three oneDNN ops with fused ReLU / residual add."""
    out = conv_act(conv_act(x, block.conv1, "relu"), block.conv2, "relu")
    identity = x if block.downsample is None else conv_act(block.downsample[0](x), block.downsample[1])
    return conv_add_relu(block.avgpool(out), identity, block.conv3)


class FoldedResNet(ModifiedResNet):
    """A ResNet tower whose BatchNorms were folded into its convolutions (``fold_batchnorm``):
    different parameters (convs gain biases, statistics gone), so inference only."""

    inference_only = True  # save_model refuses a model holding such a module
    fused = False  # fused oneDNN convolutions (set by optimize_for_inference when every pair folded)
    # Fused calls run in chunks of at most this many pixels.
    inference_chunk_pixels: int = 16 * 224 * 224

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fused and use_packed() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.conv1.weight.dtype == torch.float32):
            self._check(x)
            chunk = max(1, self.inference_chunk_pixels // (x.shape[-1] * x.shape[-2]))
            return torch.cat([self._forward_fused(part) for part in x.split(chunk)])
        return super().forward(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = conv_act(x, conv, "relu")
        x = self.avgpool(x)
        for stage in self._stages():
            for block in stage:
                x = _bottleneck_fused(block, x)
        return self.attnpool(x)


def conv_bn_pairs(visual: ModifiedResNet) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv name, bn name)`` for every BatchNorm applied straight to a conv's output."""
    pairs: list[tuple[nn.Module, str, str]] = [(visual, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    for stage in visual._stages():
        for block in stage:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    return pairs


def fold_batchnorm(visual: nn.Module) -> int:
    """Fold each eval-mode BatchNorm that acts straight on a conv's output into the conv's weight
    and bias; the BatchNorm becomes ``Identity`` and the tower a :class:`FoldedResNet` (inference
    only: ``save_model`` refuses it). One pass over each activation map less, same outputs within
    float tolerance. Returns the number of pairs folded (0 for a ViT or a training-mode tower)."""
    if not isinstance(visual, ModifiedResNet):
        return 0
    folded = 0
    for parent, conv_name, bn_name in conv_bn_pairs(visual):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    if folded:
        swap_class(visual, FoldedResNet)
    return folded
