"""The fast ViT image tower: only the class token is pooled, so the last block runs for that row
alone (exact); the patch embedding is one product (a strided convolution with kernel = stride is
a matmul over flattened patches: 2.3 ms -> ~0.5 ms per ViT-B/32 image at batch 1); inference
batches run in cache-sized chunks."""

from __future__ import annotations

import torch

from ..models.vision_vit import VisionTransformer
from .backend import linear, tracing
from .linear import cached_pack, pack_weight, packed_linear
from .transformer import FastTransformer, Packing


class FastVisionTransformer(Packing, VisionTransformer):
    transformer: FastTransformer
    # Inference batches are run in chunks of at most this many tokens (images x (1 + grid^2)):
    # per image, a big batch is slower than a moderate one once activations leave the cache.
    inference_chunk_tokens: int = 1600

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep_indices(x.shape[0], x.device)  # drawn once for the batch, chunked or not
        chunk = max(1, self.inference_chunk_tokens // ((self.image_size // self.patch_size) ** 2 + 1))
        if x.shape[0] > chunk and not torch.is_grad_enabled() and not tracing():
            keeps = keep.split(chunk) if keep is not None else [None] * len(x.split(chunk))
            return torch.cat([self._forward(part, k) for part, k in zip(x.split(chunk), keeps)])
        return self._forward(x, keep)

    def embed(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """As the plain ``embed``, the convolution computed as a product over flattened patches;
        with ``keep`` ``[B, K]`` only the kept patches are embedded (dropped ones are never computed)."""
        if tracing():
            return super().embed(x, keep)
        self._check(x)
        w = self.conv1.weight  # [W, 3, p, p]
        b, p, g = x.shape[0], self.patch_size, self.image_size // self.patch_size
        x = x.to(w.dtype).reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        pos = self.positional_embedding.to(x.dtype)  # [1 + G*G, W]
        if keep is not None:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, 3*p*p]
            pos = torch.cat([pos[:1].expand(b, 1, -1), pos[1:][keep]], dim=1)  # [B, 1 + K, W]
        if self.packing(w):
            x = packed_linear(x, cached_pack(self, "patch", (w,), lambda: pack_weight(w.flatten(1))), None)
        else:
            x = linear(x, w.flatten(1))  # [B, G*G or K, W]
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + pos
        return self.ln_pre(x)

    def train(self, mode: bool = True) -> "FastVisionTransformer":
        if mode:
            self.drop_packed()
        return super().train(mode)

    def _forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x, keep)  # [B, 1 + G*G or 1 + K, W]
        x = self.transformer.forward_pooled(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.ln_post(x) @ self.proj
