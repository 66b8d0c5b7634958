"""The one way to get a model ready for inference: a checkpoint (any format ``clipforge.load``
reads) or, only when asked for explicitly, a named architecture with random weights.

Evaluation, search, curation and the CLI all load through :func:`load_for_inference`, so every
command gets the same checks, the same device/precision vocabulary (:mod:`clipforge.device`) and
the same fast paths (:func:`clipforge.inference.optimize_for_inference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .checkpoints import load
from .config import available_models, get_model_config
from .device import inference_precision, resolve_device
from .inference import optimize_for_inference
from .models import CLIP, create_model
from .preprocess import image_transform


def is_architecture_name(spec: str) -> bool:
    """Whether ``spec`` names a built-in architecture (case-insensitive; '/' or '-')."""
    try:
        get_model_config(str(spec))
    except (KeyError, ValueError):
        return False
    return True


def load_for_inference(path_or_arch: str | Path, *, device: str = "cpu", precision: str = "fp32",
                       random_init: bool = False, seed: int | None = None, trust_torchscript: bool = False
                       ) -> tuple[CLIP, Callable[..., torch.Tensor]]:
    """``(model, preprocess)``: eval mode, no gradients, on ``device``, cast to ``precision``
    (``fp32`` | ``bf16`` | ``fp16`` | ``pure_bf16`` | ``pure_fp16`` | ``auto``) with the inference fast paths on.

    ``path_or_arch`` is a checkpoint path; with ``random_init=True`` it must instead be an
    architecture name, built with random weights (``seed`` makes them reproducible). An
    architecture name *without* ``random_init`` is refused: ``"ViT-B/32"`` typed by mistake must
    not silently give an untrained model (clipforge never downloads weights).
    """
    spec = str(path_or_arch)
    cast = inference_precision(precision)
    dev = resolve_device(device)
    if random_init:
        if not is_architecture_name(spec):
            raise ValueError(f"random_init (--random-init) needs an architecture name, got {spec!r}; "
                             f"available: {', '.join(available_models())}")
        model = create_model(spec, seed=seed).to(dev)
        preprocess = image_transform(model.config.preprocess)
    else:
        if not Path(spec).exists():
            if is_architecture_name(spec):
                raise ValueError(f"{spec!r} is an architecture name, not a checkpoint, and clipforge never downloads "
                                 "weights: pass a local checkpoint path, or random_init=True (--random-init) for an "
                                 "untrained model")
            raise FileNotFoundError(f"model checkpoint not found: {spec}")
        model, preprocess = load(spec, device=dev, trust_torchscript=trust_torchscript)
    return optimize_for_inference(model, precision=cast), preprocess


def model_label(path_or_arch: str | Path, *, random_init: bool = False, seed: int | None = None) -> str:
    """How results name the model: the checkpoint path as given, or ``NAME (random init, seed S)``."""
    if random_init:
        return f"{path_or_arch} (random init" + (f", seed {seed})" if seed is not None else ")")
    return str(path_or_arch)


__all__ = ["load_for_inference", "model_label", "is_architecture_name"]
