"""LoRA (Hu et al. 2021): low-rank adapters on the attention and MLP products of either tower,
trained alone (the base weights frozen), merged into the weights after training, saved small.

Each adapted weight ``W [out, in]`` becomes ``W + (alpha / rank) * B @ A`` with ``A [rank, in]``
(Kaiming-uniform, as the paper's reference) and ``B [out, rank]`` (zeros: training starts from
the base model exactly). The sum is a ``torch.nn.utils.parametrize`` parametrization of the
weight attribute itself, so every reader of the weight, the plain model and the fast paths
alike, sees the adapted weight with no change to their code; :func:`merge_lora` removes the
parametrizations leaving ``W + s B A`` in place (standard keys again: ``save_model`` and every
checkpoint writer work on the merged model).

Why not ``peft``: its LoRA wraps ``nn.Linear`` modules (and ``nn.MultiheadAttention`` through a
special case that swaps the module for its own); our attention keeps OpenAI's fused
``in_proj_weight`` Parameter read directly by ``F.linear`` and by the fast paths, which a module
wrapper never sees, and ``peft`` would add a dependency and rename every key. A parametrization
is ~50 lines and keeps the model's classes, names and fast paths.

Targets: ``attn`` (``in_proj_weight`` and ``out_proj``), ``mlp`` (``c_fc``, ``c_proj``), or the
four names one by one, in the towers ``image`` / ``text``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models import CLIP
from ..models.layers import MLP, Attention
from ..utils import atomic_open

TARGETS = ("in_proj", "out_proj", "c_fc", "c_proj")
GROUPS = {"attn": ("in_proj", "out_proj"), "mlp": ("c_fc", "c_proj")}
TOWERS = ("image", "text")


class LoRA(nn.Module):
    """The parametrization ``W -> W + scale * B @ A``."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # [out, in] -> [out, in]
        return w + (self.lora_b @ self.lora_a).to(w.dtype) * self.scale


def expand_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """``attn`` / ``mlp`` / the four product names -> product names; errors name the bad one."""
    out: list[str] = []
    for t in targets:
        names = GROUPS.get(t, (t,) if t in TARGETS else None)
        if names is None:
            raise ValueError(f"lora target {t!r}: expected attn, mlp or one of {', '.join(TARGETS)}")
        out += [n for n in names if n not in out]
    return tuple(out)


def _sites(model: CLIP, targets: Sequence[str], towers: Sequence[str]) -> Iterator[tuple[nn.Module, str]]:
    """(module, weight attribute) of every adapted product."""
    names = expand_targets(targets)
    for tower in towers:
        if tower not in TOWERS:
            raise ValueError(f"lora tower {tower!r}: expected image or text")
        root = model.visual if tower == "image" else model.text
        for m in root.modules():
            if isinstance(m, Attention):
                if "in_proj" in names:
                    yield m, "in_proj_weight"
                if "out_proj" in names:
                    yield m.out_proj, "weight"
            elif isinstance(m, MLP):
                for n in ("c_fc", "c_proj"):
                    if n in names:
                        yield getattr(m, n), "weight"


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRA) for m in model.modules())


def add_lora(model: CLIP, rank: int, alpha: float, targets: Sequence[str] = ("attn", "mlp"),
             towers: Sequence[str] = TOWERS, seed: int | None = None) -> list[str]:
    """Adapt the ``targets`` products of ``towers`` and freeze every other parameter (the
    temperature too): only the adapters train. ``seed``: the ``A`` initialisation (a private
    generator; torch's global one is left alone). Returns the adapted weights' names."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1 (got {rank})")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    if model.config.vision.kind != "vit" and "image" in towers:
        raise ValueError("LoRA on the image tower needs a ViT (this model's image tower is a ResNet); "
                         "use towers=('text',)")
    for p in model.parameters():
        p.requires_grad_(False)
    sites = list(_sites(model, targets, towers))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for module, attr in sites:
            w = getattr(module, attr)
            parametrize.register_parametrization(
                module, attr, LoRA(w.shape[0], w.shape[1], rank, alpha, dtype=w.dtype, device=w.device))
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(m)]}.{a}" for m, a in sites]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (``W + s B A``) and remove the parametrizations: the
    model has its standard classes and keys again, and computes what the adapted one did."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for attr in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, attr, leave_parametrized=True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``<module>.parametrizations.<weight>.0.lora_a|lora_b``."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.endswith((".lora_a", ".lora_b"))}


def save_lora(model: CLIP, path: str | Path, rank: int, alpha: float, targets: Sequence[str],
              towers: Sequence[str]) -> Path:
    """The adapters alone as a safetensors file (metadata: rank, alpha, targets, towers, and the
    base model's config), written atomically."""
    import json

    from safetensors.torch import save

    meta = {"format": "clipforge-lora", "rank": str(rank), "alpha": str(alpha), "targets": ",".join(targets),
            "towers": ",".join(towers), "model_config": model.config.to_json()}
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(save(lora_state_dict(model), metadata=meta))
    json.loads(meta["model_config"])  # the record is JSON (checked: a reader needs it)
    return path


def load_lora(model: CLIP, path: str | Path) -> CLIP:
    """Add the adapters of a :func:`save_lora` file to ``model`` (its base model) and load them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "clipforge-lora":
            raise ValueError(f"{path}: not a clipforge LoRA file (no format=clipforge-lora in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    add_lora(model, int(meta["rank"]), float(meta["alpha"]), meta["targets"].split(","), meta["towers"].split(","))
    missing = set(lora_state_dict(model)) ^ set(tensors)
    if missing:
        raise ValueError(f"{path}: adapters do not match this model (e.g. {sorted(missing)[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model


__all__ = ["LoRA", "add_lora", "merge_lora", "has_lora", "lora_state_dict", "save_lora", "load_lora",
           "expand_targets", "TARGETS", "TOWERS"]
