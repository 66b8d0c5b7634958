"""Fast SigLIP towers (:mod:`clipforge.models.siglip`). Their Transformers, MLPs and linears are the
shared fast modules (swapped in by ``enable``: oneDNN products, packed weights, bf16 autocast
products with an fp32 attention core); what is SigLIP-specific: the text tower is pooled at the
last position, so its last block runs for that row alone (exact, bidirectional or not: the row
attends over all keys); the ViT's patch embedding is one product over flattened patches and
inference batches run in chunks. No padding is trimmed: the text attention is bidirectional, so
every padded position changes the pooled state."""

from __future__ import annotations

import torch

from ..models.siglip import SigLIPTextTransformer, SigLIPVisionTransformer
from .backend import linear, tracing
from .linear import cached_pack, pack_weight, packed_linear
from .transformer import FastTransformer, Packing


class FastSigLIPText(SigLIPTextTransformer):
    transformer: FastTransformer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        x = self.embed(ids)
        last = torch.full((x.shape[0],), x.shape[1] - 1, dtype=torch.long, device=x.device)
        return self.text_projection(self.ln_final(self.transformer.forward_pooled(x, last)))


class FastSigLIPVision(Packing, SigLIPVisionTransformer):
    transformer: FastTransformer
    inference_chunk_tokens: int = 1600  # as the CLIP ViT's (fast.vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, W]
        chunk = max(1, self.inference_chunk_tokens // (self.image_size // self.patch_size) ** 2)
        if x.shape[0] > chunk and not torch.is_grad_enabled() and not tracing():
            return torch.cat([super(FastSigLIPVision, self).forward(part) for part in x.split(chunk)])
        return super().forward(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """As the plain ``embed``, the convolution as a product over flattened patches."""
        if tracing():
            return super().embed(x)
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            return super().embed(x)  # the plain error message
        w, bias = self.conv1.weight, self.conv1.bias  # [W, 3, p, p], [W]
        b, p, g = x.shape[0], self.patch_size, self.image_size // self.patch_size
        x = x.to(w.dtype).reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        if self.packing(w):
            x = packed_linear(x, cached_pack(self, "patch", (w,), lambda: pack_weight(w.flatten(1))), bias)
        else:
            x = linear(x, w.flatten(1), bias)  # [B, N, W]
        return x + self.positional_embedding.to(x.dtype)

    def train(self, mode: bool = True) -> "FastSigLIPVision":
        if mode:
            self.drop_packed()
        return super().train(mode)
