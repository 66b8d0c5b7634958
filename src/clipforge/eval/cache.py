"""Content fingerprints and the on-disk cache location for evaluation artefacts.

Zero-shot heads and extracted features are keyed by a hash of the weights that produced them,
so a cache entry can never be reused for a different (e.g. further fine-tuned) model. Hashing is
a single sha256 pass over the raw tensor bytes (~0.2 s for ViT-B/32's 63M-parameter text tower),
far cheaper than re-running 80k prompts through the tower.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..fast import computes_int8


def default_cache_dir() -> Path:
    """``$CLIPFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipforge``, else ``~/.cache/clipforge``."""
    env = os.environ.get("CLIPFORGE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clipforge"


def state_dict_hash(state: Mapping[str, torch.Tensor], *, extra: Any = None) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of every tensor (sorted by name)."""
    h = hashlib.sha256()
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def _tower(model: nn.Module, attr: str) -> nn.Module:
    tower = getattr(model, attr, None)
    return tower if isinstance(tower, nn.Module) else model


def _int8(tower: nn.Module) -> bool:
    """Whether the tower computes its products in int8 (``optimize_for_inference(precision="int8")``):
    the weights are the fp32 model's, the features are not, so cached features must not be shared."""
    return computes_int8(tower)


def text_tower_fingerprint(model: nn.Module) -> str:
    """Hash of everything that determines ``encode_text``: the text tower's weights (the whole
    module's for models without a ``.text`` tower), the context length and int8 compute."""
    tower = _tower(model, "text")
    extra = {"kind": type(model).__qualname__, "ctx": getattr(model, "context_length", None), "tower": tower is not model}
    return state_dict_hash(tower.state_dict(), extra={**extra, "int8": True} if _int8(tower) else extra)


def image_tower_fingerprint(model: nn.Module, preprocess: Any = None) -> str:
    """Hash of the image tower's weights plus the preprocessing (its ``repr``) and int8 compute."""
    tower = _tower(model, "visual")
    extra = {"kind": type(model).__qualname__, "preprocess": repr(preprocess), "tower": tower is not model}
    return state_dict_hash(tower.state_dict(), extra={**extra, "int8": True} if _int8(tower) else extra)


def json_hash(obj: Any, n: int = 32) -> str:
    """Short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
