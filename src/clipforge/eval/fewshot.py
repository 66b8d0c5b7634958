"""Few-shot linear probes: k labelled examples per class, several random draws per k.

Reports mean and std of accuracy per k, and the number of shots at which the few-shot probe
matches zero-shot transfer, interpolated linearly on log2 k between the two shot counts that
bracket the zero-shot accuracy (how the paper reads its few-shot vs zero-shot figure).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from .linear_probe import FeatureView, fit_logistic_regression, search_C, stratified_split

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_C = 0.316  # used when there is no room for a validation split (k = 1); CLIP's README probe value


def sample_kshot(labels: Any, k: int, seed: int) -> np.ndarray:
    """Sorted positions of ``k`` random items per class (all of a class's items if it has fewer)."""
    if k < 1:
        raise ValueError(f"shots must be >= 1, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = [rng.choice(np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())), replace=False)
           for c in np.unique(labels)]
    return np.sort(np.concatenate(out)).astype(np.int64)


def matching_shots(shots: Sequence[int], accs: Sequence[float], target: float) -> tuple[float | None, str]:
    """Shots at which the curve ``accs`` (mean accuracy per k) first reaches ``target``,
    interpolated on log2 k. Returns ``(k, note)``; k is None if it is never reached."""
    pts = sorted(zip(shots, accs))
    if not pts or target is None or not math.isfinite(target):
        return None, "no zero-shot reference"
    if pts[0][1] >= target:
        return float(pts[0][0]), f"already matched at the smallest k ({pts[0][0]})"
    for (k0, a0), (k1, a1) in zip(pts, pts[1:]):
        if a0 < target <= a1:
            t = (target - a0) / (a1 - a0)
            return float(2 ** (math.log2(k0) + t * (math.log2(k1) - math.log2(k0)))), \
                f"interpolated on log2 k between {k0} and {k1} shots"
    return None, f"not reached within {pts[-1][0]} shots"


@dataclass
class FewShotResult:
    shots: list[int]
    accs: dict[int, list[float]]                  # k -> accuracy per seed
    Cs: dict[int, list[float]] = field(default_factory=dict)
    zeroshot_acc: float | None = None
    matching_k: float | None = None
    matching_note: str = ""
    seconds: float = 0.0

    def mean(self, k: int) -> float:
        return float(np.mean(self.accs[k]))

    def std(self, k: int) -> float:
        return float(np.std(self.accs[k]))

    def curve(self) -> dict[str, dict[str, Any]]:
        return {str(k): {"mean": self.mean(k), "std": self.std(k), "accs": self.accs[k], "C": self.Cs.get(k, [])}
                for k in self.shots}


def fewshot_curve(train_X: Any, train_y: Any, test_X: Any, test_y: Any, *, shots: Sequence[int] = DEFAULT_SHOTS,
                  seeds: int = 3, num_classes: int | None = None, C: float | str = "auto",
                  zeroshot_acc: float | None = None, progress: bool = False, **fit_kw: Any) -> FewShotResult:
    """For each k and seed: draw k shots per class from train, fit a logistic regression, score
    on test. ``C="auto"`` picks C on a half/half split of the shots when k >= 2 (coarse sweep),
    and uses :data:`DEFAULT_C` for k = 1; a number fixes C."""
    t0 = time.perf_counter()
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    k_cls = int(num_classes or max(int(train_y.max()), int(test_y.max())) + 1)
    base = FeatureView(train_X)
    test = FeatureView(test_X)
    shots = sorted({int(s) for s in shots})
    accs: dict[int, list[float]] = {k: [] for k in shots}
    Cs: dict[int, list[float]] = {k: [] for k in shots}
    bar = tqdm(total=len(shots) * seeds, desc="few-shot", disable=not progress)
    for k in shots:
        for seed in range(seeds):
            pos = sample_kshot(train_y, k, seed=1000 * k + seed)
            X, y = FeatureView(base, pos), train_y[pos]
            c = C
            if c == "auto":
                c = DEFAULT_C
                if k >= 2:
                    a, b = stratified_split(y, 0.5, seed)
                    if len(b):
                        c = search_C(FeatureView(X, a), y[a], FeatureView(X, b), y[b], num_classes=k_cls,
                                     coarse_step=2.0, refine_steps=1, **fit_kw).C
            m = fit_logistic_regression(X, y, C=float(c), num_classes=k_cls, **fit_kw)
            accs[k].append(m.score(test, test_y))
            Cs[k].append(float(c))
            bar.update(1)
    bar.close()
    res = FewShotResult(shots, accs, Cs, zeroshot_acc)
    if zeroshot_acc is not None:
        res.matching_k, res.matching_note = matching_shots(shots, [res.mean(k) for k in shots], zeroshot_acc)
    res.seconds = time.perf_counter() - t0
    return res
