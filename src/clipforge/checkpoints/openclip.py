"""OpenCLIP checkpoints: its ``CLIP`` class uses OpenAI's parameter names, so the weights map
through :mod:`.openai`; what OpenCLIP adds is a config JSON (``open_clip_config.json`` or a
model-config file) that records the activation and preprocessing the shapes cannot tell."""

from __future__ import annotations

from typing import Any

from ..config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig

# OpenCLIP options we implement with their default meaning; anything else set to a
# non-default value changes the architecture and is refused rather than silently ignored.
_UNSUPPORTED_VISION = {
    "timm_model_name": None, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "final_ln_after_pool": False, "output_tokens": False, "patch_dropout": 0.0,
}
_UNSUPPORTED_TEXT = {
    "hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "proj_bias": False, "final_ln_after_pool": False,
}


def is_openclip_config(d: dict[str, Any]) -> bool:
    return "model_cfg" in d or ("vision_cfg" in d and "text_cfg" in d)


def parse_openclip_config(d: dict[str, Any], source: str = "OpenCLIP config") -> tuple[str, PreprocessConfig | None, dict[str, Any]]:
    """-> (activation, preprocess config or None, model_cfg). Raises on unsupported options."""
    model_cfg = d.get("model_cfg", d)
    for key, default in _UNSUPPORTED_VISION.items():
        val = model_cfg.get("vision_cfg", {}).get(key, default)
        if val not in (default, None) and val != default:
            raise ValueError(f"{source}: vision_cfg.{key}={val!r} is not supported by clipforge")
    for key, default in _UNSUPPORTED_TEXT.items():
        val = model_cfg.get("text_cfg", {}).get(key, default)
        if val not in (default, None) and val != default:
            raise ValueError(f"{source}: text_cfg.{key}={val!r} is not supported by clipforge")
    pool = model_cfg.get("text_cfg", {}).get("pool_type", "argmax")
    if pool != "argmax":
        raise ValueError(f"{source}: text_cfg.pool_type={pool!r} is not supported (only 'argmax')")
    vpool = model_cfg.get("vision_cfg", {}).get("pool_type", "tok")
    if vpool != "tok":
        raise ValueError(f"{source}: vision_cfg.pool_type={vpool!r} is not supported (only 'tok')")
    if model_cfg.get("init_logit_bias") is not None:
        raise ValueError(f"{source}: SigLIP-style logit_bias models are not supported")
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    pre = None
    p = d.get("preprocess_cfg")
    if p:
        mode = p.get("resize_mode", "shortest")
        pre = PreprocessConfig(
            image_size=model_cfg.get("vision_cfg", {}).get("image_size", 224),
            mean=tuple(p.get("mean", OPENAI_MEAN)), std=tuple(p.get("std", OPENAI_STD)),
            interpolation=p.get("interpolation", "bicubic"),
            resize_mode="squash" if mode == "squash" else "shortest",
        )
    return activation, pre, model_cfg
