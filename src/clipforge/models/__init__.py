"""The CLIP model as the paper and OpenAI's released code compute it: pure torch, no I/O, no
training concerns, no fast paths (those are ``clipforge.fast``, a layer over these modules)."""

from __future__ import annotations

import torch

from ..config import CLIPConfig, get_model_config
from .clip import CLIP
from .text import TextTransformer
from .vision_resnet import ModifiedResNet
from .vision_vit import VisionTransformer


def create_model(name_or_config: str | CLIPConfig, *, seed: int | None = None) -> CLIP:
    """Build a randomly initialised model from a zoo name (``'ViT-B/32'``) or a :class:`CLIPConfig`.

    ``seed`` makes the initialisation reproducible without touching the global RNG state.
    """
    config = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is None:
        return CLIP(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(config)


__all__ = ["CLIP", "TextTransformer", "VisionTransformer", "ModifiedResNet", "create_model"]
