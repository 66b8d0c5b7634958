"""clipforge: a faithful, fast, from-scratch implementation of CLIP (Radford et al. 2021)."""

from __future__ import annotations

from .config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig, available_models, get_model_config
from .models import CLIP, create_model

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CLIPConfig", "VisionConfig", "TextConfig", "PreprocessConfig", "TokenizerConfig",
    "available_models", "get_model_config", "create_model", "__version__",
]
