"""SigLIP's towers (Zhai et al. 2023, as released in big_vision and run by timm / open_clip's
``ViT-B-16-SigLIP``), built from the same blocks as CLIP's (:mod:`.layers`).

Image (``vision.kind="siglip"``): patch embedding with a bias, learned positional embedding and
*no* class token, the pre-LN Transformer, a final LayerNorm, then a multihead attention-pooling
(MAP) head: one learned probe attends over all patch tokens, followed by a residual MLP (timm's
``AttentionPoolLatent``). The pooled vector is the embedding (no projection: ``embed_dim`` is the width).
Text (``text.kind="siglip"``): token + position embeddings, a *bidirectional* Transformer, final
LayerNorm, the state at the last position (the context is always padded to its full length), a
projection with a bias.

Parameter names are ours (``conv1``, ``transformer.resblocks.N.attn.in_proj_weight``, ``mlp.c_fc``);
:mod:`clipforge.checkpoints.siglip` maps timm / open_clip's names onto them.
Shapes: B batch, G grid, N = G*G patches, W width, H heads, E embed_dim, L context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig
from .layers import MLP, LayerNorm, Transformer


class AttentionPool(nn.Module):
    """MAP head: a learned probe ``[1, 1, W]`` queries the tokens (separate query and fused
    key/value projections, as timm's ``AttentionPoolLatent``), then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, norm_eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, W] -> [B, W]
        b, n, w = x.shape
        hd = w // self.heads
        q = self.q(self.latent.to(x.dtype)).view(1, self.heads, 1, hd).expand(b, -1, -1, -1)  # [B, H, 1, hd]
        kv = self.kv(x).view(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [2, B, H, N, hd]
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [B, H, 1, hd]
        out = self.proj(out.reshape(b, w))  # [B, W]
        return out + self.mlp(self.norm(out))


class SigLIPVisionTransformer(nn.Module):
    """Patch embedding (with bias) + positional embedding, Transformer, LayerNorm, MAP head."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        v = config.vision
        if config.embed_dim != v.width:
            raise ValueError(f"a siglip image tower outputs its width ({v.width}); embed_dim is {config.embed_dim}")
        self.image_size, self.patch_size = v.image_size, v.patch_size
        self.output_dim = v.width
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=True)
        self.positional_embedding = nn.Parameter(torch.randn(v.grid_size ** 2, v.width) * 0.02)
        self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_ratio, config.activation, config.norm_eps)
        self.ln_post = LayerNorm(v.width, eps=config.norm_eps)
        self.attn_pool = AttentionPool(v.width, v.heads, v.mlp_ratio, config.activation, config.norm_eps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, S, S]`` -> tokens ``[B, N, W]``."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be [batch, 3, {self.image_size}, {self.image_size}], got shape "
                             f"{tuple(x.shape)}; use the model's preprocess")
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, W]
        return x + self.positional_embedding.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, W]
        return self.attn_pool(self.ln_post(self.transformer(self.embed(x))))

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Per-layer patch tokens ``[B, N, W]`` (no class token), attention maps if asked, the output."""
        x, tokens, maps = self.transformer.forward_intermediates(self.embed(x), attention=attention)
        return {"tokens": tokens, "attentions": maps, "grid": self.image_size // self.patch_size,
                "output": self.attn_pool(self.ln_post(x))}


class SigLIPTextTransformer(nn.Module):
    """Token + position embeddings, bidirectional Transformer, LayerNorm, last position, projection."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        t = config.text
        self.context_length, self.vocab_size = t.context_length, t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.randn(t.context_length, t.width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.activation, config.norm_eps)
        self.ln_final = LayerNorm(t.width, eps=config.norm_eps)
        self.text_projection = nn.Linear(t.width, config.embed_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, L]`` (``L`` = the context length: the pooled position is the last) -> ``[B, L, W]``."""
        if ids.dim() != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"text ids must be [batch, {self.context_length}] (padded to the context: the "
                             f"last position is pooled), got shape {tuple(ids.shape)}")
        dtype = self.text_projection.weight.dtype
        return self.token_embedding(ids).to(dtype) + self.positional_embedding.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, E]
        x = self.ln_final(self.transformer(self.embed(ids)))
        return self.text_projection(x[:, -1])

    def forward_intermediates(self, ids: torch.Tensor, attention: bool = False) -> dict[str, object]:
        x, tokens, maps = self.transformer.forward_intermediates(self.embed(ids), attention=attention)
        return {"tokens": tokens, "attentions": maps, "output": self.text_projection(self.ln_final(x[:, -1]))}


__all__ = ["AttentionPool", "SigLIPVisionTransformer", "SigLIPTextTransformer"]
