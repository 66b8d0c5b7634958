"""The config of a model family beyond OpenAI's CLIP: open_clip's own ``model_cfg`` dict, kept
verbatim (it is the architecture's one description, and what open_clip rebuilds it from), plus
what our loaders resolve once: preprocessing, the tokenizer, and a Hugging Face text tower's
``config.json`` (so a saved model never needs the folder it came from again).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig

# open_clip text_cfg / vision_cfg keys each tower implements; any other key set to a non-default
# value changes the architecture and is refused by name (never silently ignored).
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "embed_cls", "pad_id",
             "eos_id", "no_causal_mask", "pool_type", "proj_bias", "proj_type", "act_kwargs", "norm_kwargs",
             "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "output_tokens", "hf_model_name",
             "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
TEXT_DEFAULTS = {"ls_init_value": None, "final_ln_after_pool": False, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False}
VISION_KEYS = {"image_size", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
               "timm_proj_bias", "timm_drop", "timm_drop_path", "layers", "width", "head_width", "mlp_ratio",
               "patch_size", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "output_tokens",
               "patch_dropout", "pool_type"}
VISION_DEFAULTS = {"ls_init_value": None, "no_ln_pre": False, "final_ln_after_pool": False,
                   "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
                   "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                   "scale_attn": False, "scale_fc": False}
MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "custom_text", "multimodal_cfg", "nonscalar_logit_scale", "cast_dtype"}


def check_model_cfg(model_cfg: dict[str, Any], source: str) -> None:
    """Refuse, in one line naming the key, an open_clip option no family tower implements."""
    for key in model_cfg:
        if key not in MODEL_KEYS:
            raise ValueError(f"{source}: model_cfg.{key} is not supported by clipforge")
    for part, keys, defaults in (("text_cfg", TEXT_KEYS, TEXT_DEFAULTS), ("vision_cfg", VISION_KEYS, VISION_DEFAULTS)):
        for key, val in model_cfg.get(part, {}).items():
            if key in keys:
                continue
            if key not in defaults or val != defaults[key]:
                raise ValueError(f"{source}: {part}.{key}={val!r} is not supported by clipforge")
    text = model_cfg.get("text_cfg", {})
    if text.get("pool_type", "argmax") not in ("first", "last", "argmax", "eos", "none"):
        raise ValueError(f"{source}: text_cfg.pool_type={text['pool_type']!r} is not one of first|last|argmax|eos")
    vision = model_cfg.get("vision_cfg", {})
    if not vision.get("timm_model_name") and vision.get("pool_type", "tok") != "tok" \
            and not vision.get("attentional_pool"):
        raise ValueError(f"{source}: vision_cfg.pool_type={vision['pool_type']!r} is not supported (only 'tok')")
    if model_cfg.get("nonscalar_logit_scale"):
        raise ValueError(f"{source}: model_cfg.nonscalar_logit_scale is not supported by clipforge")


@dataclass(frozen=True)
class VisionSummary:
    """What callers read of an image tower (``model.config.vision``)."""

    kind: str  # "timm" | "vit" (open_clip's own ViT)
    image_size: int


@dataclass(frozen=True)
class TextSummary:
    """What callers read of a text tower (``model.config.text``)."""

    kind: str  # "transformer" (open_clip's TextTransformer) | "hf"
    context_length: int
    vocab_size: int


@dataclass
class FamilyConfig:
    """A model of one of open_clip's families (SigLIP, EVA02, ConvNeXt, MobileCLIP, PE-Core, CoCa,
    Hugging Face text towers): ``model_cfg`` is open_clip's, ``tokenizer`` says how ids are made
    (``{"kind": "openai-bpe"|"hf", "context_length", "clean", ...}``), ``hf_text_config`` is the
    text tower's HF ``config.json`` when it has one."""

    model_cfg: dict[str, Any]
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "openai-bpe", "context_length": 77})
    hf_text_config: dict[str, Any] | None = None
    name: str | None = None
    max_logit_scale: float = 100.0
    objective: str = "contrastive"  # contrastive towers only (CoCa's decoder is carried, not built)
    family: str = "openclip"

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            self.preprocess = PreprocessConfig(**self.preprocess)
        check_model_cfg(self.model_cfg, self.name or "model config")
        if self.objective != "contrastive":
            raise ValueError(f"a family model is contrastive only, got objective {self.objective!r}")
        if self.preprocess.image_size != self.vision.image_size:
            raise ValueError(f"preprocess.image_size {self.preprocess.image_size} != the image tower's "
                             f"{self.vision.image_size}")

    # --- what callers read ------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.model_cfg.get("quick_gelu") else "gelu"

    @property
    def init_logit_scale(self) -> float:
        return float(self.model_cfg.get("init_logit_scale", math.log(1 / 0.07)))

    @property
    def init_logit_bias(self) -> float | None:
        b = self.model_cfg.get("init_logit_bias")
        return None if b is None else float(b)

    @property
    def vision(self) -> VisionSummary:
        v = self.model_cfg.get("vision_cfg", {})
        size = v.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"vision_cfg.image_size={size!r}: only square images are supported")
            size = size[0]
        return VisionSummary("timm" if v.get("timm_model_name") else "vit", int(size))

    @property
    def text(self) -> TextSummary:
        t = self.model_cfg.get("text_cfg", {})
        vocab = t.get("vocab_size", 49408)
        if self.hf_text_config is not None:
            vocab = self.hf_text_config.get("vocab_size", vocab)
        return TextSummary("hf" if t.get("hf_model_name") else "transformer",
                           int(self.tokenizer.get("context_length", t.get("context_length", 77))), int(vocab))

    @property
    def custom_text(self) -> bool:
        """open_clip's class choice: ``CustomTextCLIP`` keeps the text tower under ``text.``;
        its ``CLIP`` spreads the text modules at the top level of the state dict."""
        m = self.model_cfg
        return bool(m.get("custom_text") or m.get("text_cfg", {}).get("hf_model_name") or "multimodal_cfg" in m)

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        p = self.preprocess
        d: dict[str, Any] = {
            "family": self.family, "name": self.name, "model_cfg": copy.deepcopy(self.model_cfg),
            "preprocess": {"image_size": p.image_size, "mean": list(p.mean), "std": list(p.std),
                           "interpolation": p.interpolation, "resize_mode": p.resize_mode},
            "tokenizer": dict(self.tokenizer), "max_logit_scale": self.max_logit_scale}
        if self.hf_text_config is not None:
            d["hf_text_config"] = copy.deepcopy(self.hf_text_config)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FamilyConfig":
        known = {"family", "name", "model_cfg", "preprocess", "tokenizer", "hf_text_config", "max_logit_scale",
                 "objective"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown family config keys: {sorted(unknown)}")
        if d.get("family", "openclip") != "openclip":
            raise ValueError(f"unknown model family {d.get('family')!r} (expected 'openclip')")
        return cls(**{k: v for k, v in d.items()})

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "FamilyConfig":
        p = Path(text_or_path)
        text = p.read_text(encoding="utf-8") if p.suffix == ".json" and p.exists() else str(text_or_path)
        return cls.from_dict(json.loads(text))


def is_family_dict(d: Any) -> bool:
    return isinstance(d, dict) and d.get("family") == "openclip" and "model_cfg" in d
