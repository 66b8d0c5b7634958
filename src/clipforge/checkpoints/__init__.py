"""Checkpoint formats: detection, loading into :class:`~clipforge.models.CLIP`, saving, conversion.

Formats read:
- **clipforge**: ``*.safetensors`` with the model config in its metadata, or a folder with
  ``model.safetensors`` + ``config.json``; also training checkpoints ``{"model": sd, "config": {...}}``.
- **OpenAI**: plain state dicts and the TorchScript archives OpenAI distributes (weights are read
  from the archive; its code is never run). Architecture from tensor shapes.
- **OpenCLIP**: state dicts (``state_dict`` wrapper and ``module.`` prefixes stripped), with its
  config JSON (``open_clip_config.json`` / model-config file beside the weights, or ``config=``).
- **Hugging Face** ``CLIPModel``: a folder (or a weights file) with ``config.json``, weights in
  ``model.safetensors`` or ``pytorch_model.bin``.

Loading is strict: missing and unexpected keys are listed, shape mismatches name the key and
both shapes; nothing is ever partially loaded.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import CLIPConfig, PreprocessConfig, get_model_config
from ..models import CLIP
from ..preprocess import Preprocess, image_transform
from ..utils.io import atomic_open, atomic_write_text
from . import hf as hf_format
from . import openai as openai_format
from .openclip import is_openclip_config, parse_openclip_config

log = logging.getLogger(__name__)

Format = Literal["clipforge", "openai", "openclip", "hf"]
WEIGHT_NAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin", "model.pt", "final.safetensors")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it describes (missing/unexpected keys, shapes)."""


# --- reading raw files ---------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    return sd, meta


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _read_torch(path: Path) -> Any:
    if _is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives: load the module's tensors only.
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"cannot read TorchScript archive {path}: {e}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Strip training-checkpoint wrappers and DDP prefixes; returns (state dict, embedded config)."""
    config = None
    if isinstance(obj, dict):
        if isinstance(obj.get("config"), dict) and "embed_dim" in obj["config"]:
            config = obj["config"]
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
    return sd, config


def _find_json(folder: Path, names: tuple[str, ...]) -> dict[str, Any] | None:
    for name in names:
        p = folder / name
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return None


# --- detection + conversion to native ------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, *, config: CLIPConfig | dict | str | None = None,
                    activation: str | None = None) -> tuple[dict[str, torch.Tensor], CLIPConfig, Format]:
    """Read any supported checkpoint into (native state dict, config, detected format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    folder = path if path.is_dir() else path.parent
    weights = path
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise FileNotFoundError(f"no weights file in {path} (looked for {', '.join(WEIGHT_NAMES)})")

    embedded: dict[str, Any] | None = None
    if weights.suffix == ".safetensors":
        sd, meta = _read_safetensors(weights)
        if "clipforge_config" in meta:
            embedded = json.loads(meta["clipforge_config"])
    else:
        sd, embedded = _unwrap(_read_torch(weights), weights)

    # An explicit config always wins; then one embedded in the file; then JSON files beside it.
    explicit = _explicit_config(config)
    side = None if (explicit or embedded) else _find_json(folder, ("config.json", "open_clip_config.json",
                                                                   "clipforge_config.json"))
    if hf_format.is_hf_layout(sd):
        hf_cfg = explicit if isinstance(explicit, dict) else side
        if not isinstance(explicit, CLIPConfig) and (hf_cfg is None or "text_config" not in hf_cfg):
            hf_cfg = _find_json(folder, ("config.json",))
            if hf_cfg is None or "text_config" not in hf_cfg:
                raise ValueError(f"{weights} is in Hugging Face layout but no HF config.json was found "
                                 f"beside it (pass config=...)")
        cfg = explicit if isinstance(explicit, CLIPConfig) else hf_format.config_from_hf(
            hf_cfg, _find_json(folder, ("preprocessor_config.json",)))
        return hf_format.to_native(sd), _with_activation(cfg, activation), "hf"

    if openai_format.is_openai_layout(sd):
        fmt: Format = "openai"
        jit_markers = any(k in sd for k in openai_format.OPENAI_EXTRA_KEYS)
        src = explicit if explicit is not None else (embedded if embedded is not None else side)
        if isinstance(src, CLIPConfig):
            cfg = src
        elif isinstance(src, dict) and "embed_dim" in src and "vision" in src:
            cfg = CLIPConfig.from_dict(src)
        elif isinstance(src, dict) and is_openclip_config(src):
            fmt = "openclip"
            act, pre, model_cfg = parse_openclip_config(src, str(folder))
            cfg = openai_format.infer_config(sd, activation=act, preprocess=pre)
            cfg = _apply_openclip_heads(cfg, model_cfg)
        else:
            if activation is None and not jit_markers:
                log.warning("%s: the activation is not recorded in this checkpoint; assuming QuickGELU "
                            "(OpenAI's). Pass activation='gelu' for OpenCLIP models trained with GELU.",
                            weights)
            cfg = openai_format.infer_config(sd, activation=activation or "quick_gelu")
        return openai_format.to_native(sd), _with_activation(cfg, activation), fmt

    if any(k.startswith("text.") for k in sd) and any(k.startswith("visual.") for k in sd):
        src = explicit if explicit is not None else (embedded if embedded is not None else side)
        if isinstance(src, CLIPConfig):
            cfg = src
        elif isinstance(src, dict) and "embed_dim" in src and "vision" in src:
            cfg = CLIPConfig.from_dict(src)
        else:
            raise ValueError(f"{weights} is a clipforge state dict without its config "
                             f"(no metadata, no config.json beside it)")
        return sd, _with_activation(cfg, activation), "clipforge"

    sample = ", ".join(list(sd)[:5])
    raise ValueError(f"{weights}: unrecognised checkpoint layout (first keys: {sample})")


def _apply_openclip_heads(cfg: CLIPConfig, model_cfg: dict[str, Any]) -> CLIPConfig:
    """Head counts are invisible in tensor shapes; OpenCLIP configs state them."""
    d = cfg.to_dict()
    if d["vision"]["kind"] == "vit":
        d["vision"]["heads"] = d["vision"]["width"] // int(model_cfg.get("vision_cfg", {}).get("head_width", 64))
    d["text"]["heads"] = int(model_cfg.get("text_cfg", {}).get("heads", d["text"]["heads"]))
    return CLIPConfig.from_dict(d)


def _explicit_config(config: CLIPConfig | dict | str | None) -> CLIPConfig | dict | None:
    if config is None or isinstance(config, (CLIPConfig, dict)):
        return config
    p = Path(config)
    if p.is_file():
        return json.loads(p.read_text(encoding="utf-8"))
    return get_model_config(str(config))


def _with_activation(cfg: CLIPConfig, activation: str | None) -> CLIPConfig:
    if activation is None or activation == cfg.activation:
        return cfg
    d = cfg.to_dict()
    d["activation"] = activation
    return CLIPConfig.from_dict(d)


def _match_zoo_name(cfg: CLIPConfig) -> CLIPConfig:
    if cfg.name:
        return cfg
    from ..config import _load_zoo

    arch = ("embed_dim", "vision", "text", "activation")
    cd = cfg.to_dict()
    for name, z in _load_zoo().items():
        zd = z.to_dict()
        if all(zd[k] == cd[k] for k in arch):
            return CLIPConfig.from_dict({**cfg.to_dict(), "name": name})
    return cfg


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load all-or-nothing, with an error listing every missing/unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    # BatchNorm's step counter is bookkeeping, not weights: tolerate its absence.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:20]))
        raise CheckpointError("\n  ".join(parts))
    full = dict(sd)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in full:
            full[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict({k: full[k] for k in own}, strict=True)


def load_model(path: str | os.PathLike, *, config: CLIPConfig | dict | str | None = None,
               activation: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> CLIP:
    """Load any supported checkpoint as a :class:`CLIP` model in eval mode."""
    sd, cfg, fmt = read_checkpoint(path, config=config, activation=activation)
    cfg = _match_zoo_name(cfg)
    with torch.device("meta"):
        model = CLIP(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()},
                           f"{path} ({fmt} format)")
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.source_format = fmt  # type: ignore[assignment]
    return model


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         config: CLIPConfig | dict | str | None = None, activation: str | None = None) -> tuple[CLIP, Preprocess]:
    """``model, preprocess = clipforge.load(path)`` for OpenAI, OpenCLIP, Hugging Face or our checkpoints.

    Weights are never downloaded: ``path`` is a local file or folder. For a random-init model of a
    named architecture use :func:`clipforge.create_model`.
    """
    p = Path(path)
    if not p.exists():
        try:
            get_model_config(str(path))
        except KeyError:
            raise FileNotFoundError(f"checkpoint not found: {path}") from None
        raise FileNotFoundError(
            f"{path!r} is an architecture name, not a checkpoint; clipforge never downloads weights. "
            f"Pass a local checkpoint path, or use clipforge.create_model({str(path)!r}) for random init.")
    model = load_model(p, config=config, activation=activation, device=device, dtype=dtype)
    return model, image_transform(model.config.preprocess)


# --- writing ---------------------------------------------------------------------------------------


def _checkpointable(model: CLIP) -> CLIP:
    if any(getattr(m, "inference_only", False) for m in model.modules()):
        raise ValueError("this model was prepared by optimize_for_inference (BatchNorm folded into the "
                         "convolutions), so its parameters no longer match the architecture; save the "
                         "model before optimising it, or reload it")
    return model


def _cpu_contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model(model: CLIP, path: str | os.PathLike) -> Path:
    """Write our format atomically: ``*.safetensors`` (config in the metadata) or a folder with
    ``model.safetensors`` + ``config.json``."""
    from safetensors.torch import save

    path = Path(path)
    sd = _cpu_contiguous(_checkpointable(model).state_dict())
    meta = {"format": "clipforge", "clipforge_config": model.config.to_json(indent=None)}
    if path.suffix == ".safetensors":
        with atomic_open(path, "wb") as f:
            f.write(save(sd, metadata=meta))
        return path
    path.mkdir(parents=True, exist_ok=True)
    with atomic_open(path / "model.safetensors", "wb") as f:
        f.write(save(sd, metadata=meta))
    atomic_write_text(path / "config.json", model.config.to_json())
    return path


def save_openai(model: CLIP, path: str | os.PathLike) -> Path:
    """A plain OpenAI-layout state dict (``torch.save``), loadable by OpenAI's ``build_model``
    and OpenCLIP; an ``open_clip_config.json`` beside it records activation and preprocessing."""
    path = Path(path)
    sd = openai_format.from_native(_cpu_contiguous(_checkpointable(model).state_dict()))
    with atomic_open(path, "wb") as f:
        torch.save(sd, f)
    cfg = model.config
    oc = {"model_cfg": openclip_model_cfg(cfg),
          "preprocess_cfg": {"mean": list(cfg.preprocess.mean), "std": list(cfg.preprocess.std),
                             "interpolation": cfg.preprocess.interpolation,
                             "resize_mode": cfg.preprocess.resize_mode}}
    atomic_write_text(path.parent / "open_clip_config.json", json.dumps(oc, indent=2))
    return path


def openclip_model_cfg(cfg: CLIPConfig) -> dict[str, Any]:
    """The ``model_cfg`` OpenCLIP builds this architecture from (``open_clip.CLIP(**model_cfg)``)."""
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.activation == "quick_gelu",
            "vision_cfg": _openclip_vision(cfg),
            "text_cfg": {"context_length": cfg.text.context_length, "vocab_size": cfg.text.vocab_size,
                         "width": cfg.text.width, "heads": cfg.text.heads, "layers": cfg.text.layers}}


def _openclip_vision(cfg: CLIPConfig) -> dict[str, Any]:
    v = cfg.vision
    if v.kind == "resnet":
        return {"image_size": v.image_size, "layers": list(v.layers), "width": v.width}  # type: ignore[arg-type]
    return {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
            "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}


def save_hf(model: CLIP, folder: str | os.PathLike) -> Path:
    """A Hugging Face ``CLIPModel`` folder: ``config.json``, ``model.safetensors``,
    ``preprocessor_config.json`` and the tokenizer files (``vocab.json``, ``merges.txt``)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_json, pre_json = hf_format.config_to_hf(model.config)
    sd = hf_format.from_native(_cpu_contiguous(_checkpointable(model).state_dict()))
    with atomic_open(folder / "model.safetensors", "wb") as f:
        f.write(save(sd, metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", json.dumps(cfg_json, indent=2))
    atomic_write_text(folder / "preprocessor_config.json", json.dumps(pre_json, indent=2))
    atomic_write_text(folder / "clipforge_config.json", model.config.to_json())
    _write_hf_tokenizer(folder, model.config.text.context_length)
    return folder


def _write_hf_tokenizer(folder: Path, context_length: int) -> None:
    from ..tokenizer import get_tokenizer

    tok = get_tokenizer()
    atomic_write_text(folder / "vocab.json", json.dumps(tok.encoder, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    atomic_write_text(folder / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=2))
    atomic_write_text(folder / "special_tokens_map.json", json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=2))


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            activation: str | None = None, config: CLIPConfig | dict | str | None = None) -> Path:
    """Convert a checkpoint between formats: ``to`` in clipforge | openai | openclip | hf."""
    model = load_model(src, activation=activation, config=config)
    if to == "clipforge":
        return save_model(model, dst)
    if to in ("openai", "openclip"):
        return save_openai(model, dst)
    if to == "hf":
        return save_hf(model, dst)
    raise ValueError(f"unknown target format {to!r} (expected clipforge, openai, openclip or hf)")


__all__ = ["load", "load_model", "save_model", "save_openai", "save_hf", "convert", "read_checkpoint",
           "load_state_dict_strict", "CheckpointError"]
