"""An image classifier made of a CLIP model and a linear head on its normalised image embedding.

The head of the zero-shot classifier is exactly such a layer: weight = unit class embeddings
(prompt ensemble, :func:`clipforge.eval.build_zeroshot_weights`) x exp(logit_scale), bias 0. So
a fine-tuning run that starts from it starts from the zero-shot model itself (LP-FT / FLYP's
observation: a head initialised this way does not wreck the features in the first steps), and
zero-shot and fine-tuned classifiers share one parameter space, which WiSE-FT interpolates.

On disk a classifier is a folder: ``model.safetensors`` (the whole CLIP, readable by
``clipforge.load``) + ``head.safetensors`` (weight, bias, class names, templates, recipe).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .. import loading
from ..checkpoints import save_model
from ..eval import build_zeroshot_weights
from ..models import CLIP, objective_of
from ..utils import atomic_write_bytes

HEAD_FILE = "head.safetensors"
MODEL_FILE = "model.safetensors"
HEAD_FORMAT = 1


@torch.no_grad()
def zeroshot_head_weight(model: CLIP, classnames: Sequence[Any], templates: Sequence[str],
                         batch_size: int = 256) -> torch.Tensor:
    """``[C, D]`` zero-shot head weight: unit class embeddings x exp(logit_scale)."""
    objective = objective_of(model)
    if objective != "contrastive":  # no text embeddings aligned with the images to start from
        raise ValueError(f"fine-tuning starts from the contrastive zero-shot head; this model was trained with "
                         f"objective {objective!r}")
    was_training = model.training
    try:
        w = build_zeroshot_weights(model, list(classnames), list(templates), batch_size=batch_size)
    finally:
        model.train(was_training)
    return model.logit_scale.detach().float().exp().cpu() * w


class ImageClassifier(nn.Module):
    """``logits = head(normalize(clip.encode_image(x)))``; ``clip`` keeps its text tower (FLYP
    trains it, WiSE-FT interpolates it, and the saved model stays a complete CLIP)."""

    def __init__(self, clip: CLIP, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 classnames: Sequence[Any] = (), templates: Sequence[str] = (), recipe: str = "ce") -> None:
        super().__init__()
        c, d = weight.shape
        if d != clip.config.embed_dim:
            raise ValueError(f"head weight has dim {d}, the model's embedding has {clip.config.embed_dim}")
        if classnames and len(classnames) != c:
            raise ValueError(f"head has {c} classes but {len(classnames)} class names were given")
        self.clip = clip
        self.head = nn.Linear(d, c)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(torch.zeros(c) if bias is None else bias)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.recipe = recipe

    @classmethod
    def zeroshot(cls, clip: CLIP, classnames: Sequence[Any], templates: Sequence[str], *,
                 recipe: str = "ce", batch_size: int = 256) -> "ImageClassifier":
        """The zero-shot classifier of ``clip`` as an :class:`ImageClassifier`."""
        w = zeroshot_head_weight(clip, classnames, templates, batch_size)
        return cls(clip, w, None, classnames=classnames, templates=templates, recipe=recipe).to(clip.device)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def refresh_head(self, batch_size: int = 256) -> None:
        """Set the head to the zero-shot head of the current text tower (FLYP's classifier)."""
        w = zeroshot_head_weight(self.clip, self.classnames, self.templates, batch_size)
        self.head.weight.copy_(w.to(self.head.weight))
        self.head.bias.zero_()

    # --- files ---------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "classnames": self.classnames, "templates": self.templates,
                "recipe": self.recipe}

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``folder/model.safetensors`` and ``folder/head.safetensors`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.clip, folder / MODEL_FILE)
        data = safetensors_bytes({"weight": self.head.weight.detach().float().contiguous().cpu(),
                     "bias": self.head.bias.detach().float().contiguous().cpu()},
                    metadata={"clipforge_finetune_head": json.dumps({**self.meta(), **(extra or {})})})
        atomic_write_bytes(folder / HEAD_FILE, data)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ImageClassifier":
        """Read a folder written by :meth:`save`."""
        folder = Path(folder)
        head_path = folder / HEAD_FILE
        if not head_path.is_file():
            raise FileNotFoundError(f"not a fine-tuned classifier folder (no {HEAD_FILE}): {folder}")
        try:
            with safe_open(str(head_path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["clipforge_finetune_head"])
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{head_path}: not a clipforge fine-tuned head (missing {e})") from None
        clip, _ = loading.load(folder / MODEL_FILE, device=device, fast=False)
        return cls(clip, weight, bias, classnames=meta.get("classnames", []), templates=meta.get("templates", []),
                   recipe=meta.get("recipe", "ce")).to(device)


__all__ = ["ImageClassifier", "zeroshot_head_weight", "HEAD_FILE", "MODEL_FILE"]
