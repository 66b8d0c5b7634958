"""OpenAI CLIP layout (also OpenCLIP's ``CLIP`` class): key mapping and architecture inference.

Our parameter names equal OpenAI's except that the text tower lives under ``text.``; the image
tower (``visual.*``) and ``logit_scale`` are identical. The architecture is read from tensor
shapes, as OpenAI's ``build_model`` does, so any state dict in this layout describes itself
(except for the activation, which shapes cannot reveal).
"""

from __future__ import annotations

import re

import torch

from ..config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig

TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Scalars stored in OpenAI's TorchScript archives, not parameters.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_openai_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in sd and any(k.startswith("visual.") for k in sd)


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
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, activation=activation,  # type: ignore[arg-type]
                      preprocess=pre, tokenizer=TokenizerConfig(context_length=ctx))
