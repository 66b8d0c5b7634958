"""Building blocks shared by both towers: fp32 LayerNorm, QuickGELU, fused-QKV attention and the
pre-LN residual Transformer.

Parameter names follow OpenAI's released ``model.py`` (``attn.in_proj_weight``, ``mlp.c_fc``,
``ln_1``...), so OpenAI and OpenCLIP state dicts map onto these modules by a prefix rename only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .linear import linear, pack_weight, packed_linear, use_packed


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


class MLP(nn.Module):
    """Linear -> activation -> linear (parameter names as OpenAI's ``mlp.c_fc`` / ``mlp.c_proj``)."""

    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)
        self.packed: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and use_packed():
            p = self.packed
            x = packed_linear(x, p["c_fc"], p["c_fc_bias"], p["activation"])  # type: ignore[arg-type]
            return packed_linear(x, p["c_proj"], self.c_proj.bias)
        x = self.gelu(linear(x, self.c_fc.weight, self.c_fc.bias))
        return linear(x, self.c_proj.weight, self.c_proj.bias)

    def pack_for_inference(self) -> None:
        """Reorder both weights once into oneDNN's layout with the activation fused into the
        first product. QuickGELU(u) = swish(1.702 u) / 1.702, so c_fc is scaled by 1.702 and
        c_proj by 1/1.702 (equal within float rounding). Dropped by ``train()``."""
        scale = 1.702 if isinstance(self.gelu, QuickGELU) else 1.0
        act = "swish" if isinstance(self.gelu, QuickGELU) else "gelu"
        with torch.no_grad():
            self.packed = {"c_fc": pack_weight(self.c_fc.weight * scale), "c_fc_bias": self.c_fc.bias * scale,
                           "c_proj": pack_weight(self.c_proj.weight / scale), "activation": act}  # type: ignore[dict-item]

    def train(self, mode: bool = True) -> "MLP":
        if mode:
            self.packed = None
        return super().train(mode)


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
        self.packed: dict[str, torch.Tensor] | None = None

    def pack_for_inference(self) -> None:
        """Reorder the projection weights once into oneDNN's layout (dropped by ``train()``)."""
        d, w = self.width, self.in_proj_weight
        self.packed = {"qkv": pack_weight(w), "q": pack_weight(w[:d]), "kv": pack_weight(w[d:]),
                       "out": pack_weight(self.out_proj.weight)}

    def train(self, mode: bool = True) -> "Attention":
        if mode:
            self.packed = None
        return super().train(mode)

    def _proj(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """One of the projections ``qkv`` / ``q`` / ``kv`` / ``out`` of ``x``."""
        d = self.width
        if which == "out":
            w, b = self.out_proj.weight, self.out_proj.bias
        else:
            rows = {"qkv": slice(0, 3 * d), "q": slice(0, d), "kv": slice(d, 3 * d)}[which]
            w, b = self.in_proj_weight[rows], self.in_proj_bias[rows]
        if self.packed is not None and use_packed():
            return packed_linear(x, self.packed[which], b)
        return linear(x, w, b)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, l, d = x.shape
        qkv = self._proj(x, "qkv")
        qkv = qkv.view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _heads_out(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, hd]`` -> merged heads -> output projection ``[B, L, D]``."""
        b, _, l, _ = out.shape
        return self._proj(out.transpose(1, 2).reshape(b, l, self.width), "out")

    def forward(self, x: torch.Tensor, causal: bool = False, need_weights: bool = False,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, return_kv: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over ``x``. ``past``: keys and values ``[1 or B, H, P, hd]`` of a
        prefix shared by every row, which the tokens of ``x`` follow (positions P..P+L-1).
        With ``return_kv`` the second output is this call's ``(k, v)`` instead of weights."""
        if need_weights and past is not None:
            raise ValueError("attention maps are not available with a shared prefix (past)")
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
        elif past is not None:
            pk, pv = past
            p = pk.shape[2]
            keys = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
            values = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
            mask = torch.ones(l, p + l, dtype=torch.bool, device=x.device).tril(p) if causal else None
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if return_kv:
            return self._heads_out(out), (k, v)  # type: ignore[return-value]
        return self._heads_out(out), weights

    def forward_rows(self, h: torch.Tensor, index: torch.Tensor, causal: bool,
                     past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attention output ``[B, D]`` for one query row per sequence (``index[b]``) over all keys
        of ``h`` (``[B, L, D]``, already normalised) and of ``past`` (as in ``forward``); with
        ``causal`` only keys up to the row's own position. Keys and values cost a full
        projection; queries and the output projection one row."""
        b, l, d = h.shape
        hd = d // self.heads
        rows = torch.arange(b, device=h.device)
        q = self._proj(h[rows, index], "q").view(b, self.heads, 1, hd)
        kv = self._proj(h, "kv")
        kv = kv.view(b, l, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        p = 0
        if past is not None:
            p = past[0].shape[2]
            k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
        mask = None
        if causal:
            mask = (torch.arange(p + l, device=h.device) <= (index[:, None] + p)).view(b, 1, 1, p + l)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._proj(out.reshape(b, d), "out")


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, activation: str = "quick_gelu",
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, hidden, activation)

    def forward(self, x: torch.Tensor, causal: bool = False, need_weights: bool = False,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, return_kv: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, attention weights or None)``; see ``Attention.forward`` for ``past`` and
        ``return_kv`` (then the second output is this block's keys and values)."""
        a, w = self.attn(self.ln_1(x), causal=causal, need_weights=need_weights, past=past, return_kv=return_kv)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, w

    def forward_rows(self, x: torch.Tensor, index: torch.Tensor, causal: bool = False,
                     past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output at one position per sequence, ``[B, D]``: exactly the rows
        ``forward(x)[arange(B), index]``, at a fraction of the cost (the last block of a tower whose
        output is pooled at one token needs nothing else)."""
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, index] + self.attn.forward_rows(self.ln_1(x), index, causal, past)
        return y + self.mlp(self.ln_2(y))


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

    def forward(self, x: torch.Tensor, causal: bool = False, pool: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens ``[B, L, D]``; or, given ``pool`` (one position per sequence), only the
        final states at those positions ``[B, D]``, the last block run for those rows alone."""
        blocks = list(self.resblocks)
        last = blocks.pop() if pool is not None and blocks else None
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            if ckpt:
                x = checkpoint(_block_out, block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)[0]
        if pool is None:
            return x
        if last is None:  # a zero-layer stack
            return x[torch.arange(x.shape[0], device=x.device), pool]
        if ckpt:
            return checkpoint(last.forward_rows, x, pool, causal, use_reentrant=False)
        return last.forward_rows(x, pool, causal)

    def forward_shared_prefix(self, prefix: torch.Tensor, x: torch.Tensor, pool: torch.Tensor,
                              causal: bool = True) -> torch.Tensor:
        """Final states ``[B, D]`` at positions ``pool`` (indices into ``x``) of the sequences
        ``prefix + x[b]``, where ``prefix`` (``[1, P, D]``) is shared by every row and ``x``
        (``[B, S, D]``) holds each row's own continuation. With causal attention the prefix's
        states do not depend on what follows, so they are computed once and only their keys and
        values are shared: exact, and the prefix tokens are paid for once instead of B times."""
        blocks = list(self.resblocks)
        if not blocks:  # a zero-layer stack: the states are the inputs
            return x[torch.arange(x.shape[0], device=x.device), pool]
        for block in blocks[:-1]:
            new_prefix, past = block(prefix, causal=causal, return_kv=True)
            x = block(x, causal=causal, past=past)[0]  # type: ignore[arg-type]
            prefix = new_prefix
        last = blocks[-1]
        past = last.attn(last.ln_1(prefix), causal=causal, return_kv=True)[1]
        return last.forward_rows(x, pool, causal, past)  # type: ignore[arg-type]

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
