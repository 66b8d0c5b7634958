"""Hugging Face ``Siglip2Model`` folders (``config.json`` with ``model_type: siglip2``), read into and
written from a SigLIP-shaped family model (SigLIP2's open_clip configs: the same towers as SigLIP,
text GELU in its tanh form, Gemma's vocabulary).

``Siglip2Model`` is SiglipModel's network with NaFlex inputs: images arrive as flattened patches
``[B, N, p*p*3]`` (row-major patches, each ``(row, col, channel)``) with their grid
(``spatial_shapes``), the patch embedding is a ``Linear`` and the learned positions ``[n*n, W]`` are
resized (bilinear, antialiased) to each image's grid. At the grid the positions were learned at
(``num_patches = (image_size / patch)^2``) that resize is the identity and the linear patch embedding
is timm's convolution reshaped, so the mapping is exact there; this module is :mod:`.hf_siglip`'s
tensor surgery plus that reshape. Other grids (NaFlex's aspect-preserving resize) are transformers'
computation, not clipforge's: a folder is read at its learned grid only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..families import FamilyCLIP, FamilyConfig
from . import hf_siglip
from .family import openclip_state_dict
from .files import Source

NAME = "hf-siglip2"
PATCH = "vision_model.embeddings.patch_embedding.weight"
CONV = "visual.trunk.patch_embed.proj.weight"


def detect(src: Source) -> bool:
    w = src.state_dict.get(PATCH)
    return hf_siglip.detect(src) and w is not None and w.dim() == 2


def read_config(src: Source, activation: str | None = None) -> FamilyConfig:
    if isinstance(src.declared, FamilyConfig):
        return src.declared
    hf = src.side_json("config.json")
    if hf is None or hf.get("model_type") != "siglip2":
        raise ValueError(f"{src.weights} is in Hugging Face Siglip2Model layout but no config.json with "
                         f"model_type 'siglip2' is beside it")
    v = dict(hf["vision_config"])
    n = int(v.get("num_patches", 256))
    grid = round(n ** 0.5)
    if grid * grid != n:
        raise ValueError(f"{src.folder / 'config.json'}: vision_config.num_patches={n} is not a square grid")
    v["image_size"] = grid * int(v.get("patch_size", 16))  # the grid the positions were learned at
    pre = src.side_json("preprocessor_config.json") or {}
    pre = {k: pre[k] for k in ("image_mean", "image_std", "resample") if k in pre}
    return hf_siglip.config_from_hf({**hf, "vision_config": v}, pre)


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys -> ours: SiglipModel's mapping, the linear patch embedding back to timm's convolution."""
    w = sd[PATCH]
    p = round((w.shape[1] // 3) ** 0.5)
    conv = w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2)  # [W, p*p*3] -> [W, 3, p, p]
    return hf_siglip.to_native({**sd, PATCH: conv})


def from_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> HF keys (the inverse of :func:`to_native`)."""
    out = hf_siglip.from_native(sd)
    conv = sd[CONV]
    out[PATCH] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1).contiguous()  # [W, 3, p, p] -> [W, p*p*3]
    return out


def hf_config(cfg: FamilyConfig, model: FamilyCLIP) -> dict[str, Any]:
    base = hf_siglip.hf_config(cfg, model)
    v = dict(base["vision_config"])
    grid = v.pop("image_size") // v["patch_size"]
    v.update(model_type="siglip2_vision_model", num_patches=grid * grid, num_channels=3)
    t = {**base["text_config"], "model_type": "siglip2_text_model"}
    return {"model_type": "siglip2", "architectures": ["Siglip2Model"], "text_config": t, "vision_config": v}


def write(model: FamilyCLIP, path: str | os.PathLike) -> Path:
    """An HF ``Siglip2Model`` folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    (``Siglip2ImageProcessor`` at the model's patch budget) and the tokenizer files."""
    cfg = model.config
    if not isinstance(model, FamilyCLIP) or not hf_siglip.is_siglip_shaped(cfg):
        raise ValueError(hf_siglip.REFUSAL)
    hf = hf_config(cfg, model)
    pre = {"image_processor_type": "Siglip2ImageProcessor", "do_resize": True, **hf_siglip.image_processor(cfg),
           "patch_size": hf["vision_config"]["patch_size"], "max_num_patches": hf["vision_config"]["num_patches"]}
    return hf_siglip.write_folder(model, path, hf, from_native(openclip_state_dict(model)), pre)
