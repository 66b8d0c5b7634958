"""clipforge: a faithful, fast, from-scratch implementation of CLIP (Radford et al. 2021).

>>> import clipforge
>>> model, preprocess = clipforge.load("path/to/checkpoint")   # OpenAI, OpenCLIP, HF or ours
>>> model = clipforge.create_model("ViT-B/32")                  # random init, any named architecture
>>> tokens = clipforge.tokenize(["a photo of a dog"])           # LongTensor [1, 77]
"""

from __future__ import annotations

from .checkpoints import convert, load_model, save_model
from .config import (CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig,
                     available_models, get_model_config)
from .factory import create_model_and_transforms
from .fast import set_backend
from .inference import embed_images, embed_texts
from .loading import load
from .longtext import encode_text_long
from .models import CLIP, create_model
from .preprocess import ImageLoadError, image_transform, load_image
from .tokenizer import LongTextWarning, TextWindows, decode, get_tokenizer, tokenize

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "ZeroShotClassifier":
        from .eval import ZeroShotClassifier  # capabilities load on first use: `import clipforge` stays light

        return ZeroShotClassifier
    if name in ("train", "TrainConfig"):
        import importlib

        return getattr(importlib.import_module("clipforge.training"), name)
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")


__all__ = [
    "CLIP", "CLIPConfig", "VisionConfig", "TextConfig", "PreprocessConfig", "TokenizerConfig",
    "available_models", "get_model_config", "create_model", "create_model_and_transforms", "load", "load_model",
    "save_model", "convert",
    "tokenize", "decode", "get_tokenizer", "image_transform", "load_image", "ImageLoadError",
    "embed_images", "embed_texts", "encode_text_long", "TextWindows", "LongTextWarning", "set_backend",
    "ZeroShotClassifier", "train", "TrainConfig", "__version__",
]
