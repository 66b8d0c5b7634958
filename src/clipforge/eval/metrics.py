"""Classification metrics: top-k accuracy, mean per-class recall, confusion matrix."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def topk_accuracy(scores: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the ``k`` highest scores (``k`` capped at C)."""
    scores, labels = _as_tensor(scores), _as_tensor(labels).long()
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} do not match")
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: float(hit[:, : min(k, kmax)].any(dim=1).double().mean()) for k in ks}  # float64: exact fractions


def confusion_matrix(pred: Any, labels: Any, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts, rows = true class, columns = predicted class."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(pred: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Recall of each class (NaN for classes absent from ``labels``)."""
    cm = confusion_matrix(pred, labels, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def mean_per_class_recall(pred: Any, labels: Any, num_classes: int) -> float:
    """Balanced accuracy: mean recall over the classes present in ``labels``."""
    r = per_class_recall(pred, labels, num_classes)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


ACC5_MIN_CLASSES = 5  # CLIP_benchmark reports acc5 as NaN below 5 classes (top-5 would be trivially 1)


def classification_metrics(scores: Any, labels: Any, num_classes: int | None = None) -> dict[str, float]:
    """CLIP_benchmark's metrics: ``acc1``, ``acc5`` (NaN with fewer than 5 classes) and
    ``mean_per_class_recall`` (= scikit-learn's ``balanced_accuracy_score``)."""
    scores = _as_tensor(scores)
    c = num_classes or scores.shape[1]
    acc = topk_accuracy(scores, labels, (1, 5))
    pred = scores.argmax(dim=1).numpy() if scores.shape[0] else np.zeros(0, np.int64)
    return {"acc1": acc[1], "acc5": acc[5] if c >= ACC5_MIN_CLASSES else float("nan"),
            "mean_per_class_recall": mean_per_class_recall(pred, labels, c)}


@torch.no_grad()
def chunked_topk(features: Any, weights: torch.Tensor, k: int = 5, chunk: int = 16384,
                 scale: float = 1.0, bias: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` class indices ``[N, k]`` and the softmax probability of the top class, scoring
    ``features @ weights.T`` in row chunks (a 1M x 1000 score matrix is never materialised).
    ``bias`` (a sigmoid-loss model's ``logit_bias``): the top class's probability is the sigmoid of
    its logit (bias included) instead; the ranking is the same."""
    feats = features if isinstance(features, (torch.Tensor, np.ndarray)) else np.asarray(features)
    n = feats.shape[0]
    k = min(k, weights.shape[0])
    idx = np.zeros((n, k), dtype=np.int64)
    conf = np.zeros(n, dtype=np.float32)
    w = weights.float()
    for s in range(0, n, chunk):
        x = torch.as_tensor(np.asarray(feats[s:s + chunk], dtype=np.float32)) if not isinstance(feats, torch.Tensor) \
            else feats[s:s + chunk].float()
        x = torch.nn.functional.normalize(x, dim=-1)
        logits = scale * x @ w.t()
        top = logits.topk(k, dim=1)
        idx[s:s + chunk] = top.indices.numpy()
        if bias is None:
            conf[s:s + chunk] = (top.values[:, 0] - logits.logsumexp(dim=1)).exp().numpy()
        else:
            conf[s:s + chunk] = (top.values[:, 0] + bias).sigmoid().numpy()
    return idx, conf


def metrics_from_topk(topk: np.ndarray, labels: Any, num_classes: int) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` from top-k predictions ``[N, k]``
    (same rules as :func:`classification_metrics`)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"acc1": float("nan"), "acc5": float("nan"), "mean_per_class_recall": float("nan")}
    hit = topk == labels[:, None]
    acc5 = float(hit[:, :5].any(axis=1).mean()) if num_classes >= ACC5_MIN_CLASSES else float("nan")
    return {"acc1": float(hit[:, 0].mean()), "acc5": acc5,
            "mean_per_class_recall": mean_per_class_recall(topk[:, 0], labels, num_classes)}
