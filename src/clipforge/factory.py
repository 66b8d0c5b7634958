"""OpenCLIP's entry point, so scripts written for open_clip run on clipforge with a changed import:

>>> model, preprocess_train, preprocess_val = clipforge.create_model_and_transforms("ViT-B-32", pretrained="ckpt")
>>> tokenizer = clipforge.get_tokenizer("ViT-B-32")

Names are OpenCLIP's or ours (``ViT-B-32`` = ``ViT-B/32``; see :func:`clipforge.config.get_model_config`
for the one difference: our paper models are QuickGELU, OpenCLIP's plain names are GELU, so pass
``activation="gelu"`` to build OpenCLIP's ``ViT-B-32`` itself). Weights are never downloaded:
``pretrained`` is a local checkpoint in any format clipforge reads, or ``local-dir:DIR``. The model
comes from :mod:`clipforge.loading` (plain, as open_clip returns it: ``clipforge.load(..., fast=False)``
or :func:`~clipforge.loading.random_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import CLIPConfig, get_model_config
from .loading import checkpoint_path, load, random_model
from .models import CLIP
from .preprocess import Preprocess, image_transform

LOCAL_DIR = "local-dir:"


def create_model_and_transforms(model_name: str, pretrained: str | os.PathLike | None = None, *,
                                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                                activation: str | None = None, force_quick_gelu: bool = False,
                                seed: int | None = None) -> tuple[CLIP, Preprocess, Preprocess]:
    """``(model, preprocess_train, preprocess_val)`` like ``open_clip.create_model_and_transforms``.

    ``model_name`` may itself be ``local-dir:DIR`` (then ``pretrained`` is ignored, as in open_clip).
    With ``pretrained``, the checkpoint's own config decides (activation, preprocessing) and must
    have the named architecture; without, the model is randomly initialised (``seed``). The model
    is in eval mode; ``preprocess_train`` is OpenCLIP's default augmentation (random resized crop,
    scale 0.9-1.0, bicubic), ``preprocess_val`` the resize + centre crop evaluation transform.
    """
    if force_quick_gelu:
        activation = "quick_gelu"
    if model_name.startswith(LOCAL_DIR):
        model_name, pretrained = "", model_name
    if pretrained is None:
        model = random_model(model_name, activation=activation, seed=seed, device=device, dtype=dtype)
    else:
        path = checkpoint_path(str(pretrained).removeprefix(LOCAL_DIR), random_init_hint="pretrained=None", missing_note=(
            "clipforge never downloads weights (open_clip pretrained tags such as 'openai' are not files)"))
        model, _ = load(path, activation=activation, device=device, dtype=dtype, fast=False)
        if model_name:
            _check_architecture(model.config, get_model_config(model_name), model_name, path)
    pre = model.config.preprocess
    return model, image_transform(pre, train=True), image_transform(pre)


def _check_architecture(got: CLIPConfig, named: CLIPConfig, name: str, path: Path) -> None:
    """open_clip loads weights into the named architecture strictly; refuse a mismatch the same way."""
    a, b = got.to_dict(), named.to_dict()
    diff = [k for k in ("embed_dim", "vision", "text") if a[k] != b[k]]
    if diff:
        raise ValueError(f"{path} is not a {name} checkpoint: {', '.join(f'{k} {a[k]} != {b[k]}' for k in diff)}")
