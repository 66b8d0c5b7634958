"""Building blocks shared by both towers: fp32 LayerNorm, QuickGELU, fused-QKV attention and the
pre-LN residual Transformer.

Parameter names follow OpenAI's released ``model.py`` (``attn.in_proj_weight``, ``mlp.c_fc``,
``ln_1``...), so OpenAI and OpenCLIP state dicts map onto these modules by a prefix rename only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as OpenAI's), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's released weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r} (expected 'quick_gelu' or 'gelu')")


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, run through
    ``F.scaled_dot_product_attention``. Input and output are batch-first ``[B, L, D]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # The same initialisation as torch.nn.MultiheadAttention, which the released code used.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, l, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, causal: bool = False, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, l, d = x.shape
        q, k, v = self._qkv(x)
        weights = None
        if need_weights:
            # Explicit softmax only when the caller asks for the attention map.
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if causal:
                mask = torch.ones(l, l, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            weights = scores.float().softmax(-1).to(q.dtype)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(b, l, d)
        return self.out_proj(out), weights


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, activation: str = "quick_gelu",
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=norm_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", make_activation(activation)),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = False, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, w = self.attn(self.ln_1(x), causal=causal, need_weights=need_weights)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, w


class Transformer(nn.Module):
    """A stack of residual attention blocks, with optional gradient checkpointing and optional
    per-layer outputs (tokens and attention maps) for inspection."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 activation: str = "quick_gelu", norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation, norm_eps) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(_block_out, block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)[0]
        return x

    def forward_intermediates(self, x: torch.Tensor, causal: bool = False, attention: bool = False
                              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        tokens: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for block in self.resblocks:
            x, w = block(x, causal=causal, need_weights=attention)
            tokens.append(x)
            if w is not None:
                maps.append(w)
        return x, tokens, maps


def _block_out(block: ResidualAttentionBlock, x: torch.Tensor, causal: bool) -> torch.Tensor:
    return block(x, causal=causal)[0]
