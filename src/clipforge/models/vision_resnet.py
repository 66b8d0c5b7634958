"""The modified ResNet image tower of CLIP (Radford et al. 2021, section 2.4)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .conv import conv_act, conv_add_relu
from .linear import linear, use_packed


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an average pool after the 3x3 conv (and before the 1x1
    conv of the downsample branch): the paper's anti-aliased strided blocks."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with BatchNorm folded away: three oneDNN ops with fused ReLU / residual add."""
        out = conv_act(conv_act(x, self.conv1, "relu"), self.conv2, "relu")
        identity = x if self.downsample is None else conv_act(self.downsample[0](x), self.downsample[1])
        return conv_add_relu(self.avgpool(out), identity, self.conv3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _lin(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias)


class AttentionPool2d(nn.Module):
    """Single-query multi-head attention over the flattened grid plus its mean token; the
    mean token (with a learned positional embedding) is the query, as in the paper."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        hd = c // self.num_heads
        q = _lin(self.q_proj, x[:, :1]).view(b, 1, self.num_heads, hd).transpose(1, 2)
        k = _lin(self.k_proj, x).view(b, -1, self.num_heads, hd).transpose(1, 2)
        v = _lin(self.v_proj, x).view(b, -1, self.num_heads, hd).transpose(1, 2)
        weights = None
        if need_weights:
            weights = ((q * hd ** -0.5) @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, c)
        return _lin(self.c_proj, out), weights


class ModifiedResNet(nn.Module):
    """3-conv stem with average pooling, four bottleneck stages, attention pooling head."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        v = config.vision
        width, layers = v.width, list(v.layers)  # type: ignore[arg-type]
        self.image_size = v.image_size
        self.output_dim = config.embed_dim
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(v.image_size // 32, embed_dim, v.heads, config.embed_dim)
        self.grad_checkpointing = False
        self.init_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        """OpenAI's init: scaled normal attention-pool projections, zero last BN gain per block."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {x.shape[-2]}x{x.shape[-1]} but this model takes "
                f"{self.image_size}x{self.image_size}; use the model's preprocess"
            )

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """``(parent, conv name, bn name)`` for every BatchNorm applied straight to a conv's
        output, which inference may fold into the conv (see ``inference.fold_batchnorm``)."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        for stage in self._stages():
            for block in stage:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        return pairs

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    # Set by ``optimize_for_inference`` once BatchNorm is folded: no-grad CPU fp32 calls then run
    # fused oneDNN convolutions (``models.conv``), in chunks of at most this many pixels.
    fused_inference: bool = False
    inference_chunk_pixels: int = 16 * 224 * 224

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if (self.fused_inference and use_packed() and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.conv1.weight.dtype == torch.float32):
            chunk = max(1, self.inference_chunk_pixels // (x.shape[-1] * x.shape[-2]))
            return torch.cat([self._forward_fused(part) for part in x.split(chunk)])
        x = self.stem(x.to(self.conv1.weight.dtype))
        for stage in self._stages():
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                for block in stage:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool(x)[0]

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = conv_act(x, conv, "relu")
        x = self.avgpool(x)
        for stage in self._stages():
            for block in stage:
                x = block.forward_fused(x)
        return self.attnpool(x)[0]

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Feature maps after the stem and each stage, and (if asked) the attention-pool map
        ``[B, H, 1, 1+G*G]`` over the mean token and the G x G grid."""
        self._check(x)
        x = self.stem(x.to(self.conv1.weight.dtype))
        maps = [x]
        for stage in self._stages():
            x = stage(x)
            maps.append(x)
        out, w = self.attnpool(x, need_weights=attention)
        return {"tokens": maps, "attentions": [w] if w is not None else [], "grid": x.shape[-1],
                "output": out}
