"""Which open_clip SigLIP configs clipforge's native towers (:mod:`clipforge.models.siglip`) compute
exactly, and their :class:`~clipforge.config.CLIPConfig`. Such a family model is built on the native
towers (no timm; clipforge's fast layer applies); any other config keeps the timm / open_clip towers.

Exactly: timm's ``vit_{base,large,so400m}_patch{14,16}_siglip_{size}`` with the MAP head and no
extra projection, and open_clip's bidirectional last-token text tower with a biased projection; one
activation (the exact GELU) and one LayerNorm eps (1e-6) for both towers, as the native config has a
single ``activation`` / ``norm_eps``. So SigLIP2's configs (tanh GELU in the text tower) stay on timm.
"""

from __future__ import annotations

import re
from ..config import CLIPConfig, TextConfig, TokenizerConfig, VisionConfig
from .config import FamilyConfig

_TIMM = re.compile(r"^vit_(base|large|so400m)_patch(14|16)_siglip_(224|256|384|512)$")
# timm's SigLIP ViTs: width, depth, heads, MLP ratio (as timm states it: int(width * ratio) hidden units).
_SIZES = {"base": (768, 12, 12, 4.0), "large": (1024, 24, 16, 4.0), "so400m": (1152, 27, 16, 3.7362)}
_VISION_KEYS = {"image_size", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "no_causal_mask", "pool_type",
              "proj_bias", "norm_kwargs", "hf_tokenizer_name", "tokenizer_kwargs", "pad_id", "eos_id",
              "output_tokens", "proj_type"}
EPS = 1e-6


def native_siglip_config(config: FamilyConfig) -> CLIPConfig | None:
    """The native config computing this family model exactly, or ``None`` (the timm path)."""
    m = config.model_cfg
    v, t = m.get("vision_cfg", {}), m.get("text_cfg", {})
    match = _TIMM.match(str(v.get("timm_model_name", "")))
    if match is None or set(v) - _VISION_KEYS or set(t) - _TEXT_KEYS or set(m) - {
            "embed_dim", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias", "custom_text",
            "quick_gelu"}:
        return None
    if v.get("timm_pool") != "map" or v.get("timm_proj", "linear") not in ("none", None) or m.get("quick_gelu"):
        return None
    if not (t.get("no_causal_mask") and t.get("pool_type") == "last" and t.get("proj_bias")
            and t.get("proj_type", "linear") == "linear" and (t.get("norm_kwargs") or {}).get("eps") == EPS
            and set(t.get("norm_kwargs") or {}) == {"eps"}):
        return None
    kind, patch, size = match.group(1), int(match.group(2)), int(match.group(3))
    width, depth, heads, ratio = _SIZES[kind]
    if config.vision.image_size != size or config.embed_dim != width:
        return None
    t_width = int(t.get("width", 512))
    ctx = int(t.get("context_length", 77))
    if size % patch:  # timm pads the image (dynamic_img_pad); the native patch embedding does not
        return None
    vision = VisionConfig(kind="siglip", image_size=size, width=width, layers=depth, heads=heads, patch_size=patch,
                          mlp_ratio=ratio)
    text = TextConfig(kind="siglip", context_length=ctx, vocab_size=int(t.get("vocab_size", 49408)), width=t_width,
                      heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
                      mlp_ratio=float(t.get("mlp_ratio", 4.0)))
    bias = config.init_logit_bias
    return CLIPConfig(embed_dim=width, vision=vision, text=text, activation="gelu", norm_eps=EPS,
                      init_logit_scale=config.init_logit_scale, init_logit_bias=bias,
                      max_logit_scale=config.max_logit_scale, preprocess=config.preprocess,
                      tokenizer=TokenizerConfig(context_length=ctx), name=config.name)

