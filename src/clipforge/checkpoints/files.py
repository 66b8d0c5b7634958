"""Reading checkpoint files once, before any format looks at them, and the writing helpers the
format modules share.

Detection needs the tensor names, and a ViT-L file is 1.7 GB, so the file is read once into a
:class:`Source` (weights, embedded config, the folder's JSON side files) and every format's
``detect`` / ``read_config`` inspects that instead of re-reading the path.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CLIPConfig
from ..models import CLIP
from ..utils.io import atomic_open
from .torchscript import load_trusted, read_torchscript

# Weight files looked for, in this order, when a checkpoint path is a folder.
WEIGHT_NAMES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pt", "final.safetensors")


@dataclass
class Source:
    """One checkpoint as read from disk: raw state dict, where it came from, what travels with it."""

    path: Path  # what the caller passed (file or folder)
    weights: Path  # the weights file actually read
    state_dict: dict[str, torch.Tensor]
    embedded: dict[str, Any] | None = None  # clipforge config stored inside the file
    extras: dict[str, Any] = field(default_factory=dict)  # scalars of a training wrapper (step, epoch, ...)
    # The config the checkpoint declares: the caller's, else the embedded one, else a JSON beside it.
    declared: CLIPConfig | dict[str, Any] | None = None
    declared_from: str = ""  # where ``declared`` came from, for error messages
    assumed: list[str] = field(default_factory=list)  # config fields the file does not record (guessed)

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def side_json(self, *names: str) -> dict[str, Any] | None:
        """The first of ``names`` present in the checkpoint's folder, parsed."""
        return find_json(self.folder, names)


def find_json(folder: Path, names: tuple[str, ...]) -> dict[str, Any] | None:
    for name in names:
        p = folder / name
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return None


def read_source(path: Path, *, trust_torchscript: bool = False) -> Source:
    """Read a checkpoint file (or the weights file inside a folder) into a :class:`Source`.

    TorchScript archives are read by the restricted reader (:mod:`.torchscript`), which never runs
    their code; ``trust_torchscript=True`` hands them to ``torch.jit.load`` instead (runs it)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    weights = path
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)  # type: ignore[assignment]
        if weights is None:
            raise FileNotFoundError(f"no weights file in {path} (looked for {', '.join(WEIGHT_NAMES)})")
    if weights.suffix == ".safetensors":
        sd, meta = read_safetensors(weights)
        embedded = json.loads(meta["clipforge_config"]) if "clipforge_config" in meta else None
        return Source(path, weights, sd, embedded)
    sd, embedded, extras = _unwrap(_read_torch(weights, trust_torchscript), weights)
    return Source(path, weights, sd, embedded, extras)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    return sd, meta


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _read_torch(path: Path, trust_torchscript: bool = False) -> Any:
    if is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives: their tensors, none of their code.
        return load_trusted(path) if trust_torchscript else read_torchscript(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch zip archive / legacy pickle
        raise ValueError(f"{path} is not a checkpoint: neither safetensors nor a torch archive or pickle "
                         f"(file starts with {head!r})")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Strip training-checkpoint wrappers and DDP prefixes -> (state dict, embedded config, extras)."""
    config, extras = None, {}
    if isinstance(obj, dict):
        if isinstance(obj.get("config"), dict) and "embed_dim" in obj["config"]:
            config = obj["config"]
        extras = {k: v for k, v in obj.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        if isinstance(obj.get("train_config"), dict):
            extras["train_config"] = obj["train_config"]
        if isinstance(obj.get("metrics"), list):
            extras["metrics"] = obj["metrics"]
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    sd: dict[str, torch.Tensor] = obj
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, config, extras


# --- writing ---------------------------------------------------------------------------------------


def contrastive_only(model: CLIP, fmt: str) -> None:
    """Foreign formats hold the two towers only: a model with a bow/caption head is refused there."""
    objective = getattr(model.config, "objective", "contrastive")
    if objective != "contrastive":
        raise ValueError(f"a model trained with objective {objective!r} carries a head the {fmt} format "
                         f"cannot hold; save it in clipforge's format (save_model / convert --to clipforge)")


def clip_towers_only(model: CLIP, fmt: str) -> None:
    """OpenAI-layout formats hold CLIP's towers; the native SigLIP towers have other modules."""
    kinds = (model.config.vision.kind, model.config.text.kind)
    if "siglip" in kinds:
        raise ValueError(f"this model has SigLIP towers (vision {kinds[0]!r}, text {kinds[1]!r}), which the {fmt} "
                         f"format's CLIP layout cannot hold; save it in clipforge's format (convert --to clipforge)")


def without_logit_bias(model: CLIP, fmt: str) -> None:
    """Formats whose model has no learned logit bias (OpenAI's CLIP, HF ``CLIPModel``) refuse one."""
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError(f"this model has a learned logit_bias (sigmoid-loss training), which the {fmt} "
                         f"format cannot hold; convert --to openclip or clipforge")


def native_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The model's weights as contiguous CPU tensors, refusing models whose parameters were folded."""
    if any(getattr(m, "inference_only", False) for m in model.modules()):
        raise ValueError("this model was prepared by optimize_for_inference (BatchNorm folded into the "
                         "convolutions), so its parameters no longer match the architecture; save the "
                         "model before optimising it, or reload it")
    if any(hasattr(m, "_orig_mod") for m in model.modules()):  # torch.compile's wrapper renames every key
        raise ValueError("this model's towers were compiled (optimize_for_inference(compile=True)), which "
                         "renames every weight (._orig_mod.); save the model before compiling it")
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def write_safetensors(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    with atomic_open(path, "wb") as f:
        f.write(save(sd, metadata=metadata))
