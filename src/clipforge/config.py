"""Typed configuration for CLIP models and the named model zoo.

A model is fully described by its :class:`CLIPConfig`: architecture, activation, norm epsilon,
preprocessing and tokenizer settings all travel together, and every checkpoint we write carries
its config, so weights are never reloaded under the wrong activation or preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: What a model was trained to do (the three objectives of the paper's Figure 2): ``contrastive``
#: (CLIP), ``bow`` (predict the caption's bag of BPE tokens from the image), ``caption`` (predict
#: the caption's tokens in order). See :mod:`clipforge.models.heads`.
OBJECTIVES = ("contrastive", "bow", "caption")
# Ids of the OpenAI BPE tokenizer reach 49407: a text tower with fewer embeddings cannot read them.
OPENAI_BPE_VOCAB = 49408


class ConfigError(ValueError):
    """An impossible config value, named by its key (``vision.image_size must be ...``). Checkpoint
    readers add the file the config came from, so a bad config is refused like a bad option."""


def check_int(key: str, value: Any, lo: int = 1) -> int:
    """``value`` as an int >= ``lo`` (bools, strings and floats refused), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ConfigError(f"{key} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _float(key: str, value: Any, *, lo: float | None = None, open_lo: bool = True) -> Any:
    """``value`` unchanged (an int stays an int: config hashes do not move) when it is a finite
    number (> ``lo`` when ``open_lo``, else >= ``lo``), else :class:`ConfigError`."""
    bound = "" if lo is None else f" {'>' if open_lo else '>='} {lo:g}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (lo is not None and (value <= lo if open_lo else value < lo)):
        raise ConfigError(f"{key} must be a finite number{bound}, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass
class VisionConfig:
    """Image tower. ``kind='vit'`` uses ``layers: int`` and ``patch_size``; ``kind='resnet'``
    uses ``layers`` as four stage depths and ``width`` as the stem width (64 for RN50);
    ``kind='siglip'``: SigLIP's ViT (no class token, attention-pool head; :mod:`clipforge.models.siglip`)."""

    kind: Literal["vit", "resnet", "siglip"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | list[int] = 12
    heads: int = 12
    patch_size: int = 32
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _choice("vision.kind", self.kind, ("vit", "resnet", "siglip"))
        self.image_size = check_int("vision.image_size", self.image_size)
        self.width = check_int("vision.width", self.width)
        self.heads = check_int("vision.heads", self.heads)
        if self.kind == "resnet":
            if not isinstance(self.layers, (list, tuple)) or len(self.layers) != 4:
                raise ConfigError(f"vision.layers of a resnet tower must be 4 stage depths, got {self.layers!r}")
            self.layers = [check_int(f"vision.layers[{i}]", x) for i, x in enumerate(self.layers)]
            if self.heads != self.width * 32 // 64:
                # The attention-pool head count is fixed by the width in OpenAI's and OpenCLIP's code;
                # anything else could not be exported to (or re-read from) their formats.
                raise ConfigError(f"vision.heads of a resnet tower must be width*32//64 = {self.width * 32 // 64}, "
                                  f"got {self.heads}")
            if self.image_size % 32:
                raise ConfigError(f"vision.image_size of a resnet tower must be a multiple of 32, got {self.image_size}")
        else:
            if isinstance(self.layers, (list, tuple)):
                raise ConfigError(f"vision.layers of a vit tower must be an integer depth, got {self.layers!r}")
            self.layers = check_int("vision.layers", self.layers)
            self.patch_size = check_int("vision.patch_size", self.patch_size)
            self.mlp_ratio = _float("vision.mlp_ratio", self.mlp_ratio, lo=0.0)
            if int(self.width * self.mlp_ratio) < 1:
                raise ConfigError(f"vision.mlp_ratio {self.mlp_ratio} leaves no hidden units at width {self.width}")
            if self.image_size % self.patch_size:
                raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size "
                                  f"{self.patch_size} (vision.patch_size)")
            if self.width % self.heads:
                raise ConfigError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // (32 if self.kind == "resnet" else self.patch_size)


@dataclass
class TextConfig:
    """Causal text Transformer over BPE tokens; features are taken at the end-of-text token.
    ``kind='siglip'``: SigLIP's bidirectional tower pooled at the last position, projection with a
    bias (:mod:`clipforge.models.siglip`); absent from a config's dict when ``clip``."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    kind: Literal["clip", "siglip"] = "clip"

    def __post_init__(self) -> None:
        _choice("text.kind", self.kind, ("clip", "siglip"))
        # Two positions at least: every tokenized text holds start- and end-of-text.
        self.context_length = check_int("text.context_length", self.context_length, lo=2)
        self.vocab_size = check_int("text.vocab_size", self.vocab_size)
        self.width = check_int("text.width", self.width)
        self.heads = check_int("text.heads", self.heads)
        self.layers = check_int("text.layers", self.layers)
        self.mlp_ratio = _float("text.mlp_ratio", self.mlp_ratio, lo=0.0)
        if int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"text.mlp_ratio {self.mlp_ratio} leaves no hidden units at width {self.width}")
        if self.width % self.heads:
            raise ConfigError(f"text.width {self.width} is not divisible by text.heads {self.heads}")


@dataclass
class PreprocessConfig:
    """How images must be prepared for a given set of weights."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"

    def __post_init__(self) -> None:
        self.image_size = check_int("preprocess.image_size", self.image_size)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise ConfigError(f"preprocess.{key} must be 3 numbers (one per RGB channel), got {value!r}")
            lo = 0.0 if key == "std" else None  # normalisation divides by std
            setattr(self, key, tuple(float(_float(f"preprocess.{key}[{i}]", x, lo=lo)) for i, x in enumerate(value)))
        _choice("preprocess.interpolation", self.interpolation, ("bicubic", "bilinear"))
        _choice("preprocess.resize_mode", self.resize_mode, ("shortest", "squash"))


@dataclass
class TokenizerConfig:
    """Tokenizer that produced the ids the text tower was trained on."""

    kind: Literal["openai-bpe"] = "openai-bpe"
    context_length: int = 77

    def __post_init__(self) -> None:
        _choice("tokenizer.kind", self.kind, ("openai-bpe",))
        self.context_length = check_int("tokenizer.context_length", self.context_length, lo=2)


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
        for key, sub in _SECTIONS.items():
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, sub(**_known_keys(key, sub, value)))
            elif not isinstance(value, sub):
                raise ConfigError(f"{key} must be a mapping of {sub.__name__} fields, got {value!r}"[:200])
        self.embed_dim = check_int("embed_dim", self.embed_dim)
        _choice("activation", self.activation, ("quick_gelu", "gelu"))
        _choice("objective", self.objective, OBJECTIVES)
        self.norm_eps = _float("norm_eps", self.norm_eps, lo=0.0)
        self.init_logit_scale = _float("init_logit_scale", self.init_logit_scale)
        # Training clamps log(scale) to [0, log(max)]: a maximum below 1 leaves no valid scale.
        self.max_logit_scale = _float("max_logit_scale", self.max_logit_scale, lo=1.0, open_lo=False)
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")
        if self.preprocess.image_size != self.vision.image_size:
            raise ConfigError(f"preprocess.image_size {self.preprocess.image_size} != vision.image_size "
                              f"{self.vision.image_size}")
        if self.tokenizer.context_length != self.text.context_length:
            raise ConfigError(f"tokenizer.context_length {self.tokenizer.context_length} != text.context_length "
                              f"{self.text.context_length}")
        # OpenAI's text tower reads OpenAI's BPE ids; a SigLIP text tower's ids come from its own
        # SentencePiece vocabulary (the checkpoint folder's tokenizer), so any size fits it.
        if self.text.kind == "clip" and self.tokenizer.kind == "openai-bpe" and self.text.vocab_size < OPENAI_BPE_VOCAB:
            raise ConfigError(f"text.vocab_size {self.text.vocab_size} is smaller than the openai-bpe tokenizer's "
                              f"{OPENAI_BPE_VOCAB} ids")

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"]["mean"] = list(d["preprocess"]["mean"])
        d["preprocess"]["std"] = list(d["preprocess"]["std"])
        if d["objective"] == "contrastive":
            del d["objective"]  # the default: contrastive configs (and their hashes, files) unchanged
        if d["text"]["kind"] == "clip":
            del d["text"]["kind"]  # CLIP's text tower: configs written before SigLIP's read the same
        if d["init_logit_bias"] is None:
            del d["init_logit_bias"]  # the same for models without a logit bias
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """A config from its dict form, every value checked (:class:`ConfigError` names the key)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown CLIPConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "CLIPConfig":
        """From JSON text or a ``.json`` file (whose path then prefixes any error)."""
        p = Path(text_or_path)
        if not (p.suffix == ".json" and p.exists()):
            return cls.from_dict(json.loads(str(text_or_path)))
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{p}: {e}") from None


_SECTIONS: dict[str, type] = {"vision": VisionConfig, "text": TextConfig, "preprocess": PreprocessConfig,
                               "tokenizer": TokenizerConfig}


def _known_keys(section: str, cls: type, d: dict[str, Any]) -> dict[str, Any]:
    bad = set(d) - {f.name for f in dataclasses.fields(cls)}
    if bad:
        raise ConfigError(f"unknown {section} config keys: {sorted(bad)}")
    return d


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
