"""open_clip's SigLIP checkpoints (``ViT-B-16-SigLIP`` and its kin: a timm ``VisionTransformer``
with ``global_pool='map'`` under ``visual.trunk.``, open_clip's ``TextTransformer`` with
``no_causal_mask``, ``pool_type='last'``, ``proj_bias``) onto the native towers of
:mod:`clipforge.models.siglip`, and back.

- :func:`is_siglip_layout` / :func:`is_siglip_model_cfg`: recognise the state dict / the config;
- :func:`config_from_openclip`: ``model_cfg`` (+ shapes) -> :class:`CLIPConfig` with
  ``vision.kind = text.kind = "siglip"``;
- :func:`to_native` / :func:`from_native`: the key renames (timm ``norm1`` / ``attn.qkv`` /
  ``mlp.fc1`` ... -> our ``ln_1`` / ``attn.in_proj_weight`` / ``mlp.c_fc`` ...). Tensors are not
  changed: timm's fused ``qkv`` has ``nn.MultiheadAttention``'s layout, as ours.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig

#: timm ViT block / pool names -> ours (prefix ``visual.trunk.`` -> ``visual.``).
_BLOCK = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
          "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
          "mlp.fc2": "mlp.c_proj"}
_POOL = {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
#: timm model names whose tower this module builds natively (others take the timm route).
NATIVE_TIMM_MODELS = re.compile(r"^vit_(base|large|so400m)_patch(14|16)_siglip_(224|256|384|512)$")


def is_siglip_layout(sd: dict[str, Any]) -> bool:
    return "visual.trunk.attn_pool.latent" in sd and "text.token_embedding.weight" in sd


def is_siglip_model_cfg(model_cfg: dict[str, Any]) -> bool:
    """A SigLIP ``model_cfg`` whose two towers the native modules implement exactly."""
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    return (bool(NATIVE_TIMM_MODELS.match(str(v.get("timm_model_name", "")))) and v.get("timm_pool") == "map"
            and v.get("timm_proj", "none") == "none" and t.get("no_causal_mask") is True
            and t.get("pool_type") == "last" and t.get("proj_bias") is True and not t.get("hf_model_name"))


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip / timm keys -> ours."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual.trunk."):
            k = k[len("visual.trunk."):]
            if k == "pos_embed":
                k, v = "positional_embedding", v.reshape(v.shape[-2], v.shape[-1])  # [1, N, W] -> [N, W]
            elif k.startswith("patch_embed.proj."):
                k = "conv1." + k[len("patch_embed.proj."):]
            elif k.startswith("blocks."):
                i, rest = k[len("blocks."):].split(".", 1)
                k = f"transformer.resblocks.{i}.{_rename(rest, _BLOCK)}"
            elif k.startswith("norm."):
                k = "ln_post." + k[len("norm."):]
            elif k.startswith("attn_pool."):
                k = "attn_pool." + _rename(k[len("attn_pool."):], _POOL)
            k = "visual." + k
        out[k] = v
    return out


def from_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> open_clip / timm's (the inverse of :func:`to_native`)."""
    inv_block = {v: k for k, v in _BLOCK.items()}
    inv_pool = {v: k for k, v in _POOL.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = k[len("visual."):]
            if k == "positional_embedding":
                k, v = "pos_embed", v.unsqueeze(0)
            elif k.startswith("conv1."):
                k = "patch_embed.proj." + k[len("conv1."):]
            elif k.startswith("transformer.resblocks."):
                i, rest = k[len("transformer.resblocks."):].split(".", 1)
                k = f"blocks.{i}.{_rename(rest, inv_block)}"
            elif k.startswith("ln_post."):
                k = "norm." + k[len("ln_post."):]
            elif k.startswith("attn_pool."):
                k = "attn_pool." + _rename(k[len("attn_pool."):], inv_pool)
            k = "visual.trunk." + k
        out[k] = v
    return out


def _blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def config_from_openclip(model_cfg: dict[str, Any], sd: dict[str, torch.Tensor],
                         preprocess: PreprocessConfig | None = None) -> CLIPConfig:
    """The native config of an open_clip SigLIP checkpoint: sizes from the (open_clip-keyed) state
    dict, head counts, norm eps and the logit bias init from ``model_cfg``."""
    try:
        w, p = sd["visual.trunk.patch_embed.proj.weight"].shape[0], sd["visual.trunk.patch_embed.proj.weight"].shape[-1]
        grid = round(sd["visual.trunk.pos_embed"].shape[-2] ** 0.5)
        v_hidden = sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0]
        t_w = sd["text.token_embedding.weight"].shape[1]
        t_hidden = sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = sd["text.text_projection.weight"].shape[0]
        ctx = sd["text.positional_embedding"].shape[0]
        vocab = sd["text.token_embedding.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"SigLIP state dict is missing {e.args[0]!r}") from None
    t_cfg = model_cfg.get("text_cfg", {})
    v_heads = int(model_cfg.get("vision_cfg", {}).get("heads", w // 64))  # timm's SigLIP ViTs: 64-wide heads
    vision = VisionConfig(kind="siglip", image_size=p * grid, width=w, layers=_blocks(sd, "visual.trunk.blocks."),
                          heads=v_heads, patch_size=p, mlp_ratio=v_hidden / w)
    text = TextConfig(kind="siglip", context_length=ctx, vocab_size=vocab, width=t_w, heads=int(t_cfg.get("heads", t_w // 64)),
                      layers=_blocks(sd, "text.transformer.resblocks."), mlp_ratio=t_hidden / t_w)
    pre = preprocess or PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # SigLIP's normalisation
    pre = PreprocessConfig(image_size=vision.image_size, mean=pre.mean, std=pre.std, interpolation=pre.interpolation,
                           resize_mode=pre.resize_mode)
    bias = model_cfg.get("init_logit_bias")
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, activation="gelu",
                      norm_eps=float(t_cfg.get("norm_kwargs", {}).get("eps", 1e-6)),
                      init_logit_bias=None if bias is None else float(bias),
                      preprocess=pre, tokenizer=TokenizerConfig(context_length=ctx))


__all__ = ["is_siglip_layout", "is_siglip_model_cfg", "to_native", "from_native", "config_from_openclip",
           "NATIVE_TIMM_MODELS"]
