"""The CLIP model as the paper and OpenAI's released code compute it: pure torch, no I/O, no
training concerns, no fast paths (those are ``clipforge.fast``, a layer over these modules)."""

from __future__ import annotations

import torch

from ..config import CLIPConfig, get_model_config
from .clip import CLIP, DualEncoder
from .heads import BagOfWordsCLIP, CaptioningCLIP, model_class, objective_of, with_objective
from .text import TextTransformer
from .vision_resnet import ModifiedResNet
from .vision_vit import VisionTransformer


def create_model(name_or_config: str | CLIPConfig, *, seed: int | None = None) -> CLIP:
    """Build a randomly initialised model from a zoo name (``'ViT-B/32'``) or a :class:`CLIPConfig`
    (of the class its ``objective`` names: :class:`CLIP`, :class:`BagOfWordsCLIP`, :class:`CaptioningCLIP`).

    ``seed`` makes the initialisation reproducible without touching the global RNG state.
    """
    config = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    cls = model_class(config)
    if seed is None:
        return cls(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


__all__ = ["CLIP", "DualEncoder", "BagOfWordsCLIP", "CaptioningCLIP", "model_class", "objective_of", "with_objective", "TextTransformer", "VisionTransformer", "ModifiedResNet", "create_model"]
