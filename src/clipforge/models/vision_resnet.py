"""The modified ResNet image tower of CLIP (Radford et al. 2021, section 2.4)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import CLIPConfig


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, 4 planes, h/s, w/s]
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


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

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feature map ``[B, C, h, w]`` -> query ``[B, H, 1, hd]`` (the mean token), keys and
        values ``[B, H, 1 + h*w, hd]``."""
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        hd = c // self.num_heads
        q = self.q_proj(x[:, :1]).view(b, 1, self.num_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, self.num_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, self.num_heads, hd).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, E]
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        return self.c_proj(out.reshape(x.shape[0], x.shape[1]))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax weights ``[B, H, 1, 1 + h*w]`` that ``forward`` applies (for inspection)."""
        q, k, _ = self.qkv(x)
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype)


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

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, E]
        self._check(x)
        x = self.stem(x.to(self.conv1.weight.dtype))  # [B, W, S/4, S/4]
        for stage in self._stages():  # ... -> [B, 32 W, S/32, S/32]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool(x)

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Feature maps after the stem and each stage, and (if asked) the attention-pool map
        ``[B, H, 1, 1+G*G]`` over the mean token and the G x G grid."""
        self._check(x)
        x = self.stem(x.to(self.conv1.weight.dtype))
        maps = [x]
        for stage in self._stages():
            x = stage(x)
            maps.append(x)
        return {"tokens": maps, "attentions": [self.attnpool.attention_map(x)] if attention else [],
                "grid": x.shape[-1], "output": self.attnpool(x)}
