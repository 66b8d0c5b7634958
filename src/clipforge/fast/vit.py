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
        chunk = max(1, self.inference_chunk_tokens // ((self.image_size // self.patch_size) ** 2 + 1))
        if x.shape[0] > chunk and not torch.is_grad_enabled() and not tracing():
            return torch.cat([self._forward(part) for part in x.split(chunk)])
        return self._forward(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """As the plain ``embed``, the convolution computed as a product over flattened patches."""
        if tracing():
            return super().embed(x)
        self._check(x)
        w = self.conv1.weight  # [W, 3, p, p]
        b, p, g = x.shape[0], self.patch_size, self.image_size // self.patch_size
        x = x.to(w.dtype).reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        if self.packing(w):
            x = packed_linear(x, cached_pack(self, "patch", (w,), lambda: pack_weight(w.flatten(1))), None)
        else:
            x = linear(x, w.flatten(1))  # [B, G*G, W]
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def train(self, mode: bool = True) -> "FastVisionTransformer":
        if mode:
            self.drop_packed()
        return super().train(mode)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.transformer.forward_pooled(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.ln_post(x) @ self.proj
