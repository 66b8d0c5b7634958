"""OpenCLIP's entry point, so scripts written for open_clip run on clipforge with a changed import:

>>> model, preprocess_train, preprocess_val = clipforge.create_model_and_transforms("ViT-B-32", pretrained="ckpt")
>>> tokenizer = clipforge.get_tokenizer("ViT-B-32")

Names are OpenCLIP's or ours (``ViT-B-32`` = ``ViT-B/32``; see :func:`clipforge.config.get_model_config`
for the one difference: our paper models are QuickGELU, OpenCLIP's plain names are GELU, so pass
``activation="gelu"`` to build OpenCLIP's ``ViT-B-32`` itself). Weights are never downloaded:
``pretrained`` is a local checkpoint in any format clipforge reads, or ``local-dir:DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints import load_model
from .config import CLIPConfig, get_model_config
from .models import CLIP, create_model
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
        config = get_model_config(model_name)
        if activation is not None:
            config = CLIPConfig.from_dict({**config.to_dict(), "activation": activation})
        model = create_model(config, seed=seed).to(device=device, dtype=dtype).eval()
    else:
        path = Path(str(pretrained).removeprefix(LOCAL_DIR))
        if not path.exists():
            raise FileNotFoundError(f"pretrained={str(pretrained)!r} is not a local checkpoint; clipforge never "
                                    f"downloads weights (open_clip tags such as 'openai' are not files)")
        model = load_model(path, activation=activation, device=device, dtype=dtype)
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
