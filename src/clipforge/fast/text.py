"""The fast text tower: padding trimmed, rows bucketed by length (inference) or their real tokens
packed (training), a shared prompt prefix computed once, the last block run for the end-of-text
rows only. All exact because attention is causal:
a token never sees the tokens after it, so what follows a row's end-of-text token cannot change
its features."""

from __future__ import annotations

import torch

from ..models.text import TextTransformer
from .backend import tracing
from .transformer import FastTransformer


class FastTextTransformer(TextTransformer):
    transformer: FastTransformer
    # Inference batches are run in chunks of rows of similar length, each chunk at most this many
    # (rows x padded length) tokens: big enough for efficient matmuls, small enough for the cache.
    bucket_tokens: int = 4096
    # A shared prefix is used when it saves at least this many token positions in a chunk.
    min_prefix_saving: int = 64

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids)
        if not tracing():  # an exported graph takes any length: no data-dependent trim
            if ids.shape[0] > 1 and not torch.is_grad_enabled():
                return self._forward_bucketed(ids)
            if ids.shape[0] > 0:  # tokens after the batch's last end-of-text token: never seen
                lengths = ids.argmax(dim=-1) + 1
                ids = ids[:, : int(lengths.max())]
                if int(lengths.sum()) < ids.numel():  # training: the real tokens alone, packed
                    x = self.transformer.forward_packed_pooled(self.embed(ids), lengths)
                    return self.ln_final(x) @ self.text_projection
        return self.forward_pooled(ids)

    def forward_pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """Features of ``ids`` [B, L] -> [B, D] as given (no padding trim, no buckets): what ``forward``
        runs after trimming, and what a caller that must not trim (the planner's meta tensors) calls.
        LayerNorm acts per token, so normalising only the pooled tokens is exact."""
        x = self.transformer.forward_pooled(self.embed(ids), ids.argmax(dim=-1))
        return self.ln_final(x) @ self.text_projection

    def _forward_bucketed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows sorted by length and run in chunks, each trimmed to its own longest row, so the
        work is close to the sum of the real lengths instead of batch x longest."""
        eot = ids.argmax(dim=-1)
        order = torch.argsort(eot, stable=True)
        lengths = (eot[order] + 1).tolist()
        out: torch.Tensor | None = None
        start, n = 0, len(lengths)
        while start < n:
            end = start + 1  # rows are sorted by length, so a chunk's longest row is its last
            while end < n and (end + 1 - start) * lengths[end] <= self.bucket_tokens:
                end += 1
            idx = order[start:end]
            chunk = self._forward_chunk(ids[idx][:, : lengths[end - 1]])
            if out is None:  # the chunks' dtype: under autocast not the weights' (bf16/fp16)
                out = chunk.new_empty(ids.shape[0], chunk.shape[1])
            out[idx] = chunk
            start = end
        assert out is not None  # forward sends only batches of more than one row here
        return out

    def _forward_chunk(self, ids: torch.Tensor) -> torch.Tensor:
        """A chunk whose rows share their first tokens (prompts made from one template) computes
        that prefix once (``FastTransformer.forward_shared_prefix``)."""
        b, eot = ids.shape[0], ids.argmax(dim=-1)
        same = (ids == ids[:1]).all(dim=0).long().cumprod(0)
        # The shared prefix ends before every row's end-of-text token (pooled rows stay per-row).
        p = min(int(same.sum()), int(eot.min()))
        if b < 2 or p * (b - 1) < self.min_prefix_saving:
            return self.forward_pooled(ids)
        dtype = self.text_projection.dtype
        pos = self.positional_embedding[: ids.shape[1]].to(dtype)
        prefix = self.token_embedding(ids[:1, :p]).to(dtype) + pos[:p]  # [1, P, W]
        rest = self.token_embedding(ids[:, p:]).to(dtype) + pos[p:]  # [B, L - P, W]
        x = self.transformer.forward_shared_prefix(prefix, rest, eot - p)
        return self.ln_final(x) @ self.text_projection
