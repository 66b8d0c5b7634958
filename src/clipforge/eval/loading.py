"""Model loading for evaluation: a checkpoint path (any format ``clipforge.load`` reads), or a
zoo name with ``random_init=True`` for smoke tests (no weights can be downloaded here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch


def load_model(spec: str, *, random_init: bool = False, device: str = "cpu", seed: int = 0,
               dtype: torch.dtype = torch.float32, precision: str = "fp32") -> tuple[Any, Callable, str]:
    """``(model, preprocess, display_name)``; the display name goes into result records. The
    model is prepared for inference (``optimize_for_inference``): evaluation never trains it."""
    from ..inference import optimize_for_inference
    from ..preprocess import image_transform

    if random_init:
        from .. import available_models, create_model

        if not _is_zoo_name(spec):
            raise ValueError(f"--random-init needs a zoo model name, got {spec!r}; available: {', '.join(available_models())}")
        model = optimize_for_inference(create_model(spec, seed=seed).to(device=device, dtype=dtype),
                                       precision=precision)
        return model, image_transform(model.config.preprocess), f"{spec} (random init, seed {seed})"
    if not Path(spec).exists():
        hint = " (a zoo name: add --random-init for an untrained model)" if _is_zoo_name(spec) else ""
        raise FileNotFoundError(f"model checkpoint not found: {spec}{hint}")
    try:
        from .. import load
    except ImportError as e:  # pragma: no cover - the checkpoint loader is part of the full build
        raise ValueError(f"cannot load checkpoints in this build (clipforge.load unavailable: {e})") from None
    model, preprocess = load(spec, device=device, dtype=dtype)
    return optimize_for_inference(model, precision=precision), preprocess, str(spec)


def _is_zoo_name(spec: str) -> bool:
    from .. import get_model_config

    try:
        get_model_config(spec)
    except (KeyError, ValueError):
        return False
    return True
