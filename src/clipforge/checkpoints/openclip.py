"""OpenCLIP checkpoints: its ``CLIP`` class uses OpenAI's parameter names, so the weights map
through :mod:`.openai`; what OpenCLIP adds is a config JSON (``open_clip_config.json`` or a
model-config file) that records the activation and preprocessing the shapes cannot tell.

:func:`write` to a folder produces what ``open_clip.create_model_and_transforms("local-dir:DIR")``
reads (open_clip 3.x ``factory.py``): ``open_clip_config.json`` with ``model_cfg`` and
``preprocess_cfg``, and the weights as ``open_clip_model.safetensors``, the first name its
``_find_checkpoint_in_dir`` prefers. A file target gets a self-describing weights file instead
(no sidecar that open_clip could pair with the wrong weights).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..config import OPENAI_MEAN, OPENAI_STD, CLIPConfig, PreprocessConfig
from ..models import CLIP
from ..utils.io import atomic_open, atomic_write_text
from . import openai
from .files import Source, contrastive_only, native_state_dict, write_safetensors

NAME = "openclip"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
to_native = openai.to_native
from_native = openai.from_native

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


def parse_openclip_config(d: dict[str, Any], source: str = "OpenCLIP config"
                          ) -> tuple[str, PreprocessConfig | None, dict[str, Any]]:
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


def detect(src: Source) -> bool:
    return openai.is_openai_layout(src.state_dict) and isinstance(src.declared, dict) \
        and is_openclip_config(src.declared)


def read_config(src: Source, activation: str | None = None) -> CLIPConfig:
    """Shapes give the sizes; the OpenCLIP config gives activation, preprocessing and head counts."""
    assert isinstance(src.declared, dict)
    act, pre, model_cfg = parse_openclip_config(src.declared, src.declared_from)
    cfg = openai.infer_config(src.state_dict, activation=act, preprocess=pre)
    # Head counts are invisible in tensor shapes; OpenCLIP configs state them.
    d = cfg.to_dict()
    if d["vision"]["kind"] == "vit":
        d["vision"]["heads"] = d["vision"]["width"] // int(model_cfg.get("vision_cfg", {}).get("head_width", 64))
    d["text"]["heads"] = int(model_cfg.get("text_cfg", {}).get("heads", d["text"]["heads"]))
    if model_cfg.get("init_logit_bias") is not None:  # the init the config states (the learned value is in the weights)
        d["init_logit_bias"] = float(model_cfg["init_logit_bias"])
    return CLIPConfig.from_dict(d)


def model_cfg(cfg: CLIPConfig) -> dict[str, Any]:
    """The ``model_cfg`` OpenCLIP builds this architecture from (``open_clip.CLIP(**model_cfg)``)."""
    if not math.isclose(cfg.norm_eps, 1e-5):
        raise ValueError(f"norm_eps={cfg.norm_eps} cannot be expressed in an OpenCLIP config (always 1e-5)")
    v = cfg.vision
    if v.kind == "resnet":
        vision: dict[str, Any] = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width}  # type: ignore[arg-type]
    else:
        vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
                  "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}
    t = cfg.text
    out = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.activation == "quick_gelu", "vision_cfg": vision,
           "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                        "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}}
    if cfg.init_logit_bias is not None:  # open_clip's CLIP then has a ``logit_bias`` parameter
        out["init_logit_bias"] = cfg.init_logit_bias
    return out


def config_json(cfg: CLIPConfig) -> dict[str, Any]:
    """``open_clip_config.json`` as OpenCLIP's hub configs have it: ``model_cfg`` + ``preprocess_cfg``."""
    p = cfg.preprocess
    return {"model_cfg": model_cfg(cfg),
            "preprocess_cfg": {"mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
                               "resize_mode": p.resize_mode}}


def write(model: CLIP, path: str | os.PathLike) -> Path:
    """A folder (``path`` without a suffix) for open_clip's ``local-dir:``; or one weights file
    (``.safetensors`` with our config in its metadata, ``.pt``/``.bin``/``.pth`` as
    ``{"state_dict": ..., "config": ...}``) for open_clip's ``pretrained=FILE``."""
    contrastive_only(model, "OpenCLIP")
    path = Path(path)
    cfg = model.config
    oc = config_json(cfg)  # validates before anything is written
    sd = from_native(native_state_dict(model))
    if path.is_dir() or not path.suffix:
        write_safetensors(path / WEIGHTS_NAME, sd, {"format": "pt"})
        atomic_write_text(path / CONFIG_NAME, json.dumps(oc, indent=2))
        return path
    if path.suffix == ".safetensors":
        write_safetensors(path, sd, {"format": "pt", "clipforge_config": cfg.to_json(indent=None)})
    elif path.suffix in (".pt", ".bin", ".pth"):
        with atomic_open(path, "wb") as f:  # open_clip's load_state_dict unwraps "state_dict"
            torch.save({"state_dict": sd, "config": cfg.to_dict()}, f)
    else:
        raise ValueError(f"{path}: unknown suffix {path.suffix!r} for an OpenCLIP checkpoint "
                         f"(a folder, .safetensors, .pt, .bin or .pth)")
    return path
