"""The fast ResNet image tower for inference: BatchNorm folded into the convolutions and convolutions with their pointwise
epilogue fused. Two forms: :class:`FastResNet` (``fast.enable(pack=True)``, what ``clipforge.load``
gives) keeps its modules and computes folded copies of the conv weights lazily for inference calls;
:class:`FoldedResNet` (``optimize_for_inference``) folds in place. Both fold through
:func:`fold_conv_bn`, the pairs :func:`conv_bn_pairs` lists that are :func:`foldable`.

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
from .linear import cached_pack
from .swap import swap_class
from .transformer import Packing

Weights = dict[int, tuple[torch.Tensor, torch.Tensor | None]]  # id(conv) -> (weight, bias) to compute with


def fused_conv_available() -> bool:
    return (getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None) is not None
            and torch.backends.mkldnn.is_available())


def _args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups  # type: ignore[arg-type]


def conv_act(x: torch.Tensor, conv: nn.Conv2d, activation: str = "none", wb: Weights | None = None) -> torch.Tensor:
    """``activation(conv(x))`` with ``activation`` in ``"none"``, ``"relu"``; ``wb``: folded
    weights to use instead of the conv's own (:class:`FastResNet`)."""
    w, b = wb[id(conv)] if wb is not None else (conv.weight, conv.bias)
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, *_args(conv), activation, [], "")


def conv_add_relu(x: torch.Tensor, residual: torch.Tensor, conv: nn.Conv2d, wb: Weights | None = None) -> torch.Tensor:
    """``relu(conv(x) + residual)``: the end of a residual block in one op."""
    w, b = wb[id(conv)] if wb is not None else (conv.weight, conv.bias)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, b, *_args(conv), "add", None, "relu", [], "")


def _bottleneck_fused(block: Bottleneck, x: torch.Tensor, wb: Weights | None = None) -> torch.Tensor:
    """A bottleneck with BatchNorm folded away: three oneDNN ops with fused ReLU / residual add."""
    out = conv_act(conv_act(x, block.conv1, "relu", wb), block.conv2, "relu", wb)
    identity = x if block.downsample is None else conv_act(block.downsample[0](x), block.downsample[1], "none", wb)
    return conv_add_relu(block.avgpool(out), identity, block.conv3, wb)


def _forward_fused(tower: ModifiedResNet, x: torch.Tensor, wb: Weights | None = None) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    for conv in (tower.conv1, tower.conv2, tower.conv3):
        x = conv_act(x, conv, "relu", wb)
    x = tower.avgpool(x)
    for stage in tower._stages():
        for block in stage:
            x = _bottleneck_fused(block, x, wb)
    return tower.attnpool(x)


def _chunked(tower: ModifiedResNet, x: torch.Tensor, wb: Weights | None, chunk_pixels: int) -> torch.Tensor:
    tower._check(x)
    chunk = max(1, chunk_pixels // (x.shape[-1] * x.shape[-2]))
    return torch.cat([_forward_fused(tower, part, wb) for part in x.split(chunk)])


class FastResNet(Packing, ModifiedResNet):
    """The ResNet tower with the fast layer on. With ``pack_weights`` (``clipforge.load``), an
    inference call (eval mode, no autograd, CPU fp32) runs the folded, fused form from copies of
    the conv weights with their BatchNorm folded in, channels-last, made at the first such call and
    remade whenever a weight or running statistic changes (``linear.cached_pack``): the module
    itself is untouched, so it still trains, saves and reports its BatchNorm statistics."""

    inference_chunk_pixels: int = 16 * 224 * 224

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.pack_weights and not self.training and use_packed() and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.conv1.weight.dtype == torch.float32
                and fused_conv_available()):
            pairs = conv_bn_pairs(self)
            if all(foldable(p, c, b) for p, c, b in pairs):
                mods = [(getattr(p, c), getattr(p, b)) for p, c, b in pairs]
                sources = tuple(t for c, b in mods for t in (c.weight, c.bias, b.weight, b.bias, b.running_mean,
                                                             b.running_var))
                wb = cached_pack(self, "folded", sources, lambda: _fold_copies(mods))
                return _chunked(self, x, wb, self.inference_chunk_pixels)
        return super().forward(x)

    def train(self, mode: bool = True) -> "FastResNet":
        if mode:
            self.drop_packed()
        return super().train(mode)


def _fold_copies(mods: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> Weights:
    """Per conv, the (weight, bias) of it with its eval-mode BatchNorm folded in, channels-last."""
    out: Weights = {}
    for conv, bn in mods:
        f = fold_conv_bn(conv, bn)
        out[id(conv)] = (f.weight.detach().contiguous(memory_format=torch.channels_last), f.bias.detach())
    return out


class FoldedResNet(FastResNet):
    """A ResNet tower whose BatchNorms were folded into its convolutions (``fold_batchnorm``):
    different parameters (convs gain biases, statistics gone), so inference only."""

    inference_only = True  # save_model refuses a model holding such a module
    fused = False  # fused oneDNN convolutions (set by optimize_for_inference when every pair folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fused and use_packed() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.conv1.weight.dtype == torch.float32):
            return _chunked(self, x, None, self.inference_chunk_pixels)
        return ModifiedResNet.forward(self, x)


def conv_bn_pairs(visual: ModifiedResNet) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv name, bn name)`` for every BatchNorm applied straight to a conv's output."""
    pairs: list[tuple[nn.Module, str, str]] = [(visual, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    for stage in visual._stages():
        for block in stage:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    return pairs


def foldable(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    """Whether the pair can be folded: still a conv and an eval-mode BatchNorm (training updates the
    statistics, and a folded pair is a conv and an ``Identity``)."""
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    return isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The one BatchNorm fold, used by both forms: a new conv computing ``bn(conv(x))`` with the
    eval-mode statistics (``bn.weight * (w - mean) / sqrt(var + eps) + bn.bias``, per channel)."""
    return fuse_conv_bn_eval(conv, bn)


def fold_batchnorm(visual: nn.Module) -> int:
    """Fold each eval-mode BatchNorm that acts straight on a conv's output into the conv's weight
    and bias; the BatchNorm becomes ``Identity`` and the tower a :class:`FoldedResNet` (inference
    only: ``save_model`` refuses it). One pass over each activation map less, same outputs within
    float tolerance. Returns the number of pairs folded (0 for a ViT or a training-mode tower)."""
    if not isinstance(visual, ModifiedResNet):
        return 0
    pairs = [pair for pair in conv_bn_pairs(visual) if foldable(*pair)]
    for parent, conv_name, bn_name in pairs:
        setattr(parent, conv_name, fold_conv_bn(getattr(parent, conv_name), getattr(parent, bn_name)))
        setattr(parent, bn_name, nn.Identity())
    folded = len(pairs)
    if folded:
        swap_class(visual, FoldedResNet)
    return folded
