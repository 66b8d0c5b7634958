"""Typed configuration for CLIP models and the named model zoo.

A model is fully described by its :class:`CLIPConfig`: architecture, activation, norm epsilon,
preprocessing and tokenizer settings all travel together, and every checkpoint we write carries
its config, so weights are never reloaded under the wrong activation or preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: What a model was trained to do (the three objectives of the paper's Figure 2): ``contrastive``
#: (CLIP), ``bow`` (predict the caption's bag of BPE tokens from the image), ``caption`` (predict
#: the caption's tokens in order). See :mod:`clipforge.models.objectives`.
OBJECTIVES = ("contrastive", "bow", "caption")


@dataclass
class VisionConfig:
    """Image tower. ``kind='vit'`` uses ``layers: int`` and ``patch_size``; ``kind='resnet'``
    uses ``layers`` as four stage depths and ``width`` as the stem width (64 for RN50)."""

    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | list[int] = 12
    heads: int = 12
    patch_size: int = 32
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision.kind must be 'vit' or 'resnet', got {self.kind!r}")
        if self.kind == "resnet":
            if isinstance(self.layers, int) or len(self.layers) != 4:
                raise ValueError(f"a resnet vision tower needs 4 stage depths, got layers={self.layers!r}")
            self.layers = [int(x) for x in self.layers]
            if self.heads != self.width * 32 // 64:
                # The attention-pool head count is fixed by the width in OpenAI's and OpenCLIP's code;
                # anything else could not be exported to (or re-read from) their formats.
                raise ValueError(f"resnet heads must be width*32//64 = {self.width * 32 // 64}, got {self.heads}")
            if self.image_size % 32:
                raise ValueError(f"resnet image_size must be a multiple of 32, got {self.image_size}")
        else:
            if not isinstance(self.layers, int):
                raise ValueError(f"a vit vision tower needs an integer depth, got layers={self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.width % self.heads:
                raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // (self.patch_size if self.kind == "vit" else 32)


@dataclass
class TextConfig:
    """Causal text Transformer over BPE tokens; features are taken at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


@dataclass
class PreprocessConfig:
    """How images must be prepared for a given set of weights."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"

    def __post_init__(self) -> None:
        self.mean = tuple(float(x) for x in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(x) for x in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("preprocess mean and std need 3 values each")


@dataclass
class TokenizerConfig:
    """Tokenizer that produced the ids the text tower was trained on."""

    kind: Literal["openai-bpe"] = "openai-bpe"
    context_length: int = 77


@dataclass
class CLIPConfig:
    """Everything needed to build a CLIP model and use its weights correctly."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    norm_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # SigLIP's learned logit bias (added to every logit; -10 at init in the paper). ``None``: no bias,
    # and the key is absent from ``to_dict()``, so every bias-free config and file reads as before.
    init_logit_bias: float | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    name: str | None = None
    # The head the weights carry besides the two towers (``bow``, ``caption``); written to a
    # config's dict only when not ``contrastive``, so every contrastive config reads as before.
    objective: Literal["contrastive", "bow", "caption"] = "contrastive"

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if isinstance(self.preprocess, dict):
            self.preprocess = PreprocessConfig(**self.preprocess)
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerConfig(**self.tokenizer)
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.preprocess.image_size != self.vision.image_size:
            raise ValueError(
                f"preprocess.image_size {self.preprocess.image_size} != vision.image_size "
                f"{self.vision.image_size}"
            )
        if self.tokenizer.context_length != self.text.context_length:
            raise ValueError(
                f"tokenizer.context_length {self.tokenizer.context_length} != text.context_length "
                f"{self.text.context_length}"
            )

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"]["mean"] = list(d["preprocess"]["mean"])
        d["preprocess"]["std"] = list(d["preprocess"]["std"])
        if d["objective"] == "contrastive":
            del d["objective"]  # the default: contrastive configs (and their hashes, files) unchanged
        if d["init_logit_bias"] is None:
            del d["init_logit_bias"]  # the same for models without a logit bias
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIPConfig keys: {sorted(unknown)}")
        d = dict(d)
        for key, sub in (("vision", VisionConfig), ("text", TextConfig),
                         ("preprocess", PreprocessConfig), ("tokenizer", TokenizerConfig)):
            if key in d and isinstance(d[key], dict):
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(d[key]) - sub_known
                if bad:
                    raise ValueError(f"unknown {key} config keys: {sorted(bad)}")
                d[key] = sub(**d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "CLIPConfig":
        p = Path(text_or_path)
        text = p.read_text(encoding="utf-8") if p.suffix == ".json" and p.exists() else str(text_or_path)
        return cls.from_dict(json.loads(text))


# --- the named zoo ---------------------------------------------------------------------------


_ZOO_ORDER = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
              "ViT-L/14@336px"]


def _load_zoo() -> dict[str, CLIPConfig]:
    zoo: dict[str, CLIPConfig] = {}
    folder = resources.files("clipforge") / "model_configs"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            cfg = CLIPConfig.from_dict(json.loads(entry.read_text(encoding="utf-8")))
            assert cfg.name, f"model config {entry.name} has no name"
            zoo[cfg.name] = cfg
    rank = {n: i for i, n in enumerate(_ZOO_ORDER)}
    return dict(sorted(zoo.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def available_models() -> list[str]:
    """Names of the built-in architectures (the paper's models plus tiny CPU-trainable ones)."""
    return list(_load_zoo())


def get_model_config(name: str) -> CLIPConfig:
    """A fresh copy of the named architecture's config (case-insensitive; '/' or '-' accepted, and
    OpenCLIP's spellings: ``ViT-L-14-336`` for ``ViT-L/14@336px``; a ``-quickgelu`` suffix sets
    QuickGELU). Note: our paper models are QuickGELU (OpenAI's), so ``ViT-B-32`` here is OpenCLIP's
    ``ViT-B-32-quickgelu``; OpenCLIP's plain ``ViT-B-32`` is GELU."""
    zoo = _load_zoo()
    if name in zoo:
        return CLIPConfig.from_dict(zoo[name].to_dict())

    def _canon(n: str) -> str:
        n = n.lower().replace("/", "-").replace("@", "-")
        return n[:-2] if n.endswith("px") else n

    quick = name.lower().endswith("-quickgelu")
    key = _canon(name[: -len("-quickgelu")] if quick else name)
    canon = {_canon(k): k for k in zoo}
    if key in canon:
        d = zoo[canon[key]].to_dict()
        if quick and d["activation"] != "quick_gelu":
            d.update(activation="quick_gelu", name=f"{d['name']}-quickgelu")
        return CLIPConfig.from_dict(d)
    raise KeyError(f"unknown model {name!r}; available: {', '.join(zoo)}")
