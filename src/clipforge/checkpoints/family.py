"""open_clip checkpoints of the families beyond OpenAI's CLIP (timm image towers, HF or
open_clip-variant text towers, SigLIP's logit bias, CoCa): an ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``) beside ``open_clip_model.safetensors`` (or
``open_clip_pytorch_model.bin``), what ``open_clip.create_model("local-dir:DIR")`` reads; the
tokenizer files (``tokenizer.json`` / ``spiece.model``...) sit in the same folder.

:func:`write` produces such a folder from a :class:`~clipforge.families.FamilyCLIP`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from ..families import CARRIED_PREFIXES, FamilyCLIP, FamilyConfig, is_family_dict, tokenizer_files
from ..utils.io import atomic_write_text
from . import openclip, siglip
from .files import Source, native_state_dict, write_safetensors

NAME = "openclip-family"
HF_TEXT_DIR = "hf_text_config"  # where write() puts an HF text tower's config.json
_TOP = ("visual.", "text.", "logit_scale", "logit_bias")


def needs_family(model_cfg: dict[str, Any]) -> bool:
    """Whether an open_clip ``model_cfg`` is outside what clipforge's own CLIP (OpenAI's) builds."""
    t, v = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    if model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg or t.get("hf_model_name") \
            or v.get("timm_model_name") or t.get("hf_tokenizer_name") or t.get("norm_kwargs") \
            or t.get("act_kwargs") or v.get("norm_kwargs") or v.get("act_kwargs"):
        return True
    try:
        openclip.parse_openclip_config({"model_cfg": model_cfg})
    except ValueError:
        return True
    return False


def detect(src: Source) -> bool:
    d = src.declared
    return isinstance(d, dict) and not is_family_dict(d) and openclip.is_openclip_config(d) \
        and needs_family(d.get("model_cfg", d))


def hf_text_config(name: str, folder: Path) -> dict[str, Any]:
    """The HF ``config.json`` of ``hf_model_name``: a local folder (absolute, or relative to the
    checkpoint folder). Never a hub name: clipforge does not download."""
    for cand in (Path(name), folder / name, folder / HF_TEXT_DIR):
        if (cand / "config.json").is_file():
            return json.loads((cand / "config.json").read_text(encoding="utf-8"))
    raise FileNotFoundError(f"text_cfg.hf_model_name={name!r}: no config.json in a local folder of that name "
                            f"(nor {folder / HF_TEXT_DIR}); clipforge never downloads, so put the text tower's "
                            f"Hugging Face config folder there")


def tokenizer_cfg(text_cfg: dict[str, Any]) -> dict[str, Any]:
    """How open_clip's ``get_tokenizer`` makes this model's ids (``hf_tokenizer_name``: the folder's
    files through HFTokenizer, with ``tokenizer_kwargs``; else its OpenAI BPE)."""
    ctx = int(text_cfg.get("context_length", 77))
    if not text_cfg.get("hf_tokenizer_name"):
        return {"kind": "openai-bpe", "context_length": ctx}
    if text_cfg.get("tokenizer_mode"):
        raise ValueError(f"text_cfg.tokenizer_mode={text_cfg['tokenizer_mode']!r} is not supported by clipforge")
    kw = dict(text_cfg.get("tokenizer_kwargs") or {})
    bad = set(kw) - {"clean", "strip_sep_token"}
    if bad:
        raise ValueError(f"text_cfg.tokenizer_kwargs {sorted(bad)} are not supported by clipforge")
    return {"kind": "hf", "context_length": ctx, "clean": kw.get("clean", "whitespace"),
            "strip_sep_token": bool(kw.get("strip_sep_token", False))}


def preprocess_cfg(p: dict[str, Any] | None, image_size: int, source: str) -> PreprocessConfig:
    """open_clip's ``preprocess_cfg`` over its defaults (OpenAI mean/std, bicubic, shortest side)."""
    p = p or {}
    size = p.get("size", image_size)
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if size != image_size:
        raise ValueError(f"{source}: preprocess_cfg.size={p.get('size')!r} differs from the image tower's {image_size}")
    mode = p.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"{source}: preprocess_cfg.resize_mode={mode!r} is not supported (shortest or squash)")
    interp = p.get("interpolation", "bicubic")
    if interp not in ("bicubic", "bilinear"):
        raise ValueError(f"{source}: preprocess_cfg.interpolation={interp!r} is not supported (bicubic or bilinear)")
    return PreprocessConfig(image_size=image_size, mean=tuple(p.get("mean", OPENAI_MEAN)),
                            std=tuple(p.get("std", OPENAI_STD)), interpolation=interp, resize_mode=mode)


def config_from_openclip(d: dict[str, Any], folder: Path, source: str) -> FamilyConfig:
    model_cfg = copy.deepcopy(d.get("model_cfg", d))
    text_cfg = model_cfg.get("text_cfg", {})
    hf_cfg = hf_text_config(text_cfg["hf_model_name"], folder) if text_cfg.get("hf_model_name") else None
    probe = FamilyConfig(model_cfg=model_cfg, preprocess=PreprocessConfig(
        image_size=_image_size(model_cfg)), tokenizer=tokenizer_cfg(text_cfg), hf_text_config=hf_cfg, name=None)
    return FamilyConfig(model_cfg=model_cfg,
                        preprocess=preprocess_cfg(d.get("preprocess_cfg"), probe.vision.image_size, source),
                        tokenizer=probe.tokenizer, hf_text_config=hf_cfg, name=d.get("name"))


def _image_size(model_cfg: dict[str, Any]) -> int:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def read_config(src: Source, activation: str | None = None) -> FamilyConfig:
    if activation is not None:
        raise ValueError(f"{src.weights}: --activation does not apply to an open_clip family model "
                         f"(its config states the activation)")
    assert isinstance(src.declared, dict)
    return config_from_openclip(src.declared, src.folder, src.declared_from)


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip keys -> ours: a plain ``CLIP``'s top-level text modules move under ``text.``;
    CoCa's caption decoder (``text_decoder.*``) keeps its names (carried, :meth:`FamilyCLIP.carry`)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[k if k.startswith(_TOP + CARRIED_PREFIXES) else "text." + k] = v
    return out


def from_native(sd: dict[str, torch.Tensor], config: FamilyConfig | None = None) -> dict[str, torch.Tensor]:
    """Ours -> open_clip's keys: ``CustomTextCLIP``'s (the same) unless ``config`` is a plain ``CLIP``."""
    if config is None or config.custom_text:
        return sd
    return {k[len("text."):] if k.startswith("text.") else k: v for k, v in sd.items()}


def prepare(model: FamilyCLIP, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a read state dict to the model about to load it: room made for CoCa's carried decoder
    (:meth:`FamilyCLIP.carry`); on the native SigLIP towers, timm's keys renamed to theirs."""
    model.carry(sd)
    return siglip.to_native(sd) if model.native_config is not None else sd


def openclip_state_dict(model: FamilyCLIP) -> dict[str, torch.Tensor]:
    """The model's weights under open_clip's keys (native SigLIP towers: timm's names)."""
    sd = native_state_dict(model)  # type: ignore[arg-type]
    if model.native_config is not None:
        sd = siglip.from_native(sd)
    return from_native(sd, model.config)


def openclip_config(config: FamilyConfig, hf_dir: Path | None) -> dict[str, Any]:
    """``open_clip_config.json`` for this model (an HF text tower pointing at ``hf_dir``)."""
    model_cfg = copy.deepcopy(config.model_cfg)
    if hf_dir is not None:
        model_cfg["text_cfg"]["hf_model_name"] = str(hf_dir)
    if config.tokenizer.get("kind") == "hf":
        model_cfg["text_cfg"].setdefault("hf_tokenizer_name", "local-dir")
    p = config.preprocess
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
                               "resize_mode": p.resize_mode, "size": p.image_size}}


def copy_tokenizer(model: nn.Module, folder: Path) -> None:
    """Copy the model's tokenizer files into ``folder`` (a family tokenizer lives beside the weights)."""
    tok = getattr(model, "tokenizer", None)
    src = getattr(tok, "folder", None)
    if src is None:
        if model.config.tokenizer.get("kind") != "openai-bpe":  # type: ignore[union-attr]
            raise ValueError("this model has no tokenizer files attached (load it from its folder first)")
        return
    for name in tokenizer_files(Path(src)):
        if Path(src).resolve() != folder.resolve():
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(Path(src) / name, tmp)
            os.replace(tmp, folder / name)


def write(model: nn.Module, path: str | os.PathLike) -> Path:
    """An open_clip ``local-dir:`` folder: config, weights, tokenizer files, and an HF text tower's
    ``config.json`` in ``hf_text_config/`` (referenced by absolute path, as open_clip resolves it)."""
    if not isinstance(model, FamilyCLIP):
        return openclip.write(model, path)  # type: ignore[arg-type]
    cfg = model.config
    if "multimodal_cfg" in cfg.model_cfg and not model.carried():
        raise ValueError("this CoCa model has no caption decoder weights (text_decoder.*: clipforge carries them "
                         "from a CoCa checkpoint but does not create them), so it cannot be written as an "
                         "open_clip CoCa checkpoint")
    path = Path(path)
    if path.suffix:
        raise ValueError(f"{path}: an open_clip family model is written as a folder (local-dir:), give a path "
                         f"without a suffix")
    path.mkdir(parents=True, exist_ok=True)
    hf_dir = None
    if cfg.hf_text_config is not None:
        hf_dir = (path / HF_TEXT_DIR).resolve()
        hf_dir.mkdir(exist_ok=True)
        atomic_write_text(hf_dir / "config.json", json.dumps(cfg.hf_text_config, indent=2))
    sd = openclip_state_dict(model)
    copy_tokenizer(model, path)
    write_safetensors(path / openclip.WEIGHTS_NAME, sd, {"format": "pt"})
    atomic_write_text(path / openclip.CONFIG_NAME, json.dumps(openclip_config(cfg, hf_dir), indent=2))
    return path
