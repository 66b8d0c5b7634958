"""The fine-tuning run's configuration: one typed dataclass, saved as ``config.json`` in the run
folder, so a re-run of the same command continues the run and a different one is refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..device import check_device_spec
from ..eval import parse_shifts
from ..training import MODEL_RECIPE_FIELDS, ModelRecipes, check_model_recipes
from ..utils.typed import coerce_fields

Recipe = Literal["ce", "flyp"]
HeadInit = Literal["zeroshot", "linear"]

#: The WiSE-FT paper's grid: alpha = 0, 0.1, ..., 1.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))

# Fields that do not change the fine-tuned weights: a run may be continued with other values.
RESUMABLE_OVERRIDES = frozenset({
    "wise_alphas", "shifts", "save_wise_models", "eval_batch_size", "max_test", "save_every", "keep_last",
    "log_every", "progress", "threads", "device", "trust_torchscript",
})


@dataclass
class FinetuneConfig(ModelRecipes):
    """Everything a fine-tuning run (and its WiSE-FT sweep) depends on.

    ``model`` is a checkpoint (any format ``clipforge.load`` reads). ``dataset`` is a labelled
    dataset spec (image folder, manifest, shards, ``.npz``, ``builtin:scenes-<task>``); the test
    set is ``test_dataset`` (default: ``dataset``) read with ``test_split``; when train and test
    would be the same data, a stratified ``test_fraction`` of it is held out (``split_seed``).

    ``recipe="ce"``: cross-entropy through a linear head on the normalised image embedding, the
    head initialised from the zero-shot classifier (``head="zeroshot"``: class embeddings x
    exp(logit_scale)) or at zero (``head="linear"``); the text tower is not trained (the head
    stands in for it). ``lp_steps`` > 0 trains only the head for that many steps first (LP-FT).
    ``recipe="flyp"``: the contrastive loss between each image and a prompt of its class (FLYP,
    Goyal et al. 2023); the text tower is trained too unless ``lock_text``, and the head is
    rebuilt from it. As in FLYP, the loss is the in-batch CLIP loss, so two images of one class in a
    batch are each other's negatives (with few classes the loss cannot reach 0; it still pulls
    images towards their class prompts). Exactly one of ``steps`` / ``epochs`` sets the length.

    The training recipes acting on the model are ``clipforge train``'s (:class:`ModelRecipes`,
    docs/recipes.md): patch dropout, locking (``lock_text``: FLYP's text tower frozen; CE never
    trains it), layer decay, LoRA (the head still trains; ``finetuned/lora.safetensors`` holds the
    adapters alone), distillation (FLYP only: the teacher's image-prompt logits) and the schedule.
    """

    model: str
    dataset: str
    out: str
    classnames: str | list[str] | None = None
    templates: str | list[str] | None = None  # None/"auto": the dataset's own, else "a photo of a {}."
    train_split: str | None = None
    test_dataset: str | None = None
    test_split: str | None = None
    test_fraction: float = 0.3
    split_seed: int = 0
    recipe: Recipe = "ce"
    head: HeadInit = "zeroshot"
    lp_steps: int = 0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 1e-5
    wd: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    wise_alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    shifts: str | list[str] = "all"
    save_wise_models: bool = True
    eval_batch_size: int = 64
    max_test: int | None = None  # evaluate on at most this many test images (a stratified subset)
    save_every: int = 0          # 0: a checkpoint only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True
    threads: int | None = None
    device: str = "auto"
    trust_torchscript: bool = False  # read a TorchScript --model with torch.jit.load (runs its code)

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"finetune config: {key}: {msg} (got {getattr(self, key)!r})")

        for key in ("model", "dataset", "out"):
            need(isinstance(getattr(self, key), str) and bool(getattr(self, key).strip()), key, "must be a non-empty string")
        need(self.recipe in ("ce", "flyp"), "recipe", "must be 'ce' or 'flyp'")
        need(self.head in ("zeroshot", "linear"), "head", "must be 'zeroshot' or 'linear'")
        need(not (self.recipe == "flyp" and self.head == "linear"), "head",
             "the FLYP recipe has no separate head (it is rebuilt from the text tower); use head='zeroshot'")
        need((self.steps is None) != (self.epochs is None), "steps",
             "give exactly one of steps / epochs")
        if self.steps is not None:
            need(self.steps >= 1, "steps", "must be >= 1")
        if self.epochs is not None:
            need(self.epochs > 0, "epochs", "must be > 0")
        need(0 <= self.lp_steps, "lp_steps", "must be >= 0")
        need(not (self.lp_steps and self.recipe == "flyp"), "lp_steps", "LP-FT applies to the CE recipe only")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.wd >= 0, "wd", "must be >= 0")
        need(self.warmup >= 0, "warmup", "must be >= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or None")
        need(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        need(all(0.0 <= a <= 1.0 for a in self.wise_alphas), "wise_alphas", "every alpha must be in [0, 1]")
        need(len(set(self.wise_alphas)) == len(self.wise_alphas), "wise_alphas", "alphas must be distinct")
        need(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        need(self.max_test is None or self.max_test >= 1, "max_test", "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1")
        check_model_recipes(self, need)
        need(self.distill_model is None or self.recipe == "flyp", "distill_model",
             "distils image-text logits: recipe flyp only (the ce recipe has no text side)")
        check_device_spec(self.device)
        try:
            parse_shifts(self.shifts)  # a typo must fail now, not after the fine-tuning
        except ValueError as e:
            raise ValueError(f"finetune config: shifts: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"{source}: unknown fine-tuning option {key!r}; known: {', '.join(sorted(known))}")
        return cls(**coerce_fields(cls, dict(d), source))

    def training_fields(self) -> dict[str, Any]:
        """The settings that determine the fine-tuned weights (compared when a run is continued).
        Recipe fields left at their defaults are omitted, so runs from before they existed continue."""
        off = dataclasses.asdict(ModelRecipes())
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_OVERRIDES and k != "out"
                and not (k in MODEL_RECIPE_FIELDS and v == off[k])}


__all__ = ["FinetuneConfig", "DEFAULT_ALPHAS", "RESUMABLE_OVERRIDES", "Recipe", "HeadInit"]
