"""Linear probe: multinomial logistic regression on frozen image features, in torch.

The objective is scikit-learn's (``C`` = 1/lambda, bias not penalised), divided by N::

    mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C N)

minimised full-batch with L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search), as the paper
does with sklearn. The loss and gradient are accumulated over row chunks, each converted from
the float16 feature matrix on the fly, so 1M x 1024 features (2 GB fp16) fit in memory with a
few hundred MB of working space. ``C`` is chosen on a validation split by a log-spaced sweep
over [1e-6, 1e6] followed by a bisection-style refinement around the best value (the paper's
parametric search), then the model is refit on train + validation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils import torch_threads
from .metrics import ACC5_MIN_CLASSES, classification_metrics

DEFAULT_CHUNK_ELEMS = 1 << 25  # floats per converted chunk (~128 MB in float32)
SINGLE_THREAD_ELEMS = 1 << 23   # below this many feature values, fit on one thread (see utils.threads)


class FeatureView:
    """Rows ``idx`` (or all rows) of a feature matrix (numpy, memmap or tensor), read in chunks.
    Index sets over one shared matrix avoid copying the train/val/test splits."""

    def __init__(self, X: Any, idx: np.ndarray | None = None) -> None:
        if isinstance(X, FeatureView):
            base_idx = X.idx if X.idx is not None else None
            if idx is not None and base_idx is not None:
                idx = base_idx[np.asarray(idx, dtype=np.int64)]
            elif idx is None:
                idx = base_idx
            X = X.X
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        if X.ndim != 2:
            raise ValueError(f"features must be 2-D [N, D], got shape {X.shape}")
        self.X = X
        self.idx = None if idx is None else np.asarray(idx, dtype=np.int64)

    def __len__(self) -> int:
        return self.X.shape[0] if self.idx is None else len(self.idx)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def chunks(self, size: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, int, torch.Tensor]]:
        n = len(self)
        for s in range(0, n, size):
            e = min(n, s + size)
            rows = self.X[s:e] if self.idx is None else self.X[self.idx[s:e]]
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            yield s, e, torch.from_numpy(np.array(rows, dtype=np_dtype))  # a writable converted copy


def _chunk_rows(dim: int, chunk_size: int | None) -> int:
    return max(1, chunk_size or DEFAULT_CHUNK_ELEMS // max(dim, 1))


@dataclass
class LogisticRegression:
    """A fitted multinomial logistic regression (``weight`` [D, C], ``bias`` [C])."""

    weight: torch.Tensor
    bias: torch.Tensor
    C: float
    n_iter: int = 0
    n_evals: int = 0
    loss: float = float("nan")
    seconds: float = 0.0

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def decision_function(self, X: Any, chunk_size: int | None = None) -> torch.Tensor:
        view = X if isinstance(X, FeatureView) else FeatureView(X)
        rows = _chunk_rows(view.dim, chunk_size)
        out = [xb @ self.weight + self.bias for _, _, xb in view.chunks(rows, self.weight.dtype)]
        return torch.cat(out).float() if out else torch.zeros(0, self.num_classes)

    def predict_proba(self, X: Any, chunk_size: int | None = None) -> torch.Tensor:
        logits = self.decision_function(X, chunk_size)
        return (logits - logits.logsumexp(dim=1, keepdim=True)).exp()

    def predict(self, X: Any, chunk_size: int | None = None) -> np.ndarray:
        return self.decision_function(X, chunk_size).argmax(dim=1).numpy()

    def score(self, X: Any, y: Any) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())

    def mean_loss(self, X: Any, y: Any) -> float:
        logits = self.decision_function(X)
        logp = logits - logits.logsumexp(dim=1, keepdim=True)
        return float(-logp.gather(1, torch.as_tensor(np.asarray(y), dtype=torch.long)[:, None]).mean())


def fit_logistic_regression(X: Any, y: Any, *, C: float, num_classes: int | None = None, max_iter: int = 1000,
                            tol: float = 1e-5, chunk_size: int | None = None, init: LogisticRegression | None = None,
                            dtype: torch.dtype = torch.float32, history_size: int = 20, threads: int | None = None,
                            progress: bool = False) -> LogisticRegression:
    """Fit by full-batch L-BFGS until max |gradient| of the mean objective <= ``tol`` (sklearn's
    default is 1e-4) or ``max_iter``. ``chunk_size`` rows are converted and processed at a time
    (default: ~32M floats per chunk), which changes nothing but peak memory. ``threads``: torch
    threads during the fit (default: 1 for small problems, unchanged otherwise)."""
    view = X if isinstance(X, FeatureView) else FeatureView(X)
    if threads is None and len(view) * view.dim <= SINGLE_THREAD_ELEMS:
        threads = 1
    with torch_threads(threads):
        return _fit(view, y, C=C, num_classes=num_classes, max_iter=max_iter, tol=tol, chunk_size=chunk_size,
                    init=init, dtype=dtype, history_size=history_size, progress=progress)


def _fit(view: FeatureView, y: Any, *, C: float, num_classes: int | None, max_iter: int, tol: float,
         chunk_size: int | None, init: LogisticRegression | None, dtype: torch.dtype, history_size: int,
         progress: bool) -> LogisticRegression:
    t0 = time.perf_counter()
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long).reshape(-1)
    n, d = len(view), view.dim
    if n == 0:
        raise ValueError("no training samples")
    if y_t.shape[0] != n:
        raise ValueError(f"{y_t.shape[0]} labels for {n} feature rows")
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a positive finite number, got {C}")
    k = int(num_classes or int(y_t.max()) + 1)
    if int(y_t.max()) >= k or int(y_t.min()) < 0:
        raise ValueError(f"labels must lie in [0, {k}), got range [{int(y_t.min())}, {int(y_t.max())}]")
    rows = _chunk_rows(d, chunk_size)
    W = torch.zeros(d, k, dtype=dtype)
    b = torch.zeros(k, dtype=dtype)
    if init is not None and init.weight.shape == (d, k):
        W.copy_(init.weight)
        b.copy_(init.bias)
    # One chunk? keep it converted (the common small-data case pays no per-evaluation conversion).
    resident = next(view.chunks(rows, dtype))[2] if n <= rows else None
    reg = 0.5 / (C * n)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-9, history_size=history_size,
                            line_search_fn="strong_wolfe")
    evals = 0
    last = float("nan")
    bar = tqdm(desc=f"L-BFGS C={C:.3g}", unit="eval", disable=not progress, leave=False)

    def closure() -> torch.Tensor:
        # Loss and gradient by hand (softmax - one-hot): no autograd graph per chunk.
        nonlocal evals, last
        gW = torch.zeros_like(W)
        gb = torch.zeros_like(b)
        total = 0.0
        with torch.no_grad():
            it = [(0, n, resident)] if resident is not None else view.chunks(rows, dtype)
            for s, e, xb in it:
                logits = torch.addmm(b, xb, W)
                # (logsumexp, not log_softmax: the latter pays a ~10 ms parallel-region cost per
                # call on small chunks when the CPU is contended)
                logp = logits - logits.logsumexp(dim=1, keepdim=True)
                yb = y_t[s:e]
                total -= float(logp.gather(1, yb[:, None]).sum()) / n
                g = logp.exp_()
                g[torch.arange(e - s), yb] -= 1.0
                g /= n
                gW.addmm_(xb.t(), g)
                gb += g.sum(dim=0)
            total += reg * float((W * W).sum())
            gW.add_(W, alpha=2 * reg)
        W.grad, b.grad = gW, gb
        evals += 1
        bar.update(1)
        last = total
        return torch.tensor(total, dtype=dtype)

    opt.step(closure)
    bar.close()
    state = opt.state[opt._params[0]]
    return LogisticRegression(W.detach().clone(), b.detach().clone(), float(C), int(state.get("n_iter", 0)),
                              evals, last, time.perf_counter() - t0)


@dataclass
class SearchResult:
    C: float
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per C tried
    model: LogisticRegression | None = None                          # best model (fit on train only)


def search_C(train_X: Any, train_y: Any, val_X: Any, val_y: Any, *, num_classes: int | None = None,
             c_min: float = 1e-6, c_max: float = 1e6, coarse_step: float = 2.0, refine_steps: int = 3,
             progress: bool = False, **fit_kw: Any) -> SearchResult:
    """Pick ``C`` by validation accuracy (ties: lower validation loss): a sweep over log10 C in
    ``[log10 c_min, log10 c_max]`` every ``coarse_step`` decades, then ``refine_steps`` rounds of
    trying best +- step with the step halved each round. Fits are warm-started."""
    if c_min <= 0 or c_max < c_min:
        raise ValueError(f"need 0 < c_min <= c_max, got {c_min}, {c_max}")
    tried: dict[float, tuple[float, float, LogisticRegression]] = {}
    lo, hi = math.log10(c_min), math.log10(c_max)

    def evaluate(logc: float, init: LogisticRegression | None) -> LogisticRegression:
        logc = round(logc, 6)
        if logc in tried:
            return tried[logc][2]
        m = fit_logistic_regression(train_X, train_y, C=10 ** logc, num_classes=num_classes, init=init, **fit_kw)
        tried[logc] = (m.score(val_X, val_y), m.mean_loss(val_X, val_y), m)
        return m

    def best() -> float:
        return max(tried, key=lambda c: (tried[c][0], -tried[c][1]))

    grid = list(np.arange(lo, hi + 1e-9, coarse_step)) or [lo]
    bar = tqdm(total=len(grid) + 2 * refine_steps, desc="search C", disable=not progress)
    prev = None
    for logc in grid:  # strong -> weak regularisation, each warm-started from the previous
        prev = evaluate(float(logc), prev)
        bar.update(1)
    step = coarse_step
    for _ in range(refine_steps):
        step /= 2
        centre = best()
        for logc in (centre - step, centre + step):
            if lo - 1e-9 <= logc <= hi + 1e-9:
                evaluate(logc, tried[centre][2])
            bar.update(1)
    bar.close()
    c = best()
    history = [{"C": 10 ** lc, "val_acc": a, "val_loss": l} for lc, (a, l, _) in sorted(tried.items())]
    return SearchResult(10 ** c, history, tried[c][2])


@dataclass
class LinearProbeResult:
    metrics: dict[str, float]
    C: float
    model: LogisticRegression
    search: list[dict[str, float]]
    predictions: np.ndarray
    seconds: dict[str, float]


def stratified_split(labels: Any, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions split so that ~``fraction`` of each class goes to the second part (at least one
    item of a class with >= 2 items)."""
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        rng.shuffle(pos)
        k = int(round(len(pos) * fraction))
        k = min(max(k, 1 if len(pos) >= 2 else 0), len(pos) - 1) if len(pos) >= 2 else 0
        b.append(pos[:k])
        a.append(pos[k:])
    return np.sort(np.concatenate(a)).astype(np.int64), np.sort(np.concatenate(b)).astype(np.int64)


def linear_probe(train_X: Any, train_y: Any, test_X: Any, test_y: Any, *, num_classes: int | None = None,
                 C: float | None = None, val: tuple[Any, Any] | None = None, val_fraction: float = 0.2,
                 seed: int = 0, search_kw: dict[str, Any] | None = None, progress: bool = False,
                 **fit_kw: Any) -> LinearProbeResult:
    """Fit on train (``C`` searched on ``val`` or on a stratified ``val_fraction`` of train unless
    given), refit on train + val with that ``C``, and score on test."""
    t0 = time.perf_counter()
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    k = int(num_classes or max(int(train_y.max()), int(test_y.max()) if len(test_y) else 0) + 1)
    train = FeatureView(train_X)
    history: list[dict[str, float]] = []
    init = None
    if C is None:
        if val is not None:
            va_X, va_y = FeatureView(val[0]), np.asarray(val[1], dtype=np.int64)
            tr_X, tr_y = train, train_y
            full_X = FeatureView(np.concatenate([np.asarray(train.X if train.idx is None else train.X[train.idx]),
                                                 np.asarray(va_X.X if va_X.idx is None else va_X.X[va_X.idx])]))
            full_y = np.concatenate([train_y, va_y])
        else:
            tr_pos, va_pos = stratified_split(train_y, val_fraction, seed)
            if len(va_pos) == 0:
                raise ValueError("too few training samples per class to hold out a validation split; pass C")
            tr_X, tr_y = FeatureView(train, tr_pos), train_y[tr_pos]
            va_X, va_y = FeatureView(train, va_pos), train_y[va_pos]
            full_X, full_y = train, train_y
        res = search_C(tr_X, tr_y, va_X, va_y, num_classes=k, progress=progress, **(search_kw or {}), **fit_kw)
        C, history, init = res.C, res.history, res.model
    else:
        full_X, full_y = train, train_y
    t1 = time.perf_counter()
    model = fit_logistic_regression(full_X, full_y, C=C, num_classes=k, init=init, progress=progress, **fit_kw)
    t2 = time.perf_counter()
    scores = model.decision_function(test_X)
    metrics = classification_metrics(scores, test_y, k)
    if len(test_y) and int(test_y.max()) < ACC5_MIN_CLASSES:
        metrics["acc5"] = float("nan")  # CLIP_benchmark's linear probe: acc5 only if test labels reach 5
    pred = scores.argmax(dim=1).numpy()
    return LinearProbeResult(metrics, float(C), model, history, pred,
                             {"search": t1 - t0, "fit": t2 - t1, "score": time.perf_counter() - t2})
