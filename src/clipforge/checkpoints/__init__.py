"""Checkpoints: read any supported format into a :class:`~clipforge.models.CLIP`, write ours, convert.

Each format is a module with the same interface: ``detect(src)``, ``read_config(src, activation)``,
``to_native(state_dict)``, ``from_native(state_dict)``, ``write(model, path)``, where ``src`` is the
file as read once (:class:`.files.Source`):

- :mod:`.native`: ours (safetensors with the config in its metadata, or a folder + ``config.json``;
  training checkpoints ``{"model": sd, "config": {...}}``).
- :mod:`.openai`: OpenAI's state dicts and released TorchScript archives (tensors read by
  :mod:`.torchscript` without running the archive's code); architecture from shapes.
- :mod:`.openclip`: OpenAI layout plus OpenCLIP's config JSON; writes open_clip's ``local-dir:`` folders.
- :mod:`.hf`: Hugging Face ``CLIPModel`` folders.

Loading is strict (:mod:`.strict`): nothing is ever partially loaded. This is storage: it returns
plain models and knows nothing of the fast layer; ``clipforge.load`` (:mod:`clipforge.loading`)
is where a path becomes a ready model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch

from ..config import CLIPConfig, ConfigError, _load_zoo, get_model_config
from ..models import CLIP, model_class
from ..families import FamilyCLIP, FamilyConfig, FolderTokenizer
from ..utils import moved
from . import family, hf, hf_siglip, hf_siglip2, native, openai, openclip
from .files import Source, read_source
from .strict import CheckpointError, describe_suspect, load_state_dict_strict, suspect_weights
from .torchscript import UntrustedTorchScript

log = logging.getLogger(__name__)

# Detection order: the first format whose ``detect`` accepts the file reads it.
FORMATS = {m.NAME: m for m in (hf_siglip2, hf_siglip, hf, family, openclip, openai, native)}
# Sidecar JSON looked for beside the weights when neither the caller nor the file gives a config.
SIDE_CONFIGS = ("config.json", openclip.CONFIG_NAME, openai.SIDECAR)


@dataclass
class CheckpointInfo:
    """What a checkpoint is: its format, the config it resolves to, where the weights came from."""

    format: str
    config: CLIPConfig
    weights: Path
    extras: dict[str, Any] = field(default_factory=dict)  # training-wrapper fields (step, epoch, metrics)
    assumed: tuple[str, ...] = ()  # config fields not recorded in the checkpoint, filled by a default
    nonfinite: tuple[str, ...] = ()  # tensors holding NaN/inf (loading warns)
    integer: tuple[str, ...] = ()  # weights stored with an integer dtype (loading warns, casts)


def read_checkpoint(path: str | os.PathLike, *, config: CLIPConfig | dict | str | None = None,
                    activation: str | None = None, trust_torchscript: bool = False
                    ) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read any supported checkpoint into (native state dict, :class:`CheckpointInfo`).

    An explicit ``config`` (a :class:`CLIPConfig`, dict, JSON file or zoo name) always wins; then a
    config embedded in the file; then a JSON file beside it (``config.json``, ``open_clip_config.json``,
    ``clipforge_config.json``). Whichever it is, it is checked like a user's config: an impossible
    value is a ``ValueError`` naming the key and where the config came from. Tensors holding NaN/inf
    and integer-typed weights are logged as one warning (and listed in the info).

    TorchScript archives (OpenAI's releases) are read without running their code; one the restricted
    reader cannot read is refused (:class:`UntrustedTorchScript`) unless ``trust_torchscript=True``,
    which loads it with ``torch.jit.load`` (runs code from the file).
    """
    src = read_source(Path(path), trust_torchscript=trust_torchscript)
    if config is not None:
        src.declared, src.declared_from = _explicit_config(config), f"config {config!r}"[:200]
    elif src.embedded is not None:
        src.declared, src.declared_from = src.embedded, f"{src.weights} (embedded config)"
    else:
        for name in SIDE_CONFIGS:
            side = src.side_json(name)
            if side is not None:
                src.declared, src.declared_from = side, str(src.folder / name)
                break
    fmt = next((m for m in FORMATS.values() if m.detect(src)), None)
    if fmt is None:
        sample = ", ".join(list(src.state_dict)[:5])
        raise ValueError(f"{src.weights}: unrecognised checkpoint layout (first keys: {sample})")
    try:
        cfg = fmt.read_config(src, activation)
        if not isinstance(cfg, FamilyConfig):
            cfg = _match_zoo_name(_with_activation(cfg, activation))
    except (ConfigError, TypeError, ArithmeticError) as e:  # a value of the wrong type or size, anywhere
        where = src.declared_from or f"{src.weights} (architecture read from the tensor shapes)"
        raise ConfigError(f"{where}: invalid model config: {e}") from None
    sd = fmt.to_native(src.state_dict)
    nonfinite, integer = suspect_weights(sd)
    if nonfinite or integer:
        log.warning("%s: %s", src.weights, describe_suspect(nonfinite, integer))
    return sd, CheckpointInfo(fmt.NAME, cfg, src.weights, src.extras, tuple(src.assumed), tuple(nonfinite),
                              tuple(integer))


def _explicit_config(config: CLIPConfig | dict | str | os.PathLike) -> CLIPConfig | dict:
    if isinstance(config, (CLIPConfig, dict)):
        return config
    p = Path(config)
    if p.is_file():
        return json.loads(p.read_text(encoding="utf-8"))
    return get_model_config(str(config))


def _with_activation(cfg: CLIPConfig, activation: str | None) -> CLIPConfig:
    if activation is None or activation == cfg.activation:
        return cfg
    return CLIPConfig.from_dict({**cfg.to_dict(), "activation": activation})


def _match_zoo_name(cfg: CLIPConfig) -> CLIPConfig:
    """Name an unnamed config after the zoo architecture it equals (e.g. an HF folder -> ViT-B/32)."""
    if cfg.name:
        return cfg
    arch = ("embed_dim", "vision", "text", "activation")
    cd = cfg.to_dict()
    for name, z in _load_zoo().items():
        if all(z.to_dict()[k] == cd[k] for k in arch):
            return CLIPConfig.from_dict({**cd, "name": name})
    return cfg


@overload
def load_model(path: str | os.PathLike, *, config: CLIPConfig | dict | str | None = ...,
               activation: str | None = ..., device: str | torch.device = ..., dtype: torch.dtype = ...,
               return_info: Literal[False] = ..., trust_torchscript: bool = ...) -> CLIP: ...
@overload
def load_model(path: str | os.PathLike, *, config: CLIPConfig | dict | str | None = ...,
               activation: str | None = ..., device: str | torch.device = ..., dtype: torch.dtype = ...,
               return_info: Literal[True], trust_torchscript: bool = ...) -> tuple[CLIP, CheckpointInfo]: ...
def load_model(path: str | os.PathLike, *, config: CLIPConfig | dict | str | None = None,
               activation: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, return_info: bool = False,
               trust_torchscript: bool = False) -> CLIP | tuple[CLIP, CheckpointInfo]:
    """Load any supported checkpoint as a :class:`CLIP` model in eval mode
    (``return_info=True``: ``(model, CheckpointInfo)``, e.g. to learn the detected format). A
    checkpoint of a ``bow`` / ``caption`` run (``config.objective``) comes back as the CLIP
    subclass carrying its head (:mod:`clipforge.models.heads`). ``trust_torchscript``: see
    :func:`read_checkpoint` (default: TorchScript archives are read without running their code)."""
    sd, info = read_checkpoint(path, config=config, activation=activation, trust_torchscript=trust_torchscript)
    if isinstance(info.config, FamilyConfig):
        # Built on the CPU, not on "meta": timm towers compute buffers (RoPE tables...) at construction.
        model = FamilyCLIP(info.config)
        sd = family.prepare(model, sd)  # CoCa's decoder carried; native SigLIP towers' keys
        attach_tokenizer(model, info.weights.parent)
    else:
        with torch.device("meta"):
            model = model_class(info.config)(info.config)
        model = model.to_empty(device="cpu")
    load_state_dict_strict(model, {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()},
                           f"{path} ({info.format} format)")
    model = model.to(device=device, dtype=dtype).eval()
    return (model, info) if return_info else model


def attach_tokenizer(model: FamilyCLIP, folder: Path) -> None:
    """A family model's tokenizer comes from the files beside its weights (``model.tokenizer``)."""
    t = model.config.tokenizer
    if t.get("kind") == "hf":
        model.tokenizer = FolderTokenizer(folder, t["context_length"], t.get("clean", "whitespace"),
                                          bool(t.get("strip_sep_token", False)))


def save_model(model: CLIP, path: str | os.PathLike) -> Path:
    """Write our format atomically: ``*.safetensors`` (config in the metadata) or a folder with
    ``model.safetensors`` + ``config.json``."""
    return native.write(model, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            activation: str | None = None, config: CLIPConfig | dict | str | None = None,
            trust_torchscript: bool = False) -> Path:
    """Convert a checkpoint between formats: ``to`` in clipforge | openai | openclip | hf
    (``trust_torchscript=True``: the one-time way out for an archive only ``torch.jit.load`` reads)."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r} (expected {', '.join(sorted(FORMATS))})")
    model = load_model(src, activation=activation, config=config, trust_torchscript=trust_torchscript)
    if isinstance(model, FamilyCLIP):
        if to in ("openclip", family.NAME):
            return family.write(model, dst)
        if to in ("hf", hf_siglip.NAME, hf_siglip2.NAME):  # SigLIP / SigLIP2 only (others refused there)
            siglip2 = to == hf_siglip2.NAME or (to == "hf" and hf_siglip.is_siglip2(model.config))
            return (hf_siglip2 if siglip2 else hf_siglip).write(model, dst)
        if to != native.NAME:
            raise ValueError(f"{src}: an open_clip family model converts to openclip, hf (SigLIP, SigLIP2) or clipforge, "
                             f"not {to!r}")
    return FORMATS[to].write(model, dst)


# Writers under the names earlier releases exported.
save_openai = openai.write
save_hf = hf.write
openclip_model_cfg = openclip.model_cfg

def __getattr__(name: str):
    if name == "load":  # moved up to clipforge.loading (it switches the fast layer on; storage does not)
        return moved("clipforge.checkpoints.load", "clipforge.loading", "load")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_model", "save_model", "convert", "read_checkpoint", "CheckpointInfo", "FORMATS",
           "load_state_dict_strict", "CheckpointError", "Source", "UntrustedTorchScript", "save_openai", "save_hf", "openclip_model_cfg"]
