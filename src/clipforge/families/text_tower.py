"""open_clip's ``TextTransformer`` variants, on our blocks: causal or bidirectional attention
(``no_causal_mask``), features pooled at the first / last / argmax / eos token, a projection with
bias (``proj_bias``: SigLIP), tanh GELU (SigLIP2), any LayerNorm eps, and CoCa's class token
appended after the text (``embed_cls``). Parameter names are open_clip's, so its state dicts
load by prefix only. Shapes: B batch, L tokens, W width, E embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import Attention, LayerNorm, ResidualAttentionBlock


def attend(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``attn`` over ``x [B, L, W]`` with an additive ``mask`` (``[L, L]`` or ``[B, L, L]``) or none."""
    b, l, d = x.shape
    q, k, v = attn.qkv(x)  # [B, H, L, hd] each
    m = None if mask is None else (mask[:, None] if mask.dim() == 3 else mask).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # [B, H, L, hd]
    return attn.out_proj(out.transpose(1, 2).reshape(b, l, d))


class OpenCLIPText(nn.Module):
    """Token + positional embeddings, pre-LN Transformer, final LayerNorm, pooling, projection."""

    def __init__(self, text_cfg: dict[str, Any], embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        t = text_cfg
        width, heads, layers = int(t.get("width", 512)), int(t.get("heads", 8)), int(t.get("layers", 12))
        self.context_length = int(t.get("context_length", 77))
        self.vocab_size = int(t.get("vocab_size", 49408))
        self.pool_type = t.get("pool_type", "argmax")
        self.pad_id, self.eos_id = int(t.get("pad_id", 0)), int(t.get("eos_id", 2))
        self.causal = not t.get("no_causal_mask", False)
        eps = float((t.get("norm_kwargs") or {}).get("eps", 1e-5))
        act = t.get("act_kwargs") or {}
        if set(act) - {"approximate"}:
            raise ValueError(f"text_cfg.act_kwargs={act!r} is not supported (only 'approximate')")
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.cls_emb = nn.Parameter(torch.empty(width)) if t.get("embed_cls") else None
        n_pos = self.context_length + (1 if self.cls_emb is not None else 0)
        self.positional_embedding = nn.Parameter(torch.empty(n_pos, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(  # type: ignore[assignment]
            ResidualAttentionBlock(width, heads, float(t.get("mlp_ratio", 4.0)),
                                   "quick_gelu" if quick_gelu else "gelu", eps) for _ in range(layers))
        if act.get("approximate", "none") != "none":
            for block in self.transformer.resblocks:  # type: ignore[attr-defined]
                block.mlp.gelu = nn.GELU(approximate=act["approximate"])
        self.ln_final = LayerNorm(width, eps=eps)
        self.text_projection: nn.Parameter | nn.Linear | None = None
        if t.get("proj_type", "linear") != "none" and embed_dim:
            self.text_projection = nn.Linear(width, embed_dim) if t.get("proj_bias") \
                else nn.Parameter(torch.empty(width, embed_dim))
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's (and OpenAI's) initialisation, scaled by depth for residual outputs."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        for block in self.transformer.resblocks:  # type: ignore[attr-defined]
            nn.init.normal_(block.attn.in_proj_weight, std=self.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=self.width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    def mask(self, ids: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention mask over ``n`` positions: causal (``[n, n]``); with CoCa's class
        token also padding, in open_clip's released layout (the class slot counted first)."""
        causal = None
        if self.causal:
            causal = torch.full((n, n), float("-inf"), device=ids.device, dtype=dtype).triu_(1)
        if self.cls_emb is None:
            return causal
        valid = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids != self.pad_id], 1)  # [B, n]
        pad = torch.zeros(valid.shape, dtype=dtype, device=ids.device).masked_fill_(~valid, float("-inf"))
        pad = pad[:, None, :].expand(-1, n, -1)  # [B, n(query), n(key)]
        return pad if causal is None else pad + causal

    @property
    def cast_dtype(self) -> torch.dtype:
        """The blocks' weight dtype, which the embeddings are cast to (open_clip's ``get_cast_dtype``:
        a ``bf16`` cast leaves the embeddings float32)."""
        blocks = self.transformer.resblocks  # type: ignore[attr-defined]
        return blocks[0].mlp.c_fc.weight.dtype if len(blocks) else self.positional_embedding.dtype

    def _check(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"text ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"text ids have length {ids.shape[1]} > the model's context length {self.context_length}")

    def tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ids ``[B, L]`` -> final token states ``[B, L(+1), W]`` and each block's output."""
        self._check(ids)
        dtype = self.cast_dtype
        x = self.token_embedding(ids).to(dtype)  # [B, L, W]
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(dtype).expand(x.shape[0], 1, -1)], 1)  # class token last
        n = x.shape[1]
        x = x + self.positional_embedding[:n].to(dtype)
        mask = self.mask(ids, n, dtype)
        outs: list[torch.Tensor] = []
        for block in self.transformer.resblocks:  # type: ignore[attr-defined]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._block, block, x, mask, use_reentrant=False)
            else:
                x = self._block(block, x, mask)
            outs.append(x)
        return x, outs

    @staticmethod
    def _block(block: ResidualAttentionBlock, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + attend(block.attn, block.ln_1(x), mask)
        return x + block.mlp(block.ln_2(x))

    def pool(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, W]
        if self.cls_emb is not None:  # CoCa: the appended class token, normalised after pooling
            return self.ln_final(x[:, -1])
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "argmax":  # the end-of-text token has the highest id (OpenAI's BPE)
            return x[rows, ids.argmax(dim=-1)]
        if self.pool_type == "eos":
            return x[rows, (ids == self.eos_id).int().argmax(dim=-1)]
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        x, _ = self.tokens(ids)
        return self.project(self.pool(x, ids))

    def forward_intermediates(self, ids: torch.Tensor, attention: bool = False) -> dict[str, object]:
        if attention:
            raise ValueError("attention maps are not available for this text tower")
        x, outs = self.tokens(ids)
        return {"tokens": outs, "attentions": [], "output": self.project(self.pool(x, ids))}
