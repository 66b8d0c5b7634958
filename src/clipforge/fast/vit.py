"""The fast ViT image tower: only the class token is pooled, so the last block runs for that row
alone (exact); inference batches run in cache-sized chunks."""

from __future__ import annotations

import torch

from ..models.vision_vit import VisionTransformer
from .backend import tracing
from .transformer import FastTransformer


class FastVisionTransformer(VisionTransformer):
    transformer: FastTransformer
    # Inference batches are run in chunks of at most this many tokens (images x (1 + grid^2)):
    # per image, a big batch is slower than a moderate one once activations leave the cache.
    inference_chunk_tokens: int = 1600

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = max(1, self.inference_chunk_tokens // ((self.image_size // self.patch_size) ** 2 + 1))
        if x.shape[0] > chunk and not torch.is_grad_enabled() and not tracing():
            return torch.cat([self._forward(part) for part in x.split(chunk)])
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.transformer.forward_pooled(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.ln_post(x) @ self.proj
