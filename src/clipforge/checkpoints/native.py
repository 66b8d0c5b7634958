"""clipforge's own format: safetensors with the model config in the file's metadata (one file),
or a folder with ``model.safetensors`` + ``config.json``; training checkpoints
(``{"model": state_dict, "config": {...}}``) read the same way. Keys are our parameter names."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import CLIPConfig
from ..models import CLIP
from ..utils.io import atomic_write_text
from .files import Source, native_state_dict, write_safetensors

NAME = "clipforge"


def detect(src: Source) -> bool:
    keys = src.state_dict
    return any(k.startswith("text.") for k in keys) and any(k.startswith("visual.") for k in keys)


def read_config(src: Source, activation: str | None = None) -> CLIPConfig:
    if isinstance(src.declared, CLIPConfig):
        return src.declared
    if isinstance(src.declared, dict) and "embed_dim" in src.declared and "vision" in src.declared:
        return CLIPConfig.from_dict(src.declared)
    raise ValueError(f"{src.weights} is a clipforge state dict without its config "
                     f"(no metadata, no config.json beside it)")


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
    if path.suffix == ".safetensors":
        write_safetensors(path, sd, meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", sd, meta)
    atomic_write_text(path / "config.json", model.config.to_json())
    return path
