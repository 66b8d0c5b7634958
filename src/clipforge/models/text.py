"""The text tower: a causal Transformer over BPE ids, features read at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CLIPConfig
from .layers import LayerNorm, Transformer


class TextTransformer(nn.Module):
    """Token + positional embeddings, causal pre-LN Transformer, final LayerNorm, projection.

    The end-of-text token has the highest id in each row (as in OpenAI's tokenizer), so its
    position is ``ids.argmax(-1)``. Every position is computed, padding included, as in OpenAI's
    code; ``clipforge.fast`` skips what cannot change the pooled features (exact, because the
    attention is causal).
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        t = config.text
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.activation,
                                       config.norm_eps, causal=True)
        self.ln_final = LayerNorm(t.width, eps=config.norm_eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """The initialisation of OpenAI's released code (scaled by depth for residual outputs)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def _check(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"text ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(
                f"text ids have length {ids.shape[1]} > the model's context length {self.context_length}"
            )
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text ids must be integer tokens, got dtype {ids.dtype}")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` (L <= context length) -> token + position embeddings ``[B, L, W]``."""
        self._check(ids)
        dtype = self.text_projection.dtype
        return self.token_embedding(ids).to(dtype) + self.positional_embedding[: ids.shape[1]].to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        x = self.transformer(self.embed(ids))  # [B, L, W], causal
        x = self.ln_final(x)
        # Features are read at the end-of-text token: the highest id in each row.
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)] @ self.text_projection

    def forward_intermediates(self, ids: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Per-layer token states ``[B, L, W]`` and (optionally) attention maps ``[B, H, L, L]``."""
        x, tokens, maps = self.transformer.forward_intermediates(self.embed(ids), attention=attention)
        eot = ids.argmax(dim=-1)
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot]) @ self.text_projection
        return {"tokens": tokens, "attentions": maps, "eot_index": eot, "output": pooled}
