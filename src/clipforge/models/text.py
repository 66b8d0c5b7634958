"""The text tower: a causal Transformer over BPE ids, features read at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CLIPConfig
from .layers import LayerNorm, Transformer


class TextTransformer(nn.Module):
    """Token + positional embeddings, causal pre-LN Transformer, final LayerNorm, projection.

    The end-of-text token has the highest id in each row (as in OpenAI's tokenizer), so its
    position is ``ids.argmax(-1)``. Because attention is causal, tokens after the last
    end-of-text token of the batch cannot change any pooled feature; they are trimmed before
    the Transformer runs (``trim=True``), which is exact and saves most of the compute on
    real captions.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        t = config.text
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.activation,
                                       config.norm_eps)
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

    def _embed(self, ids: torch.Tensor, trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(ids)
        eot = ids.argmax(dim=-1)
        if trim and ids.shape[0] > 0:
            ids = ids[:, : int(eot.max()) + 1]
        n = ids.shape[1]
        dtype = self.text_projection.dtype
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding[:n].to(dtype)
        return x, eot

    # Inference batches are run in chunks of rows of similar length, each chunk at most this many
    # (rows x padded length) tokens: big enough for efficient matmuls, small enough for the cache.
    bucket_tokens: int = 4096

    def forward(self, ids: torch.Tensor, trim: bool = True) -> torch.Tensor:
        if trim and ids.shape[0] > 1 and not torch.is_grad_enabled():
            return self._forward_bucketed(ids)
        return self._forward(ids, trim)

    def _forward(self, ids: torch.Tensor, trim: bool) -> torch.Tensor:
        x, eot = self._embed(ids, trim)
        # Only the end-of-text states are used: the last block runs for those rows alone, and
        # LayerNorm acts per token, so normalising only the pooled tokens is exact.
        x = self.transformer(x, causal=True, pool=eot)
        return self.ln_final(x) @ self.text_projection

    def _forward_bucketed(self, ids: torch.Tensor) -> torch.Tensor:
        """Inference: rows sorted by length and run in chunks, each trimmed to its own longest
        row, so the work is close to the sum of the real lengths instead of batch x longest;
        a chunk whose rows share their first tokens (prompts made from one template) computes
        that prefix once. Exact, because attention is causal."""
        self._check(ids)
        eot = ids.argmax(dim=-1)
        order = torch.argsort(eot, stable=True)
        lengths = (eot[order] + 1).tolist()
        out = torch.empty(ids.shape[0], self.text_projection.shape[1], dtype=self.text_projection.dtype,
                          device=self.text_projection.device)
        start, n = 0, len(lengths)
        while start < n:
            end = start + 1  # rows are sorted by length, so a chunk's longest row is its last
            while end < n and (end + 1 - start) * lengths[end] <= self.bucket_tokens:
                end += 1
            idx = order[start:end]
            out[idx] = self._forward_chunk(ids[idx][:, : lengths[end - 1]], eot[idx])
            start = end
        return out

    # A shared prefix is used when it saves at least this many token positions in a chunk.
    min_prefix_saving: int = 64

    def _forward_chunk(self, ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        same = (ids == ids[:1]).all(dim=0).long().cumprod(0)
        # The shared prefix ends before every row's end-of-text token (pooled rows stay per-row).
        p = min(int(same.sum()), int(eot.min()))
        if b < 2 or p * (b - 1) < self.min_prefix_saving:
            return self._forward(ids, trim=True)
        dtype = self.text_projection.dtype
        pos = self.positional_embedding[: ids.shape[1]].to(dtype)
        prefix = self.token_embedding(ids[:1, :p]).to(dtype) + pos[:p]
        rest = self.token_embedding(ids[:, p:]).to(dtype) + pos[p:]
        x = self.transformer.forward_shared_prefix(prefix, rest, eot - p, causal=True)
        return self.ln_final(x) @ self.text_projection

    def forward_intermediates(self, ids: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Per-layer token states ``[B, L, W]`` and (optionally) attention maps ``[B, H, L, L]``."""
        x, eot = self._embed(ids, trim=False)
        x, tokens, maps = self.transformer.forward_intermediates(x, causal=True, attention=attention)
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot]) @ self.text_projection
        return {"tokens": tokens, "attentions": maps, "eot_index": eot, "output": pooled}
