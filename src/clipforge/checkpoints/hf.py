"""Hugging Face ``transformers`` CLIPModel layout: key mapping both ways and config translation.

HF splits each attention's fused input projection into ``q_proj``/``k_proj``/``v_proj`` and
stores the two projections as bias-free ``Linear`` weights (transposed relative to OpenAI's
``[width, embed]`` matrices). ResNet towers have no HF counterpart. No ``transformers`` import is
needed: the mapping is plain tensor surgery and the config is plain JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig
from ..models import CLIP
from ..tokenizer import get_tokenizer
from ..utils.io import atomic_write_text
from .files import Source, contrastive_only, native_state_dict, without_logit_bias, write_safetensors

NAME = "hf"

_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_FIXED = {  # native -> HF
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # HF's spelling, kept on purpose
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TOWERS = (("text.transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers."))
# Buffers some HF checkpoints carry that are not parameters.
HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def is_hf_layout(sd: dict[str, Any]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in sd)


def detect(src: Source) -> bool:
    return is_hf_layout(src.state_dict)


def read_config(src: Source, activation: str | None = None) -> CLIPConfig:
    """A given :class:`CLIPConfig` as is; otherwise the HF ``config.json`` (the declared dict, else
    the one beside the weights) with ``preprocessor_config.json``."""
    if isinstance(src.declared, CLIPConfig):
        return src.declared
    hf_cfg = src.declared if isinstance(src.declared, dict) and "text_config" in src.declared \
        else src.side_json("config.json")
    if hf_cfg is None or "text_config" not in hf_cfg:
        raise ValueError(f"{src.weights} is in Hugging Face layout but no HF config.json was found "
                         f"beside it (pass config=...)")
    return config_from_hf(hf_cfg, src.side_json("preprocessor_config.json"))


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPModel state dict -> clipforge keys (q/k/v concatenated, projections transposed)."""
    inv_fixed = {v: k for k, v in _FIXED.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in HF_IGNORED:
            continue
        if k in inv_fixed:
            out[inv_fixed[k]] = v
        elif k == "text_projection.weight":
            out["text.text_projection"] = v.t().contiguous()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        else:
            for native_pre, hf_pre in _TOWERS:
                if k.startswith(hf_pre):
                    idx, rest = k[len(hf_pre):].split(".", 1)
                    m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
                    if m:
                        qkv.setdefault(f"{native_pre}{idx}.attn.in_proj_{m.group(2)}", {})[m.group(1)] = v
                        break
                    for nat, hf in _BLOCK.items():
                        if rest.startswith(hf + "."):
                            out[f"{native_pre}{idx}.{nat}{rest[len(hf):]}"] = v
                            break
                    else:
                        out[k] = v  # unknown: reported as unexpected by the strict loader
                    break
            else:
                out[k] = v
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF checkpoint has incomplete q/k/v projections for {key}: {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def from_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clipforge state dict -> HF CLIPModel keys (ViT image towers only)."""
    if any(k.startswith("visual.layer1.") for k in sd):
        raise ValueError("ResNet image towers have no Hugging Face CLIPModel counterpart; "
                         "convert to 'openai' or 'clipforge' instead")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _FIXED:
            out[_FIXED[k]] = v
        elif k == "text.text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        else:
            for native_pre, hf_pre in _TOWERS:
                if k.startswith(native_pre):
                    idx, rest = k[len(native_pre):].split(".", 1)
                    if rest.startswith("attn.in_proj_"):
                        kind = rest.rsplit("_", 1)[1]  # weight | bias
                        for name, chunk in zip("qkv", v.chunk(3, dim=0)):
                            out[f"{hf_pre}{idx}.self_attn.{name}_proj.{kind}"] = chunk.contiguous()
                        break
                    for nat, hf in _BLOCK.items():
                        if rest.startswith(nat + "."):
                            out[f"{hf_pre}{idx}.{hf}{rest[len(nat):]}"] = v
                            break
                    else:
                        raise ValueError(f"no Hugging Face name for parameter {k!r}")
                    break
            else:
                raise ValueError(f"no Hugging Face name for parameter {k!r}")
    return out


def _act(name: str, where: str) -> str:
    if name in ("quick_gelu",):
        return "quick_gelu"
    if name in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        if name != "gelu":
            raise ValueError(f"{where}: activation {name!r} is not supported (only gelu and quick_gelu)")
        return "gelu"
    raise ValueError(f"{where}: unsupported hidden_act {name!r}")


def config_from_hf(cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    """Translate an HF ``config.json`` (model_type 'clip') into a :class:`CLIPConfig`."""
    if cfg.get("model_type") not in (None, "clip"):
        raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'clip'")
    try:
        t, v = cfg["text_config"], cfg["vision_config"]
    except KeyError as e:
        raise ValueError(f"HF config.json is missing {e.args[0]!r}") from None
    t_act = _act(t.get("hidden_act", "quick_gelu"), "text_config.hidden_act")
    v_act = _act(v.get("hidden_act", "quick_gelu"), "vision_config.hidden_act")
    if t_act != v_act:
        raise ValueError(f"text and vision towers use different activations ({t_act} vs {v_act}); "
                         "clipforge configs have one activation")
    t_eps, v_eps = t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5)
    if not math.isclose(t_eps, v_eps):
        raise ValueError(f"text and vision layer_norm_eps differ ({t_eps} vs {v_eps})")
    tw, vw = t.get("hidden_size", 512), v.get("hidden_size", 768)
    image_size = v.get("image_size", 224)
    ctx = t.get("max_position_embeddings", 77)
    pre = PreprocessConfig(image_size=image_size)
    if preprocessor:
        pre = PreprocessConfig(image_size=image_size,
                               mean=tuple(preprocessor.get("image_mean", pre.mean)),
                               std=tuple(preprocessor.get("image_std", pre.std)),
                               interpolation="bilinear" if preprocessor.get("resample", 3) == 2 else "bicubic")
    return CLIPConfig(
        embed_dim=cfg.get("projection_dim", 512),
        vision=VisionConfig(kind="vit", image_size=image_size, width=vw,
                            layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                            patch_size=v.get("patch_size", 32), mlp_ratio=v.get("intermediate_size", 4 * vw) / vw),
        text=TextConfig(context_length=ctx, vocab_size=t.get("vocab_size", 49408), width=tw,
                        heads=t.get("num_attention_heads", 8), layers=t.get("num_hidden_layers", 12),
                        mlp_ratio=t.get("intermediate_size", 4 * tw) / tw),
        activation=t_act,  # type: ignore[arg-type]
        norm_eps=t_eps,
        init_logit_scale=cfg.get("logit_scale_init_value", math.log(1 / 0.07)),
        preprocess=pre,
        tokenizer=TokenizerConfig(context_length=ctx),
    )


def config_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) contents for ``transformers`` to load our weights."""
    if config.vision.kind != "vit":
        raise ValueError("ResNet image towers have no Hugging Face CLIPModel counterpart")
    t, v = config.text, config.vision
    common = {"hidden_act": config.activation, "layer_norm_eps": config.norm_eps,
              "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
              "projection_dim": config.embed_dim}
    text_cfg = {**common, "model_type": "clip_text_model", "hidden_size": t.width,
                "intermediate_size": int(t.width * t.mlp_ratio), "num_attention_heads": t.heads,
                "num_hidden_layers": t.layers, "max_position_embeddings": t.context_length,
                "vocab_size": t.vocab_size, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
    vision_cfg = {**common, "model_type": "clip_vision_model", "hidden_size": v.width,
                  "intermediate_size": int(v.width * v.mlp_ratio), "num_attention_heads": v.heads,
                  "num_hidden_layers": v.layers, "image_size": v.image_size, "patch_size": v.patch_size,
                  "num_channels": 3}
    hf = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
          "logit_scale_init_value": config.init_logit_scale, "initializer_factor": 1.0,
          "text_config": text_cfg, "vision_config": vision_cfg, "torch_dtype": "float32"}
    p = config.preprocess
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
           "size": {"shortest_edge": p.image_size}, "resample": 3 if p.interpolation == "bicubic" else 2,
           "do_center_crop": True, "crop_size": {"height": p.image_size, "width": p.image_size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(p.mean), "image_std": list(p.std), "do_convert_rgb": True}
    return hf, pre


def write(model: CLIP, folder: str | os.PathLike) -> Path:
    """A Hugging Face ``CLIPModel`` folder: ``config.json``, ``model.safetensors``,
    ``preprocessor_config.json`` and the tokenizer files (``vocab.json``, ``merges.txt``)."""
    contrastive_only(model, "Hugging Face")
    without_logit_bias(model, "Hugging Face CLIPModel")
    folder = Path(folder)
    cfg_json, pre_json = config_to_hf(model.config)
    sd = from_native(native_state_dict(model))
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(cfg_json, indent=2))
    atomic_write_text(folder / "preprocessor_config.json", json.dumps(pre_json, indent=2))
    atomic_write_text(folder / "clipforge_config.json", model.config.to_json())
    _write_tokenizer(folder, model.config.text.context_length)
    return folder


def _write_tokenizer(folder: Path, context_length: int) -> None:
    tok = get_tokenizer()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    atomic_write_text(folder / "vocab.json", json.dumps(tok.encoder, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    atomic_write_text(folder / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
        **special}, indent=2))
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
