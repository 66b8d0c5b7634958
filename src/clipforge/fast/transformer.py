"""Fast Transformer modules: the plain ones with oneDNN / prepacked linears, the last block run for
the pooled rows only, and a prefix shared by every row computed once.

Each class subclasses its plain module and adds no Parameters (see ``fast.swap``), so a model with
these classes has the plain model's weights, state_dict keys and, within float rounding, outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..models.layers import MLP, Attention, QuickGELU, ResidualAttentionBlock, Transformer
from .backend import linear, packs, use_packed
from .linear import cached_pack, int8_available, int8_linear, int8_weight, pack_weight, packed_linear

KV = tuple[torch.Tensor, torch.Tensor]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; under CPU bf16 autocast in float32 (the softmax in fp32,
    and torch's CPU flash-attention backward is ~5x slower in bf16 than fp32: 24.5 vs 5.4 ms for
    a tiny-vit batch of 128), the result returned in bf16 as autocast would."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        return out.to(torch.get_autocast_dtype("cpu"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class Packing:
    """Inference weights prepacked in oneDNN's layout, made on the first call that can use them
    (no autograd, CPU fp32 on the oneDNN backend or bf16: ``backend.packs``) and made again after
    any change to the weights (``linear.cached_pack`` keys them by version), so a packed copy is
    never stale. ``pack_weights`` is set by ``enable(model, pack=True)`` (``clipforge.load``) and
    ``optimize_for_inference``; training leaves it off. A second copy of the packed weights."""

    pack_weights: bool = False
    int8: bool = False  # optimize_for_inference(precision="int8"): dynamic int8 products (FastMLP, FastAttention)
    packed: dict | None = None  # name -> (source key, packed weights), see linear.cached_pack

    def packing(self, weight: torch.Tensor) -> bool:
        return self.pack_weights and use_packed() and packs(weight)

    def quantized(self, x: torch.Tensor) -> bool:
        """Whether this call runs the int8 products: int8 asked for, an inference call, fp32 CPU input."""
        return (self.int8 and use_packed() and x.device.type == "cpu" and x.dtype == torch.float32
                and int8_available())

    def drop_packed(self) -> None:
        self.packed = None

    def reset(self) -> None:
        """Back to the class defaults: no packing, no int8, no packed copies (``fast.disable``)."""
        for name in ("packed", "pack_weights", "int8"):
            self.__dict__.pop(name, None)


def computes_int8(module: torch.nn.Module) -> bool:
    """Whether any part of ``module`` runs its products in int8 (``optimize_for_inference(precision=
    "int8")``): same weights as fp32, other features, so feature caches must tell them apart."""
    return any(isinstance(m, Packing) and m.int8 for m in module.modules())


class FastMLP(Packing, MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized(x):
            p = cached_pack(self, "mlp-int8", (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias),
                            lambda: {"c_fc": int8_weight(self.c_fc.weight, self.c_fc.bias),
                                     "c_proj": int8_weight(self.c_proj.weight, self.c_proj.bias)})
            return int8_linear(self.gelu(int8_linear(x, p["c_fc"])), p["c_proj"])
        if self.packing(self.c_fc.weight) and x.dtype == self.c_fc.weight.dtype:
            p = cached_pack(self, "mlp", (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight), self._pack)
            x = packed_linear(x, p["c_fc"], p["c_fc_bias"], p["activation"])
            return packed_linear(x, p["c_proj"], self.c_proj.bias)
        return super().forward(x)  # c_fc, c_proj are FastLinear

    def _pack(self) -> dict[str, torch.Tensor | str]:
        """Both weights in oneDNN's layout with the activation fused into the first product.
        QuickGELU(u) = swish(1.702 u) / 1.702, so c_fc is scaled by 1.702 and c_proj by 1/1.702
        (scaled in fp32, then cast: equal within rounding)."""
        quick = isinstance(self.gelu, QuickGELU)
        scale = 1.702 if quick else 1.0
        dtype = self.c_fc.weight.dtype
        fc_bias = self.c_fc.bias
        return {"c_fc": pack_weight((self.c_fc.weight.float() * scale).to(dtype)),
                "c_fc_bias": None if fc_bias is None else (fc_bias.float() * scale).to(dtype),
                "c_proj": pack_weight((self.c_proj.weight.float() / scale).to(dtype)),
                "activation": "swish" if quick else "gelu"}

    def train(self, mode: bool = True) -> "FastMLP":
        if mode:
            self.drop_packed()  # memory back while training; remade at the next inference call
        return super().train(mode)


class FastAttention(Packing, Attention):
    def _pack(self) -> dict[str, torch.Tensor]:
        """The projection weights in oneDNN's layout."""
        d, w = self.width, self.in_proj_weight
        return {"qkv": pack_weight(w), "q": pack_weight(w[:d]), "kv": pack_weight(w[d:]),
                "out": pack_weight(self.out_proj.weight)}

    def train(self, mode: bool = True) -> "FastAttention":
        if mode:
            self.drop_packed()
        return super().train(mode)

    def project(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """One of the projections ``qkv`` / ``q`` / ``kv`` / ``out`` of ``x``."""
        d = self.width
        if which == "out":
            w, b = self.out_proj.weight, self.out_proj.bias
        else:
            rows = {"qkv": slice(0, 3 * d), "q": slice(0, d), "kv": slice(d, 3 * d)}[which]
            w, b = self.in_proj_weight[rows], self.in_proj_bias[rows]
        if self.quantized(x):
            p = cached_pack(self, "attn-int8", (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                                                self.out_proj.bias), self._pack_int8)
            return int8_linear(x, p[which])
        if self.packing(w) and x.dtype == w.dtype:
            p = cached_pack(self, "attn", (self.in_proj_weight, self.out_proj.weight), self._pack)
            return packed_linear(x, p[which], b)
        return linear(x, w, b)

    def _pack_int8(self) -> dict[str, object]:
        d, w, b = self.width, self.in_proj_weight, self.in_proj_bias
        return {"qkv": int8_weight(w, b), "q": int8_weight(w[:d], b[:d]), "kv": int8_weight(w[d:], b[d:]),
                "out": int8_weight(self.out_proj.weight, self.out_proj.bias)}

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, l, d = x.shape
        qkv = self.project(x, "qkv").view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # as Attention.qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]

    def attend(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Output ``[B, L, D]`` and this call's keys and values ``[B, H, L, hd]``. ``past``: keys
        and values ``[1, H, P, hd]`` of a prefix shared by every row, which ``x`` continues."""
        b, l, d = x.shape
        q, k, v = self.qkv(x)
        if past is None:
            out = attention(q, k, v, causal=self.causal)
        else:
            p = past[0].shape[2]
            keys = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            values = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
            mask = torch.ones(l, p + l, dtype=torch.bool, device=x.device).tril(p) if self.causal else None
            out = attention(q, keys, values, mask)
        return self.project(out.transpose(1, 2).reshape(b, l, d), "out"), (k, v)

    def attend_rows(self, h: torch.Tensor, index: torch.Tensor, past: KV | None = None) -> torch.Tensor:
        """Attention output ``[B, D]`` for one query row per sequence (``index[b]``) over the keys
        of ``h`` (``[B, L, D]``, normalised) and ``past``; causal: keys up to the row's position.
        Keys and values cost a full projection; queries and the output projection one row."""
        q = self.project(h[torch.arange(h.shape[0], device=h.device), index], "q")
        return self._attend_rows(q, self.project(h, "kv"), index, past)

    def _attend_rows(self, q: torch.Tensor, kv: torch.Tensor, index: torch.Tensor, past: KV | None) -> torch.Tensor:
        """``attend_rows`` from the projected query rows ``[B, D]`` and keys and values ``[B, L, 2D]``."""
        (b, l, _), d = kv.shape, q.shape[-1]
        hd = d // self.heads
        q = q.view(b, self.heads, 1, hd)
        kv = kv.view(b, l, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        (k, v), p = kv.unbind(0), 0
        if past is not None:
            p = past[0].shape[2]
            k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
        mask = None
        if self.causal:
            mask = (torch.arange(p + l, device=q.device) <= (index[:, None] + p)).view(b, 1, 1, p + l)
        out = attention(q, k, v, mask)
        return self.project(out.reshape(b, d), "out")

    def attend_packed(self, h: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Causal attention output ``[T, D]`` for packed tokens ``h`` (``[T, D]``, normalised): the
        ``rows`` (flat indices) of a ``[B, L]`` batch where each sequence holds its first tokens.
        Projections on the T rows only; attention on the zero-padded batch, where causality keeps
        every real token from seeing the padding after it."""
        (b, l), (_, d) = shape, h.shape
        qkv = pad_rows(self.project(h, "qkv"), rows, b * l)  # [B*L, 3D]
        q, k, v = qkv.view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, causal=True).transpose(1, 2).reshape(b * l, d)  # [B*L, D]
        return self.project(out.index_select(0, rows), "out")

    def attend_rows_packed(self, h: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int],
                           pooled: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``attend_rows`` for packed tokens (see ``attend_packed``): the query rows ``pooled``
        (indices into ``h``) at positions ``index`` of their sequences; keys from the T rows."""
        (b, l), (_, d) = shape, h.shape
        kv = pad_rows(self.project(h, "kv"), rows, b * l).view(b, l, 2 * d)
        return self._attend_rows(self.project(h.index_select(0, pooled), "q"), kv, index, None)


def pad_rows(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Packed rows ``x`` [T, C] placed at the flat indices ``rows`` of a zero ``[n, C]`` tensor (differentiable)."""
    return x.new_zeros(n, x.shape[1]).index_copy(0, rows, x)


class FastBlock(ResidualAttentionBlock):
    attn: FastAttention

    def forward_kv(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """The block's output and its attention's keys and values (see ``FastAttention.attend``)."""
        a, kv = self.attn.attend(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv

    def forward_rows(self, x: torch.Tensor, index: torch.Tensor, past: KV | None = None) -> torch.Tensor:
        """Exactly the rows ``forward(x)[arange(B), index]`` (``[B, D]``), at a fraction of the
        cost: the last block of a tower pooled at one token needs nothing else."""
        y = x[torch.arange(x.shape[0], device=x.device), index] + self.attn.attend_rows(self.ln_1(x), index, past)
        return y + self.mlp(self.ln_2(y))

    def forward_packed(self, x: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The block over packed tokens ``x`` ``[T, D]`` of a causal batch (``FastAttention.attend_packed``)."""
        x = x + self.attn.attend_packed(self.ln_1(x), rows, shape)
        return x + self.mlp(self.ln_2(x))

    def forward_rows_packed(self, x: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int],
                            pooled: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``forward_rows`` for packed tokens: the rows ``pooled`` of ``x`` (position ``index`` in their sequences)."""
        y = x.index_select(0, pooled) + self.attn.attend_rows_packed(self.ln_1(x), rows, shape, pooled, index)
        return y + self.mlp(self.ln_2(y))


class FastTransformer(Transformer):
    resblocks: list[FastBlock]  # type: ignore[assignment]

    def forward_pooled(self, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """The final states ``[B, D]`` at one position per sequence (``pool[b]``), the last block
        run for those rows alone; training too (gradient checkpointing respected)."""
        if not len(self.resblocks):
            return x[torch.arange(x.shape[0], device=x.device), pool]
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        *blocks, last = self.resblocks
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        if ckpt:
            return checkpoint(last.forward_rows, x, pool, use_reentrant=False)
        return last.forward_rows(x, pool)

    def forward_packed_pooled(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Final states ``[B, D]`` at the last real token of each sequence of a causal batch ``x``
        (``[B, L, D]``, ``lengths[b]`` real tokens first, padding after). The token-wise products
        (projections, MLP, LayerNorm) run on the real tokens alone, packed: the work of the sum of
        the lengths, not of B x L, in training too (what the text tower's trimming leaves, ~half of
        a batch of captions). Exact: with causal attention no real token reads the padding."""
        if not self.causal:
            raise ValueError("packing the real tokens is exact only for causal attention")
        b, l, d = x.shape
        pos = torch.arange(l, device=x.device)
        rows = (pos[None] < lengths[:, None]).reshape(-1).nonzero().squeeze(1)  # [T] flat indices
        x = x.reshape(b * l, d).index_select(0, rows)  # [T, D]
        pooled, index = lengths.cumsum(0) - 1, lengths - 1  # last real tokens: in the packed rows; in each sequence
        if not len(self.resblocks):
            return x.index_select(0, pooled)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        *blocks, last = self.resblocks
        for block in blocks:
            x = (checkpoint(block.forward_packed, x, rows, (b, l), use_reentrant=False) if ckpt
                 else block.forward_packed(x, rows, (b, l)))
        if ckpt:
            return checkpoint(last.forward_rows_packed, x, rows, (b, l), pooled, index, use_reentrant=False)
        return last.forward_rows_packed(x, rows, (b, l), pooled, index)

    def forward_shared_prefix(self, prefix: torch.Tensor, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """Final states ``[B, D]`` at positions ``pool`` (indices into ``x``) of the sequences
        ``prefix + x[b]``, where ``prefix`` (``[1, P, D]``) is shared by every row and ``x``
        (``[B, S, D]``) holds each row's continuation. With causal attention the prefix's states do
        not depend on what follows, so they are computed once and only their keys and values are
        shared: exact, and the prefix is paid for once instead of B times. Inference only."""
        if not self.causal:
            raise ValueError("a shared prefix is exact only for causal attention")
        if not len(self.resblocks):
            return x[torch.arange(x.shape[0], device=x.device), pool]
        *blocks, last = self.resblocks
        for block in blocks:
            prefix, past = block.forward_kv(prefix)
            x = block.forward_kv(x, past)[0]
        past = last.attn.attend(last.ln_1(prefix))[1]
        return last.forward_rows(x, pool, past)
