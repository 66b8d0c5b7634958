"""Hugging Face ``SiglipModel`` folders (``config.json`` with ``model_type: siglip`` +
``model.safetensors``), read into and written from a SigLIP-shaped family model: timm's SigLIP ViT
(MAP head, ``timm_proj: none``) and open_clip's bidirectional, last-token text tower with a biased
projection. Plain tensor surgery (timm's fused ``qkv`` / the MAP head's ``q`` + ``kv`` <-> HF's
``q_proj`` / ``k_proj`` / ``v_proj`` and ``in_proj``), so no ``transformers`` import is needed.
``Siglip2Model`` (NaFlex: patches as a linear layer at variable resolution): :mod:`.hf_siglip2`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import PreprocessConfig
from ..families import FamilyCLIP, FamilyConfig
from ..utils.io import atomic_write_text
from .family import copy_tokenizer, openclip_state_dict
from .files import Source, write_safetensors

log = logging.getLogger(__name__)

NAME = "hf-siglip"
# timm's SigLIP ViTs by (width, depth, patch): the timm name prefix (the image size is appended).
TIMM_SIGLIP = {(768, 12, 16): "vit_base_patch16_siglip", (1024, 24, 16): "vit_large_patch16_siglip",
               (1152, 27, 14): "vit_so400m_patch14_siglip"}
_BLOCK_V = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_T = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_FIXED = {  # native -> HF
    "visual.trunk.patch_embed.proj": "vision_model.embeddings.patch_embedding",
    "visual.trunk.norm": "vision_model.post_layernorm",
    "visual.trunk.attn_pool.proj": "vision_model.head.attention.out_proj",
    "visual.trunk.attn_pool.norm": "vision_model.head.layernorm",
    "visual.trunk.attn_pool.mlp.fc1": "vision_model.head.mlp.fc1",
    "visual.trunk.attn_pool.mlp.fc2": "vision_model.head.mlp.fc2",
    "text.ln_final": "text_model.final_layer_norm", "text.text_projection": "text_model.head",
}


def detect(src: Source) -> bool:
    return "vision_model.head.probe" in src.state_dict and "text_model.head.weight" in src.state_dict


def _act(hidden_act: str) -> dict[str, str] | None:
    if hidden_act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return {"approximate": "tanh"}
    if hidden_act != "gelu":
        raise ValueError(f"SigLIP hidden_act={hidden_act!r} is not supported (gelu or gelu_pytorch_tanh)")
    return None


def config_from_hf(hf: dict[str, Any], pre: dict[str, Any] | None) -> FamilyConfig:
    """HF ``SiglipConfig`` (+ ``preprocessor_config.json``) -> the open_clip config of the same network."""
    v, t = hf["vision_config"], hf["text_config"]
    key = (v["hidden_size"], v["num_hidden_layers"], v["patch_size"])
    if key not in TIMM_SIGLIP:
        raise ValueError(f"SigLIP vision tower width/depth/patch {key} has no timm SigLIP model "
                         f"(supported: {sorted(TIMM_SIGLIP)})")
    if _act(v.get("hidden_act", "gelu_pytorch_tanh")) is not None:
        # timm's SigLIP ViTs (as open_clip builds them) use the exact GELU; HF's released configs say tanh.
        log.warning("SigLIP vision hidden_act=%r: the timm tower computes the exact GELU (as open_clip's "
                    "ViT-*-SigLIP), so image features differ from transformers' by the approximation (~1e-3)",
                    v.get("hidden_act", "gelu_pytorch_tanh"))
    size = int(v["image_size"])
    text_cfg: dict[str, Any] = {
        "context_length": int(t.get("max_position_embeddings", 64)), "vocab_size": int(t["vocab_size"]),
        "width": int(t["hidden_size"]), "heads": int(t["num_attention_heads"]), "layers": int(t["num_hidden_layers"]),
        "mlp_ratio": t["intermediate_size"] / t["hidden_size"], "no_causal_mask": True, "proj_bias": True,
        "pool_type": "last", "norm_kwargs": {"eps": float(t.get("layer_norm_eps", 1e-6))},
        "hf_tokenizer_name": "local-dir", "tokenizer_kwargs": {"clean": "canonicalize"}}
    act = _act(t.get("hidden_act", "gelu_pytorch_tanh"))
    if act:
        text_cfg["act_kwargs"] = act
    model_cfg = {"embed_dim": int(v["hidden_size"]), "init_logit_bias": -10, "custom_text": True,
                 "vision_cfg": {"image_size": size, "timm_model_name": f"{TIMM_SIGLIP[key]}_{size}",
                                "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                 "text_cfg": text_cfg}
    p = pre or {}
    resample = {2: "bilinear", 3: "bicubic"}.get(p.get("resample", 2), "bilinear")
    preprocess = PreprocessConfig(image_size=size, mean=tuple(p.get("image_mean", (0.5,) * 3)),
                                  std=tuple(p.get("image_std", (0.5,) * 3)), interpolation=resample,  # type: ignore[arg-type]
                                  resize_mode="squash")
    return FamilyConfig(model_cfg=model_cfg, preprocess=preprocess,
                        tokenizer={"kind": "hf", "context_length": text_cfg["context_length"], "clean": "canonicalize",
                                   "strip_sep_token": False})


def read_config(src: Source, activation: str | None = None) -> FamilyConfig:
    if isinstance(src.declared, FamilyConfig):
        return src.declared
    hf = src.side_json("config.json")
    if hf is None or hf.get("model_type") != "siglip":
        raise ValueError(f"{src.weights} is in Hugging Face SigLIP layout but no SigLIP config.json is beside it")
    return config_from_hf(hf, src.side_json("preprocessor_config.json"))


def _pairs(depth_v: int, depth_t: int) -> dict[str, str]:
    """native -> HF name of every plain (renamed, untouched) tensor prefix."""
    m = dict(_FIXED)
    for i in range(depth_v):
        for a, b in _BLOCK_V.items():
            m[f"visual.trunk.blocks.{i}.{a}"] = f"vision_model.encoder.layers.{i}.{b}"
    for i in range(depth_t):
        for a, b in _BLOCK_T.items():
            m[f"text.transformer.resblocks.{i}.{a}"] = f"text_model.encoder.layers.{i}.{b}"
    return m


def _depths(keys: Any, a: str, b: str) -> tuple[int, int]:
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})
    return count(a), count(b)


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dv, dt = _depths(sd, "vision_model.encoder.layers.", "text_model.encoder.layers.")
    inv = {b: a for a, b in _pairs(dv, dt).items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(dv):
        p = f"vision_model.encoder.layers.{i}.self_attn."
        for s in ("weight", "bias"):
            out[f"visual.trunk.blocks.{i}.attn.qkv.{s}"] = torch.cat([sd[f"{p}{n}_proj.{s}"] for n in "qkv"])
    for i in range(dt):
        p = f"text_model.encoder.layers.{i}.self_attn."
        out[f"text.transformer.resblocks.{i}.attn.in_proj_weight"] = torch.cat([sd[f"{p}{n}_proj.weight"] for n in "qkv"])
        out[f"text.transformer.resblocks.{i}.attn.in_proj_bias"] = torch.cat([sd[f"{p}{n}_proj.bias"] for n in "qkv"])
    w, b = sd["vision_model.head.attention.in_proj_weight"], sd["vision_model.head.attention.in_proj_bias"]
    d = w.shape[1]
    out["visual.trunk.attn_pool.q.weight"], out["visual.trunk.attn_pool.kv.weight"] = w[:d], w[d:]
    out["visual.trunk.attn_pool.q.bias"], out["visual.trunk.attn_pool.kv.bias"] = b[:d], b[d:]
    out["visual.trunk.attn_pool.latent"] = sd["vision_model.head.probe"]
    out["visual.trunk.pos_embed"] = sd["vision_model.embeddings.position_embedding.weight"][None]
    out["text.token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["text.positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"].reshape(())
    out["logit_bias"] = sd["logit_bias"].reshape(())
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if stem in inv:
            out[f"{inv[stem]}.{leaf}"] = v
    unread = sorted(set(sd) - set(from_native(out)) - {k for k in sd if k.endswith("position_ids")})
    if unread:  # never drop weights silently
        raise ValueError(f"SiglipModel weights clipforge does not map ({len(unread)}): {', '.join(unread[:5])}")
    return out


def from_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dv, dt = _depths(sd, "visual.trunk.blocks.", "text.transformer.resblocks.")
    pairs = _pairs(dv, dt)
    out: dict[str, torch.Tensor] = {}
    for i in range(dv):
        for s in ("weight", "bias"):
            q, k, v = sd[f"visual.trunk.blocks.{i}.attn.qkv.{s}"].chunk(3)
            for n, t in zip("qkv", (q, k, v)):
                out[f"vision_model.encoder.layers.{i}.self_attn.{n}_proj.{s}"] = t
    for i in range(dt):
        for s, key in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            for n, t in zip("qkv", sd[f"text.transformer.resblocks.{i}.attn.{key}"].chunk(3)):
                out[f"text_model.encoder.layers.{i}.self_attn.{n}_proj.{s}"] = t
    out["vision_model.head.attention.in_proj_weight"] = torch.cat(
        [sd["visual.trunk.attn_pool.q.weight"], sd["visual.trunk.attn_pool.kv.weight"]])
    out["vision_model.head.attention.in_proj_bias"] = torch.cat(
        [sd["visual.trunk.attn_pool.q.bias"], sd["visual.trunk.attn_pool.kv.bias"]])
    out["vision_model.head.probe"] = sd["visual.trunk.attn_pool.latent"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.trunk.pos_embed"][0]
    out["text_model.embeddings.token_embedding.weight"] = sd["text.token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["text.positional_embedding"]
    out["logit_scale"] = sd["logit_scale"].reshape(1)
    out["logit_bias"] = sd["logit_bias"].reshape(1)
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if stem in pairs:
            out[f"{pairs[stem]}.{leaf}"] = v
    return {k: v.contiguous() for k, v in out.items()}


#: The one line for a model no Hugging Face class holds (open_clip's other families, SigLIP variants
#: off timm's SigLIP ViTs).
REFUSAL = ("Hugging Face has a model class for two of open_clip's families only: SigLIP (SiglipModel) and "
           "SigLIP2 (Siglip2Model), with timm's SigLIP ViT and MAP head, a bidirectional last-token text tower "
           "and a logit bias; convert this model to openclip or clipforge")


def is_siglip2(cfg: FamilyConfig) -> bool:
    """open_clip's SigLIP2 configs differ from SigLIP's (same towers) by the text tower's tanh GELU."""
    return (cfg.model_cfg.get("text_cfg", {}).get("act_kwargs") or {}).get("approximate") == "tanh"


def is_siglip_shaped(cfg: FamilyConfig) -> bool:
    if not isinstance(cfg, FamilyConfig):
        return False
    v, t = cfg.model_cfg.get("vision_cfg", {}), cfg.model_cfg.get("text_cfg", {})
    return (str(v.get("timm_model_name", "")).startswith(tuple(TIMM_SIGLIP.values())) and v.get("timm_pool") == "map"
            and v.get("timm_proj") == "none" and t.get("no_causal_mask") and t.get("pool_type") == "last"
            and t.get("proj_bias") and not t.get("hf_model_name") and cfg.init_logit_bias is not None)


def hf_config(cfg: FamilyConfig, model: FamilyCLIP) -> dict[str, Any]:
    if model.native_config is not None:  # the native SigLIP towers
        nv = model.native_config.vision
        width, hidden, depth, heads = nv.width, int(nv.width * nv.mlp_ratio), nv.layers, nv.heads
        patch, eps = nv.patch_size, model.native_config.norm_eps
    else:  # timm's SigLIP ViT
        v = model.visual.trunk  # type: ignore[union-attr]
        width, hidden, depth = v.embed_dim, v.blocks[0].mlp.fc1.out_features, len(v.blocks)
        heads, patch, eps = v.blocks[0].attn.num_heads, v.patch_embed.patch_size[0], v.norm.eps
    t = cfg.model_cfg["text_cfg"]
    width_t = int(t.get("width", 512))
    act = (t.get("act_kwargs") or {}).get("approximate", "none")
    pad = getattr(getattr(model, "tokenizer", None), "pad_id", 1)
    return {
        "model_type": "siglip", "architectures": ["SiglipModel"],
        "text_config": {"model_type": "siglip_text_model", "vocab_size": cfg.text.vocab_size, "hidden_size": width_t,
                        "intermediate_size": int(width_t * t.get("mlp_ratio", 4.0)),
                        "num_hidden_layers": int(t.get("layers", 12)), "num_attention_heads": int(t.get("heads", 8)),
                        "max_position_embeddings": int(t.get("context_length", 77)),
                        "layer_norm_eps": float((t.get("norm_kwargs") or {}).get("eps", 1e-5)),
                        "hidden_act": "gelu_pytorch_tanh" if act == "tanh" else "gelu",
                        "projection_size": cfg.embed_dim, "pad_token_id": int(pad or 0)},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": width, "intermediate_size": hidden,
                          "num_hidden_layers": depth, "num_attention_heads": heads, "image_size": cfg.vision.image_size,
                          "patch_size": patch, "layer_norm_eps": eps, "hidden_act": "gelu"},
    }


def write(model: FamilyCLIP, path: str | os.PathLike) -> Path:
    """An HF ``SiglipModel`` folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and the tokenizer files."""
    cfg = model.config
    if not isinstance(model, FamilyCLIP) or not is_siglip_shaped(cfg):
        raise ValueError(REFUSAL)
    p = cfg.preprocess
    pre = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": p.image_size,
           "width": p.image_size}, **image_processor(cfg)}
    return write_folder(model, path, hf_config(cfg, model), from_native(openclip_state_dict(model)), pre)


def image_processor(cfg: FamilyConfig) -> dict[str, Any]:
    """The ``preprocessor_config.json`` entries SiglipImageProcessor and Siglip2ImageProcessor share."""
    p = cfg.preprocess
    return {"resample": 3 if p.interpolation == "bicubic" else 2, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std)}


def write_folder(model: FamilyCLIP, path: str | os.PathLike, hf: dict[str, Any], sd: dict[str, torch.Tensor],
                 pre: dict[str, Any]) -> Path:
    """A transformers folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``, the
    tokenizer files."""
    path = Path(path)
    if path.suffix:
        raise ValueError(f"{path}: a Hugging Face model is a folder; give a path without a suffix")
    path.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(model, path)
    write_safetensors(path / "model.safetensors", sd, {"format": "pt"})
    atomic_write_text(path / "preprocessor_config.json", json.dumps(pre, indent=2))
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2))
    return path
