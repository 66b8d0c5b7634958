"""Building blocks shared by both towers: fp32 LayerNorm, QuickGELU, fused-QKV attention and the
pre-LN residual Transformer.

Parameter names follow OpenAI's released ``model.py`` (``attn.in_proj_weight``, ``mlp.c_fc``,
``ln_1``...), so OpenAI and OpenCLIP state dicts map onto these modules by a prefix rename only.
Shapes: B batch, L tokens, D width, H heads, hd = D / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as OpenAI's), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class MLP(nn.Module):
    """Linear -> activation -> linear (parameter names as OpenAI's ``mlp.c_fc`` / ``mlp.c_proj``)."""

    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        return self.c_proj(self.gelu(self.c_fc(x)))


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (the layout of
    ``nn.MultiheadAttention``, which the released code used), batch-first ``[B, L, D]``.
    ``causal``: each token attends to itself and the tokens before it only (the text tower)."""

    def __init__(self, width: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.width, self.heads, self.causal = width, heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, L, D]`` -> queries, keys, values, each ``[B, H, L, hd]``."""
        b, l, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # backward: one stack (three selects: three zero-filled [3, B, H, L, hd] buffers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        b, l, d = x.shape
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H, L, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, l, d))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax weights ``[B, H, L, L]`` that ``forward`` applies (for inspection)."""
        q, k, _ = self.qkv(x)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, L, L]
        if self.causal:
            future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.float().softmax(-1).to(q.dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, activation: str = "quick_gelu",
                 norm_eps: float = 1e-5, causal: bool = False) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks, optionally with gradient checkpointing (activations
    recomputed in the backward pass: less memory, ~30% more compute)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 activation: str = "quick_gelu", norm_eps: float = 1e-5, causal: bool = False) -> None:
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation, norm_eps, causal) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False
                              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Final tokens, the tokens after each block, and (if asked) each block's attention map."""
        tokens: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for block in self.resblocks:
            if attention:
                maps.append(block.attn.attention_map(block.ln_1(x)))
            x = block(x)
            tokens.append(x)
        return x, tokens, maps
