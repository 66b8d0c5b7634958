"""clipforge's own format: safetensors with the model config in the file's metadata (one file),
or a folder with ``model.safetensors`` + ``config.json``; training checkpoints
(``{"model": state_dict, "config": {...}}``) read the same way. Keys are our parameter names."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import CLIPConfig
from ..families import FamilyCLIP, FamilyConfig, is_family_dict
from ..models import CLIP
from ..utils.io import atomic_write_text
from .files import Source, native_state_dict, write_safetensors
from .family import copy_tokenizer

NAME = "clipforge"


def detect(src: Source) -> bool:
    keys = src.state_dict
    return any(k.startswith("text.") for k in keys) and any(k.startswith("visual.") for k in keys)


def read_config(src: Source, activation: str | None = None) -> CLIPConfig | FamilyConfig:
    if isinstance(src.declared, (CLIPConfig, FamilyConfig)):
        return src.declared
    if is_family_dict(src.declared):
        return FamilyConfig.from_dict(src.declared)  # type: ignore[arg-type]
    if isinstance(src.declared, dict) and "embed_dim" in src.declared and "vision" in src.declared:
        return CLIPConfig.from_dict(src.declared)
    if src.declared is not None:
        keys = ", ".join(sorted(src.declared)[:6]) if isinstance(src.declared, dict) else type(src.declared).__name__
        raise ValueError(f"{src.weights}: the config in {src.declared_from} is not one clipforge recognises "
                         f"(keys: {keys}); expected clipforge's config.json or open_clip's open_clip_config.json")
    raise ValueError(f"{src.weights}: not a checkpoint clipforge recognises: no config embedded and none beside it "
                     f"(config.json, open_clip_config.json); pass config=... if it is a clipforge state dict")


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return sd


def from_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return sd


def write(model: CLIP, path: str | os.PathLike) -> Path:
    """``*.safetensors`` (config in the metadata) or a folder with ``model.safetensors`` + ``config.json``,
    written atomically."""
    path = Path(path)
    sd = native_state_dict(model)
    meta = {"format": "clipforge", "clipforge_config": model.config.to_json(indent=None)}
    tokenizer_folder = getattr(getattr(model, "tokenizer", None), "folder", None)
    if path.suffix == ".safetensors" and tokenizer_folder is not None:
        raise ValueError(f"{path}: this model's tokenizer is a set of files, so it is saved as a folder "
                         f"(a path without .safetensors)")
    if path.suffix == ".safetensors":
        write_safetensors(path, sd, meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, FamilyCLIP):
        copy_tokenizer(model, path)
    write_safetensors(path / "model.safetensors", sd, meta)
    atomic_write_text(path / "config.json", model.config.to_json())
    return path
