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

from ..data import ClassificationTask, open_pairs, scene_tasks
from ..eval import ZeroShotClassifier, embed_pairs, retrieval_metrics
from ..models import CLIP
from .config import TrainConfig
from .loss import contrastive_loss

Evaluator = Callable[[CLIP, int], dict[str, float]]


def is_builtin_scenes(spec: str) -> bool:
    return spec.strip().lower().startswith("builtin:scenes")


def task_accuracy(model: CLIP, task: ClassificationTask, batch_size: int = 256) -> float:
    """Zero-shot top-1 accuracy of ``model`` (any objective) on one task (head built afresh: the
    weights change between evaluations, so a disk cache would only fill up)."""
    clf = ZeroShotClassifier(model, list(task.classnames), list(task.templates), use_cache=False,
                             batch_size=batch_size)
    pred = clf.predict(task.images).cpu().numpy()
    return float((pred == np.asarray(task.labels)).mean())


class SceneZeroShot:
    """Held-out scene tasks, generated once (fixed seed) and re-scored at every evaluation."""

    def __init__(self, n_per_class: int = 20, seed: int = 12345) -> None:
        self.n_per_class, self.seed = n_per_class, seed
        self._tasks: dict[str, ClassificationTask] | None = None

    def tasks(self, image_size: int) -> dict[str, ClassificationTask]:
        if self._tasks is None:
            self._tasks = scene_tasks(seed=self.seed, n_per_class=self.n_per_class, image_size=image_size)
        return self._tasks

    def __call__(self, model: CLIP, step: int) -> dict[str, float]:
        out = {}
        for name, task in self.tasks(model.image_size).items():
            out[f"{name}_acc"] = task_accuracy(model, task)
        return out


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


__all__ = ["default_evaluator", "SceneZeroShot", "ValRetrieval", "task_accuracy", "is_builtin_scenes"]
