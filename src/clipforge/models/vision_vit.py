"""The Vision Transformer image tower of CLIP (Radford et al. 2021, section 2.4)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CLIPConfig
from .layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """Bias-free strided-conv patch embedding, class token, learned positional embedding, the
    extra LayerNorm before the Transformer (``ln_pre``), LayerNorm on the class token, projection."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        v = config.vision
        self.image_size, self.patch_size = v.image_size, v.patch_size
        self.output_dim = config.embed_dim
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        scale = v.width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(v.grid_size ** 2 + 1, v.width))
        self.ln_pre = LayerNorm(v.width, eps=config.norm_eps)
        self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_ratio, config.activation,
                                       config.norm_eps)
        self.ln_post = LayerNorm(v.width, eps=config.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(v.width, config.embed_dim))
        # Patch dropout (FLIP, Li et al. 2023): the fraction of patch tokens dropped per image in
        # training mode; a training option (set by the trainer), not part of the architecture.
        self.patch_dropout = 0.0

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {x.shape[-2]}x{x.shape[-1]} but this model takes "
                f"{self.image_size}x{self.image_size}; use the model's preprocess"
            )

    def embed(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` -> tokens ``[B, 1 + grid^2, width]`` after ``ln_pre``; with
        ``keep`` (patch indices ``[B, K]``) only those patches follow the class token: ``[B, 1 + K, width]``."""
        self._check(x)
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if keep is not None:
            patches = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, W]
            x = torch.cat([x[:, :1], patches], dim=1)
        return self.ln_pre(x)

    def patches_kept(self) -> int:
        """How many of the ``grid^2`` patch tokens patch dropout keeps: ``round((1 - p) * grid^2)``, >= 1."""
        n = (self.image_size // self.patch_size) ** 2
        return max(1, min(n, round((1.0 - self.patch_dropout) * n)))

    def keep_indices(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """The patches each image keeps ``[B, K]`` (ascending), drawn from torch's global RNG of
        ``device`` (so a checkpoint's RNG state makes a resumed run draw the same), or None when
        patch dropout is off: eval mode, or ``patch_dropout == 0``."""
        if not (self.training and self.patch_dropout > 0):
            return None
        n = (self.image_size // self.patch_size) ** 2
        order = torch.rand(batch, n, device=device).argsort(dim=1)  # a random permutation per image
        return order[:, :self.patches_kept()].sort(dim=1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, E]
        x = self.transformer(self.embed(x, self.keep_indices(x.shape[0], x.device)))  # [B, 1 + K, W]
        return self.ln_post(x[:, 0]) @ self.proj  # the class token, projected

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False) -> dict[str, object]:
        """Per-layer tokens ``[B, 1+G*G, W]`` (class token first) and, if asked, attention maps
        ``[B, H, 1+G*G, 1+G*G]``; ``grid`` gives G for reshaping patch tokens into a map."""
        x, tokens, maps = self.transformer.forward_intermediates(self.embed(x), attention=attention)
        out = self.ln_post(x[:, 0]) @ self.proj
        return {"tokens": tokens, "attentions": maps, "grid": self.image_size // self.patch_size,
                "output": out}
