"""OpenAI CLIP format: plain state dicts and the TorchScript archives OpenAI released (weights are
read from the archive; its code never runs). OpenCLIP's ``CLIP`` class uses the same names.

Our parameter names equal OpenAI's except that the text tower lives under ``text.``; the image
tower (``visual.*``) and ``logit_scale`` are identical. The architecture is read from tensor
shapes, as OpenAI's ``build_model`` does, so any state dict in this layout describes itself
except for the activation, which shapes cannot reveal: :func:`write` records it (and the
preprocessing) in ``clipforge_config.json`` beside the file, and :func:`read_config` warns when
a bare state dict leaves it to a guess.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from ..config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig
from ..models import CLIP
from ..utils.io import atomic_open, atomic_write_text
from .files import Source, contrastive_only, native_state_dict, without_logit_bias

log = logging.getLogger(__name__)
NAME = "openai"
SIDECAR = "clipforge_config.json"

TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Scalars stored in OpenAI's TorchScript archives, not parameters.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_openai_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in sd and any(k.startswith("visual.") for k in sd)


def detect(src: Source) -> bool:
    return is_openai_layout(src.state_dict)


def read_config(src: Source, activation: str | None = None) -> CLIPConfig:
    """The declared clipforge config if any (explicit, embedded or sidecar), else the shapes."""
    if isinstance(src.declared, CLIPConfig):
        return src.declared
    if isinstance(src.declared, dict) and "embed_dim" in src.declared and "vision" in src.declared:
        return CLIPConfig.from_dict(src.declared)
    # OpenAI's own TorchScript archives are QuickGELU with 64-wide heads by definition; a bare state
    # dict records neither (width // 64 heads is right for every released OpenAI/OpenCLIP model).
    if not any(k in src.state_dict for k in OPENAI_EXTRA_KEYS):
        if activation is None:
            src.assumed.append("activation")
            log.warning("%s: the activation is not recorded in this checkpoint; assuming QuickGELU "
                        "(OpenAI's). Pass activation='gelu' for OpenCLIP models trained with GELU.", src.weights)
        src.assumed.append("heads")
    return infer_config(src.state_dict, activation=activation or "quick_gelu")


def write(model: CLIP, path: str | os.PathLike) -> Path:
    """A plain OpenAI-layout state dict (``torch.save``) that OpenAI's ``build_model`` and OpenCLIP
    (``pretrained=FILE``) load, with ``clipforge_config.json`` beside it for what shapes cannot tell."""
    contrastive_only(model, "openai")
    without_logit_bias(model, "openai")
    path = Path(path)
    if path.is_dir() or not path.suffix:
        raise ValueError(f"{path}: the openai format is a single file (e.g. model.pt); "
                         f"for a folder open_clip reads with local-dir:, convert --to openclip")
    sd = from_native(native_state_dict(model))
    with atomic_open(path, "wb") as f:
        torch.save(sd, f)
    atomic_write_text(path.parent / SIDECAR, model.config.to_json())
    return path


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI/OpenCLIP keys -> clipforge keys (``text.`` prefix on the text tower)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in OPENAI_EXTRA_KEYS or k == "attn_mask" or k.endswith(".attn_mask"):
            continue
        out[f"text.{k}" if k.startswith(TEXT_PREFIXES) else k] = v
    return out


def from_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clipforge keys -> OpenAI keys."""
    return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict[str, torch.Tensor], activation: str = "quick_gelu",
                 preprocess: PreprocessConfig | None = None) -> CLIPConfig:
    """Architecture from the shapes of an OpenAI-layout state dict (OpenAI's ``build_model``)."""
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = _count_blocks(sd, "visual.transformer.resblocks.")
            hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = VisionConfig(kind="vit", image_size=patch * grid, width=width, layers=layers,
                                  heads=max(width // 64, 1), patch_size=patch, mlp_ratio=hidden / width)
        else:
            stages = [_count_blocks(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4)]
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            out_w = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(kind="resnet", image_size=out_w * 32, width=width, layers=stages,
                                  heads=width * 32 // 64)
        embed_dim = sd["text_projection"].shape[1]
        t_width = sd["ln_final.weight"].shape[0]
        t_hidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        ctx = sd["positional_embedding"].shape[0]
        text = TextConfig(context_length=ctx, vocab_size=sd["token_embedding.weight"].shape[0],
                          width=t_width, heads=max(t_width // 64, 1),
                          layers=_count_blocks(sd, "transformer.resblocks."), mlp_ratio=t_hidden / t_width)
    except KeyError as e:
        raise ValueError(f"state dict is missing {e.args[0]!r}, needed to infer the architecture") from None
    pre = preprocess or PreprocessConfig()
    pre = PreprocessConfig(image_size=vision.image_size, mean=pre.mean, std=pre.std,
                           interpolation=pre.interpolation, resize_mode=pre.resize_mode)
    # OpenCLIP's sigmoid-loss models carry a learned ``logit_bias`` scalar beside ``logit_scale``.
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, activation=activation,  # type: ignore[arg-type]
                      preprocess=pre, tokenizer=TokenizerConfig(context_length=ctx), init_logit_bias=bias)
