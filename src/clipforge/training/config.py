"""The training run's configuration: one typed dataclass, built from defaults, an optional
YAML/JSON file and command-line overrides (in that order), and saved as ``config.json`` in the run
folder so a run can always be resumed or reproduced from its own record."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import OBJECTIVES
from ..precision import TRAIN_PRECISION_CHOICES as PRECISIONS
from ..device import check_device_spec
from ..data.shards import split_sources
from ..data.tables import parse_separator
from ..utils import read_json
from ..utils.typed import coerce_fields
from .hard_negatives import MODES as HARD_NEGATIVES
from .recipes import ModelRecipes, check_recipes
from .remote_sync import PROTOCOLS, has_checkpoints, is_url, pull_run

LINEAR_BACKENDS = ("auto", "torch", "onednn")
LOSSES = ("clip", "siglip")  # the contrastive objective's loss: softmax (CLIP) or sigmoid (SigLIP)

# Fields that may differ between a run and its resumption (they do not change the optimisation).
RESUMABLE_OVERRIDES = frozenset({
    "save_every", "keep_last", "log_every", "eval_every", "tensorboard", "wandb", "wandb_project_name", "num_workers", "zeroshot_frequency",
    "time_limit_minutes", "progress", "device", "threads", "remote_sync", "remote_sync_frequency",
    "remote_sync_protocol", "trust_torchscript",
})


@dataclass
class TrainConfig(ModelRecipes):
    """Everything a contrastive training run depends on.

    ``model`` is a zoo name (``tiny-vit``), or a path to a CLIPConfig JSON file; ``init`` an optional
    checkpoint in any supported format to start from. ``steps`` counts optimiser steps; each consumes
    ``batch_size * accum_steps`` pairs per rank. ``warmup`` is in steps. ``threads`` sets torch's
    intra-op threads for the run (``None``: leave the default; on a CPU shared with other jobs one
    thread per process is often much faster than several, which wait on each other). ``save_every=0`` saves only
    at the end; ``eval_every=0`` disables periodic evaluation. ``fast_paths``: train through
    ``clipforge.fast.enable`` (same gradients within float rounding, faster). ``linear_backend``: the
    fp32 linear kernel (``auto``: this machine's stored choice, see ``clipforge.fast.backend``); the
    run folder's config.json records the concrete one, which a resumed run uses. ``deterministic``
    pins it to ``torch`` and turns on torch's deterministic algorithms. ``hard_negatives="swap"``
    adds up to ``hard_negatives_per_caption`` rule-built negative captions per caption (swapped
    spatial words, colours, objects, changed counts; :mod:`clipforge.training.hard_negatives`) as
    extra columns of that image's row of the loss (NegCLIP). ``"mirror"`` (alone or ``"swap,mirror"``)
    adds image-side negatives: each sample's re-arranged scene / flipped photo with its truthfully
    changed caption as one more pair of the batch (:mod:`clipforge.data.mirror`);
    ``hard_negatives_other`` says what a photo whose caption has no left/right word gets
    (``skip``: nothing; ``flip``: its own image flipped half the time, caption unchanged).

    ``objective`` (the paper's Figure 2 comparison, :mod:`clipforge.training.objectives`):
    ``contrastive`` (CLIP), ``bow`` (predict the caption's bag of BPE tokens from the image) or
    ``caption`` (predict the caption's tokens in order), all with the same image tower, data,
    optimiser and schedule. It is part of the model (``CLIPConfig.objective``), so a resumed run
    cannot change it. ``hard_negatives``, ``local_loss``, ``gather_with_grad`` and ``val_data``
    (retrieval) are contrastive options and refused for the other two.

    ``loss`` (contrastive objective): ``clip``, the softmax over the batch, or ``siglip``, the
    sigmoid loss (:mod:`clipforge.training.sigmoid_loss`; the model gets a learned ``logit_bias``).
    With ``siglip`` each process always scores its images against all processes' texts gathered
    with gradients, so ``local_loss`` / ``gather_with_grad`` change nothing (accepted, as open_clip
    does); hard negatives are a softmax-loss option.
    """

    model: str = "tiny-vit"
    init: str | None = None
    trust_torchscript: bool = False  # read a TorchScript --init with torch.jit.load (runs its code)
    objective: Literal["contrastive", "bow", "caption"] = "contrastive"
    loss: Literal["clip", "siglip"] = "clip"
    data: str = "builtin:scenes"
    val_data: str | None = None
    csv_separator: str | None = None  # open_clip's --csv-separator; None: .tsv tab, .csv sniffed
    csv_img_key: str | None = None  # open_clip's --csv-img-key; None: auto-detected (filepath, image, ...)
    csv_caption_key: str | None = None  # open_clip's --csv-caption-key; None: auto (title, caption, ...)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    wd: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = 100
    grad_clip: float | None = None
    accum_steps: int = 1
    precision: str = "fp32"  # open_clip's names and meaning, or auto: see clipforge.precision
    hard_negatives: Literal["none", "swap", "mirror", "swap,mirror"] = "none"
    hard_negatives_other: Literal["skip", "flip"] = "skip"
    hard_negatives_per_caption: int = 3
    grad_checkpointing: bool = False
    local_loss: bool = False
    gather_with_grad: bool = False
    num_workers: int = 2
    threads: int | None = None
    resampled: bool = False
    train_data_upsampling_factors: list[float] | None = None  # one weight per '::'-joined shard source (resampled)
    seed: int = 0
    deterministic: bool = False
    fast_paths: bool = True
    linear_backend: Literal["auto", "torch", "onednn"] = "auto"
    device: str = "auto"
    out: str = "runs/train"
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    eval_every: int = 0
    tensorboard: bool = False
    wandb: bool = False  # also log the scalars to Weights & Biases (open_clip's --report-to wandb; .metrics)
    wandb_project_name: str = "clipforge"
    time_limit_minutes: float | None = None
    progress: bool = True
    resume: str | None = None
    remote_sync: str | None = None  # copy the run folder here (fsspec URL or path) (.remote_sync)
    remote_sync_frequency: int = 0  # every N steps as well (0: at each checkpoint and at the end)
    remote_sync_protocol: Literal["fsspec"] = "fsspec"  # open_clip's option; only fsspec here
    # --- training recipes (docs/recipes.md; checked in .recipes) ---
    # (the recipes acting on the model, shared with clipforge finetune: recipes.ModelRecipes)
    zeroshot_data: str | None = None  # a labelled dataset (clipforge eval's specs): zero-shot while training
    zeroshot_frequency: int = 0  # every N steps (0: at eval_every)
    zeroshot_classnames: str | None = None  # built-in set name or file (default: the dataset's own)
    zeroshot_templates: str | None = None  # built-in set name or file (default: "a photo of a {}.")
    zeroshot_n: int = 500  # images scored (a fixed class-stratified sample)
    aug_cfg: dict[str, Any] = dataclasses.field(default_factory=dict)  # open_clip's AugmentationCfg names
    image_mean: tuple[float, float, float] | None = None  # preprocessing overrides (None: the model's)
    image_std: tuple[float, float, float] | None = None
    image_interpolation: Literal["bicubic", "bilinear"] | None = None
    image_resize_mode: Literal["shortest", "squash"] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        for key in ("image_mean", "image_std"):  # JSON gives lists
            if isinstance(getattr(self, key), list):
                setattr(self, key, tuple(getattr(self, key)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field (checked before any work starts)."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"train config: {key}: {msg} (got {getattr(self, key)!r})")

        need(isinstance(self.steps, int) and self.steps >= 1, "steps", "must be an integer >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be >= 1")
        need(isinstance(self.accum_steps, int) and self.accum_steps >= 1, "accum_steps", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.wd >= 0, "wd", "must be >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "needs two values in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")
        need(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "must be an integer >= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.hard_negatives == "mirror,swap":
            self.hard_negatives = "swap,mirror"
        need(self.hard_negatives in HARD_NEGATIVES, "hard_negatives", f"must be one of {', '.join(HARD_NEGATIVES)}")
        need(self.hard_negatives_other in ("skip", "flip"), "hard_negatives_other", "must be skip or flip")
        need(not (self.local_loss and "mirror" in self.hard_negatives), "hard_negatives",
             "mirror negatives need the global loss (companion rows are gathered with their mask); drop --local-loss")
        need(isinstance(self.hard_negatives_per_caption, int) and not isinstance(self.hard_negatives_per_caption, bool)
             and self.hard_negatives_per_caption >= 1, "hard_negatives_per_caption", "must be an integer >= 1")
        need(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}")
        if self.objective != "contrastive":
            for key, off in (("hard_negatives", "none"), ("local_loss", False), ("gather_with_grad", False),
                             ("val_data", None)):
                need(getattr(self, key) == off, key, f"is a contrastive-training option (negative captions, "
                     f"the contrastive loss across processes, retrieval validation); objective "
                     f"{self.objective!r} takes {off!r}")
        need(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}")
        if self.loss == "siglip":
            need(self.objective == "contrastive", "loss", f"siglip is a contrastive loss; objective "
                 f"{self.objective!r} has its own")
            need(self.hard_negatives == "none", "hard_negatives", "hard negatives are extra softmax columns; "
                 "the sigmoid loss (loss=siglip) takes 'none'")
        need(self.linear_backend in LINEAR_BACKENDS, "linear_backend", f"must be one of {', '.join(LINEAR_BACKENDS)}")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null (torch's default)")
        need(self.save_every >= 0, "save_every", "must be >= 0 (0: only at the end)")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: off)")
        need(self.time_limit_minutes is None or self.time_limit_minutes > 0, "time_limit_minutes", "must be > 0")
        try:
            self.device = check_device_spec(self.device)
        except ValueError as e:
            need(False, "device", str(e))
        need(bool(self.data), "data", "a data spec is required")
        try:
            self.csv_separator = parse_separator(self.csv_separator)
        except ValueError as e:
            need(False, "csv_separator", str(e))
        check_recipes(self, need)
        self._check_upsampling(need)
        need(self.remote_sync is None or bool(str(self.remote_sync).strip()), "remote_sync", "must be a URL or path")
        need(isinstance(self.remote_sync_frequency, int) and self.remote_sync_frequency >= 0, "remote_sync_frequency",
             "must be an integer >= 0 (steps; 0: at each checkpoint)")
        need(self.remote_sync_protocol in PROTOCOLS, "remote_sync_protocol",
             "only fsspec (open_clip's s3 protocol runs the aws CLI; give an s3:// URL instead, with s3fs installed)")

    def _check_upsampling(self, need: Any) -> None:
        """open_clip's ``--train-data-upsampling-factors``: one factor >= 0 per ``::``-joined source of
        ``data``, not all 0, and draws with replacement (``resampled``), where weights mean something."""
        f = self.train_data_upsampling_factors
        if f is None:
            return
        key = "train_data_upsampling_factors"
        need(isinstance(f, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                          and x >= 0 for x in f) and any(f), key,
             "needs numbers >= 0 (not all 0), one per '::'-joined source of data")
        n = len(split_sources(self.data))
        need(len(f) == n, key, f"{len(f)} factor(s) for the {n} '::'-joined source(s) of data {self.data!r}")
        need(self.resampled, key, "weights the draws of shards with replacement: set resampled "
                                  "(--resampled, open_clip's --dataset-resampled) too")

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`clipforge.data.open_pairs` for this run's data specs."""
        return {"csv_separator": self.csv_separator, "image_key": self.csv_img_key,
                "caption_key": self.csv_caption_key}

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        for key in ("image_mean", "image_std"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; keys may use ``-`` or ``_``. Unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in d.items():
            k = str(key).replace("-", "_")
            if k not in known:
                raise ValueError(f"{source}: unknown training option {key!r}; known: {', '.join(sorted(known))}")
            clean[k] = value
        clean = coerce_fields(cls, clean, source)  # YAML's "5e-4" is a string: convert to the field type
        try:
            return cls(**clean)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a YAML or JSON file (a flat mapping of option -> value), then apply ``overrides``."""
        data = load_config_file(path)
        data.update({k.replace("-", "_"): v for k, v in (overrides or {}).items()})
        return cls.from_dict(data, source=str(path))

    @classmethod
    def for_resume(cls, run_dir: str | Path, **overrides: Any) -> "TrainConfig":
        """The config saved in ``run_dir/config.json`` with ``resume`` set, plus the allowed
        ``overrides`` (logging/saving cadence, workers, time limit; see ``RESUMABLE_OVERRIDES``).
        ``run_dir`` may be a remote copy (``remote_sync``'s URL; then ``out`` is the local folder),
        and a local folder without checkpoints is first filled from ``remote_sync`` when given."""
        if is_url(str(run_dir)):  # a run synced there (--remote-sync): copied into out first
            if not overrides.get("out"):
                raise ValueError(f"--resume {run_dir}: a remote run needs --out, the local folder to continue it in")
            overrides.setdefault("remote_sync", str(run_dir))
            run_dir = overrides["out"]
            if not has_checkpoints(run_dir):
                pull_run(overrides["remote_sync"], run_dir)
        elif overrides.get("remote_sync") and not has_checkpoints(run_dir):
            pull_run(overrides["remote_sync"], run_dir)  # a fresh machine: no checkpoint here, the remote has them
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.json there (not a clipforge training run folder)")
        saved = cls.from_dict(read_json(path), source=str(path))
        return merge_for_resume(saved, overrides, str(run_dir))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A flat option mapping from ``.yaml``/``.yml``/``.json``; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    else:
        raise ValueError(f"{p}: training config must be .yaml, .yml or .json")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option: value at the top level, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_for_resume(saved: TrainConfig, overrides: dict[str, Any], run_dir: str) -> TrainConfig:
    """The saved config of ``run_dir`` with the few overrides that keep the optimisation identical.

    Changing e.g. the model, data, batch size or learning rate of a run half-way would silently make
    it a different run, so those are refused with a message naming the option."""
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key in ("resume", "out"):
            continue
        old = getattr(saved, key)
        if key == "betas":
            value = tuple(value)
        if value == old or (key == "linear_backend" and "auto" in (old, value)):
            continue  # "auto" on either side: the backend the run folder recorded is used
        if key not in RESUMABLE_OVERRIDES:
            raise ValueError(f"--resume {run_dir}: option {key!r} differs from the saved run "
                             f"({old!r} -> {value!r}); only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change")
        changes[key] = value
    return saved.replace(out=run_dir, resume=run_dir, **changes)


__all__ = ["TrainConfig", "load_config_file", "merge_for_resume", "PRECISIONS", "LINEAR_BACKENDS", "LOSSES", "HARD_NEGATIVES",
           "OBJECTIVES"]
