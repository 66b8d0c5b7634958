"""open_clip's own ViT image tower for the families that do not use timm: OpenAI's ViT (our
:class:`~clipforge.models.VisionTransformer`, e.g. beside an XLM-R text tower) and CoCa's, whose
class token is replaced by an attentional pooler (256 learned queries over the patch tokens; the
contrastive embedding is the first query's output)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import CLIPConfig, TextConfig, VisionConfig
from ..models.layers import LayerNorm
from ..models.vision_vit import VisionTransformer


def vit_config(vision_cfg: dict[str, Any], embed_dim: int, quick_gelu: bool) -> CLIPConfig:
    """The :class:`CLIPConfig` whose image tower is this open_clip ``vision_cfg`` (the text part unused)."""
    v = vision_cfg
    width = int(v.get("width", 768))
    size = v.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    if not isinstance(v.get("layers", 12), int):
        raise ValueError(f"vision_cfg.layers={v['layers']!r}: open_clip's ModifiedResNet towers load through "
                         f"clipforge's own CLIP, not as a family")
    vision = VisionConfig(kind="vit", image_size=size, width=width, layers=int(v.get("layers", 12)),
                          heads=width // int(v.get("head_width", 64)), patch_size=int(v.get("patch_size", 16)),
                          mlp_ratio=float(v.get("mlp_ratio", 4.0)))
    pre = {"image_size": size}
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=TextConfig(), preprocess=pre,  # type: ignore[arg-type]
                      activation="quick_gelu" if quick_gelu else "gelu")


class AttentionalPooler(nn.Module):
    """Learned queries ``[Q, E]`` attending over the tokens ``[B, N, W]`` -> ``[B, Q, E]`` (open_clip's names)."""

    def __init__(self, d_model: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = LayerNorm(d_model)
        self.ln_k = LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class CoCaVisionTransformer(VisionTransformer):
    """OpenAI's ViT whose output is pooled by :class:`AttentionalPooler` (open_clip's original CoCa
    layout: pool, then ``ln_post``, then the first query projected)."""

    def __init__(self, config: CLIPConfig, vision_cfg: dict[str, Any]) -> None:
        super().__init__(config)
        e, w = config.embed_dim, config.vision.width
        self.attn_pool = AttentionalPooler(e, w, int(vision_cfg.get("attn_pooler_heads", 8)),
                                           int(vision_cfg.get("attn_pooler_queries", 256)))
        self.ln_post = LayerNorm(e, eps=config.norm_eps)
        self.proj = nn.Parameter(e ** -0.5 * torch.randn(e, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, E]
        x = self.ln_post(self.attn_pool(self.transformer(self.embed(x))))  # [B, Q, E]
        return x[:, 0] @ self.proj

    def forward_intermediates(self, x: torch.Tensor, attention: bool = False) -> dict[str, object]:
        x, tokens, maps = self.transformer.forward_intermediates(self.embed(x), attention=attention)
        out = self.ln_post(self.attn_pool(x))[:, 0] @ self.proj
        return {"tokens": tokens, "attentions": maps, "grid": self.image_size // self.patch_size, "output": out}


def build_vit(vision_cfg: dict[str, Any], embed_dim: int, quick_gelu: bool) -> VisionTransformer:
    cfg = vit_config(vision_cfg, embed_dim, quick_gelu)
    pool = vision_cfg.get("attentional_pool", False)
    if pool is True:
        return CoCaVisionTransformer(cfg, vision_cfg)
    if pool:
        raise ValueError(f"vision_cfg.attentional_pool={pool!r} is not supported (CoCa's original pooler only)")
    if vision_cfg.get("pool_type", "tok") != "tok":
        raise ValueError(f"vision_cfg.pool_type={vision_cfg['pool_type']!r} is not supported (only 'tok')")
    return VisionTransformer(cfg)
