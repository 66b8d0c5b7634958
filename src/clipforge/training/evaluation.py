"""Evaluation during training (every ``eval_every`` steps, on the main process).

* ``builtin:scenes`` data: zero-shot accuracy on the scene generator's held-out tasks (colour-shape
  combinations never seen in training, counting, position), each beside its chance level.
* ``val_data`` given: contrastive loss and Recall@1/5 (both directions) on its first ``val_pairs``
  pairs, read in a fixed order (contrastive runs only: ``TrainConfig`` refuses it for bow/caption).
Both use the public ``clipforge.eval`` API; nothing here trains. The scene tasks score every
objective through ``ZeroShotClassifier`` (cosine head, bag-of-words or caption likelihood), so
the curves of contrastive, bow and caption runs are comparable.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable

import numpy as np
import torch

from ..data import ClassificationTask, open_labelled, open_pairs, scene_tasks
from ..eval import ZeroShotClassifier, embed_pairs, load_templates, resolve_classnames, retrieval_metrics
from ..models import CLIP
from .config import TrainConfig
from .loss import contrastive_loss

Evaluator = Callable[[CLIP, int], dict[str, float]]


def is_builtin_scenes(spec: str) -> bool:
    return spec.strip().lower().startswith("builtin:scenes")


def task_accuracy(model: CLIP, task: ClassificationTask, batch_size: int = 256, bow_prior: str = "none") -> float:
    """Zero-shot top-1 accuracy of ``model`` (any objective) on one task (head built afresh: the
    weights change between evaluations, so a disk cache would only fill up)."""
    return task_accuracies(model, task, batch_size, (bow_prior,))[bow_prior]


def task_accuracies(model: CLIP, task: ClassificationTask, batch_size: int = 256,
                    bow_priors: tuple[str, ...] = ("none",)) -> dict[str, float]:
    """Accuracy per bow scoring (``ZeroShotClassifier``'s ``bow_prior``) from one set of image
    features; other objectives have one scoring, reported under every name."""
    clf = ZeroShotClassifier(model, list(task.classnames), list(task.templates), use_cache=False,
                             batch_size=batch_size)
    features = clf.image_features(task.images)
    labels = np.asarray(task.labels)
    out = {}
    for prior in bow_priors:
        clf.bow_prior = prior
        out[prior] = float((clf.scores(features).argmax(dim=-1).cpu().numpy() == labels).mean())
    return out


def _accuracy_metrics(model: CLIP, task: ClassificationTask, name: str) -> dict[str, float]:
    """``<name>_acc``; bow models also ``<name>_calibrated_acc`` (token prior removed, see
    ``ZeroShotClassifier(bow_prior="scored")``): the score as specified lets the prior win."""
    if getattr(model.config, "objective", "contrastive") != "bow":
        return {f"{name}_acc": task_accuracy(model, task)}
    acc = task_accuracies(model, task, bow_priors=("none", "scored"))
    return {f"{name}_acc": acc["none"], f"{name}_calibrated_acc": acc["scored"]}


class SceneZeroShot:
    """Held-out scene tasks, generated once (fixed seed) and re-scored at every evaluation;
    ``names`` restricts which (default all; a task's scenes do not depend on the others)."""

    def __init__(self, n_per_class: int = 20, seed: int = 12345, names: list[str] | None = None) -> None:
        self.n_per_class, self.seed, self.names = n_per_class, seed, names
        self._tasks: dict[str, ClassificationTask] | None = None

    def tasks(self, image_size: int) -> dict[str, ClassificationTask]:
        if self._tasks is None:
            self._tasks = scene_tasks(seed=self.seed, n_per_class=self.n_per_class, image_size=image_size,
                                      names=self.names)
        return self._tasks

    def __call__(self, model: CLIP, step: int) -> dict[str, float]:
        out = {}
        for name, task in self.tasks(model.image_size).items():
            out.update(_accuracy_metrics(model, task, name))
        return out


class LabelledZeroShot:
    """Zero-shot accuracy on a fixed, class-stratified sample of a labelled dataset (any
    ``clipforge.data.open_labelled`` spec: an ``.npz``, an image folder, a manifest, shards), so a
    run trained on one source is measured on another as it trains (the paper's Figure 2 setting:
    trained on captions, scored on a classification benchmark). ``n`` images, the same ones at
    every evaluation (drawn once with ``seed``), decoded once; ``templates``: a built-in set name,
    a file or a list (default the single ``"a photo of a {}."``); ``classnames`` as in ``clipforge
    eval zeroshot``. The metric is ``<name>_acc`` (bow models: also ``<name>_calibrated_acc``)."""

    def __init__(self, spec: str, *, n: int = 500, seed: int = 0, classnames: Any = None,
                 templates: Any = None, name: str = "zeroshot") -> None:
        if n < 1:
            raise ValueError(f"zero-shot evaluation on {spec!r}: n must be >= 1 (got {n})")
        self.spec, self.n, self.seed, self.name = spec, n, seed, name
        self.classnames, self.templates = classnames, templates
        self._task: ClassificationTask | None = None

    def task(self) -> ClassificationTask:
        if self._task is None:
            ds = open_labelled(self.spec)
            labels = np.asarray(ds.labels)
            # Round-robin over classes in a seeded order: every class equally represented in the sample.
            rng = np.random.default_rng(self.seed)
            per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
            picked = [int(idx[i]) for i in range(max(len(p) for p in per_class)) for idx in per_class if i < len(idx)]
            picked = sorted(picked[:self.n])
            templates = load_templates(self.templates) if self.templates is not None else ["a photo of a {}."]
            self._task = ClassificationTask(name=self.name, images=[ds[i] for i in picked],
                                            labels=labels[picked], classnames=resolve_classnames(ds, self.classnames),
                                            templates=templates)
        return self._task

    def __call__(self, model: CLIP, step: int) -> dict[str, float]:
        return _accuracy_metrics(model, self.task(), self.name)


class ValRetrieval:
    """Loss and Recall@1/5 on the first ``n`` images of a validation source (all their captions),
    read in the source's natural order, so every evaluation sees the same pairs."""

    def __init__(self, spec: str, seed: int, n: int = 500, batch_size: int = 128,
                 data_options: dict[str, Any] | None = None) -> None:
        self.spec, self.seed, self.n, self.batch_size = spec, seed, n, batch_size
        self.data_options = dict(data_options or {})

    @torch.inference_mode()
    def __call__(self, model: CLIP, step: int) -> dict[str, float]:
        source = open_pairs(self.spec, split="val", seed=self.seed, **self.data_options)
        feats = embed_pairs(model, islice(source.iter_samples(shuffle=False), self.n), batch_size=self.batch_size)
        if feats.image_features.shape[0] == 0:
            raise ValueError(f"validation data {self.spec!r} yielded no usable pairs")
        m = retrieval_metrics(feats.image_features, feats.text_features, feats.text_to_image, ks=(1, 5))
        owner = np.asarray(feats.text_to_image)
        first = np.unique(owner, return_index=True)[1]          # each image's first caption
        img, txt = feats.image_features, feats.text_features[torch.as_tensor(first)]
        scale = model.logit_scale.detach().exp().float().cpu()
        losses = [float(contrastive_loss(img[i:i + self.batch_size], txt[i:i + self.batch_size], scale))
                  for i in range(0, img.shape[0], self.batch_size)]
        return {"val_loss": float(np.mean(losses)),
                "val_t2i_R@1": m["image_retrieval_recall@1"], "val_t2i_R@5": m["image_retrieval_recall@5"],
                "val_i2t_R@1": m["text_retrieval_recall@1"], "val_i2t_R@5": m["text_retrieval_recall@5"]}


class Scheduled:
    """Evaluators each at its own step cadence (``(every, evaluator)`` pairs): ``due(step)`` says
    whether any runs at ``step``, calling it runs and merges those that are due."""

    def __init__(self, parts: list[tuple[int, Evaluator]]) -> None:
        self.parts = [(every, part) for every, part in parts if every > 0]

    def due(self, step: int) -> bool:
        return any(step % every == 0 for every, _ in self.parts)

    def __call__(self, model: CLIP, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for every, part in self.parts:
            if step % every == 0:
                out.update(part(model, step))
        return out


def with_zeroshot(config: TrainConfig, evaluator: Evaluator | None) -> Evaluator | None:
    """``evaluator`` (every ``eval_every`` steps) plus zero-shot accuracy on ``config.zeroshot_data``
    (:class:`LabelledZeroShot`, metric ``zeroshot_acc``) every ``zeroshot_frequency`` steps (0: at
    ``eval_every``); ``evaluator`` alone when there is no ``zeroshot_data``."""
    if not config.zeroshot_data:
        return evaluator
    ds = open_labelled(config.zeroshot_data)  # a bad spec, class-name or template file fails now, not at step N
    resolve_classnames(ds, config.zeroshot_classnames)
    if config.zeroshot_templates is not None:
        load_templates(config.zeroshot_templates)
    zeroshot = LabelledZeroShot(config.zeroshot_data, n=config.zeroshot_n, seed=config.seed,
                                classnames=config.zeroshot_classnames, templates=config.zeroshot_templates)
    parts = [(config.zeroshot_frequency or config.eval_every, zeroshot)]
    if evaluator is not None:
        parts.insert(0, (config.eval_every, evaluator))
    return Scheduled(parts)


def default_evaluator(config: TrainConfig) -> Evaluator | None:
    """The periodic evaluation that fits the run's data, or None when there is nothing to run."""
    parts: list[Evaluator] = []
    if config.val_data:
        parts.append(ValRetrieval(config.val_data, config.seed, data_options=config.data_options()))
    if is_builtin_scenes(config.data):
        parts.append(SceneZeroShot())
    if not parts:
        return None

    def evaluate(model: CLIP, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in parts:
            out.update(part(model, step))
        return out

    return evaluate


__all__ = ["default_evaluator", "Scheduled", "with_zeroshot", "SceneZeroShot", "LabelledZeroShot", "ValRetrieval", "task_accuracy",
           "is_builtin_scenes"]
