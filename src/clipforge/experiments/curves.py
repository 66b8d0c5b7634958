"""The numbers the experiments report: a metric vs images seen (read from a run's metrics.jsonl),
the images a curve needs to first reach an accuracy (the paper's Figure 2 ratios), and power-law
fits of error vs compute with confidence and prediction intervals (Figure 9). NumPy only: the
Student-t quantiles the intervals need are computed here rather than pulling in SciPy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

Curve = list[tuple[int, float]]  # (images seen, value), sorted by images seen


def read_curve(run_dir: str | Path, key: str, images_per_step: int) -> Curve:
    """``(images seen, value)`` of every record of ``key`` in ``run_dir/metrics.jsonl`` (a resumed
    run may have logged a step twice: the last record of a step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if key in r and "step" in r and r[key] is not None:
            by_step[int(r["step"])] = float(r[key])
    return [(step * images_per_step, by_step[step]) for step in sorted(by_step)]


@dataclass(frozen=True)
class Reach:
    """Images seen when a curve first reached ``level``: interpolated linearly between the two
    evaluations around the crossing; ``upper_bound`` when the first evaluation was already there
    (the true crossing lies somewhere before it); ``images`` None when never reached."""

    level: float
    images: float | None
    upper_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_reach(curve: Curve, level: float) -> Reach:
    prev: tuple[int, float] | None = None
    for n, value in curve:
        if value >= level:
            if prev is None:
                return Reach(level, float(n), upper_bound=True)
            n0, v0 = prev
            return Reach(level, n0 + (level - v0) / (value - v0) * (n - n0))
        prev = (n, value)
    return Reach(level, None)


def reach_ratio(reach: Reach, reference: Reach) -> dict[str, Any]:
    """``reach.images / reference.images`` with what the bounds allow: when the reference is an
    upper bound the ratio is a lower bound (``">="``), and vice versa; both bounds: unknown."""
    if reach.images is None or reference.images is None:
        return {"ratio": None, "bound": None}
    if reach.upper_bound and reference.upper_bound:
        return {"ratio": None, "bound": None}
    bound = ">=" if reference.upper_bound else ("<=" if reach.upper_bound else "=")
    return {"ratio": reach.images / reference.images, "bound": bound}


# --- power laws ---------------------------------------------------------------------------------

def _t_cdf(t: float, dof: int) -> float:
    """Student-t CDF by Simpson integration of the density from 0 (enough for 4 digits at dof >= 1
    over the |t| < 100 range the intervals use)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, dof)
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    # substitute u = atan(x): bounded interval, smooth integrand even for heavy tails
    u = np.linspace(0.0, math.atan(t), 4001)
    x = np.tan(u)
    f = np.exp(log_c - (dof + 1) / 2 * np.log1p(x * x / dof)) * (1 + x * x)
    h = (u[-1] - u[0]) / (len(u) - 1)
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + float(integral)


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1 or dof < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and dof >= 1 (got p={p}, dof={dof})")
    lo, hi = -1000.0, 1000.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if _t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class PowerLawFit:
    """``y = coefficient * x ** exponent``, fitted by least squares on ``log10 y`` vs ``log10 x``.
    ``exponent_ci``: the ``level`` confidence interval of the exponent (t with n-2 degrees of
    freedom; None with fewer than 3 points); ``r2`` in log space."""

    exponent: float
    coefficient: float
    exponent_ci: tuple[float, float] | None
    r2: float
    n: int
    level: float
    residual_sd: float  # of log10 y
    x_mean: float       # mean of log10 x
    sxx: float          # sum of squared deviations of log10 x

    def predict(self, x: float) -> float:
        return self.coefficient * x ** self.exponent

    def prediction_interval(self, x: float) -> tuple[float, float] | None:
        """Where a new observation at ``x`` falls with probability ``level`` under the fit's model
        (log-normal scatter around the line); None with fewer than 3 points."""
        if self.n < 3:
            return None
        lx = math.log10(x)
        t = t_quantile(0.5 + self.level / 2, self.n - 2)
        half = t * self.residual_sd * math.sqrt(1 + 1 / self.n + (lx - self.x_mean) ** 2 / self.sxx)
        centre = math.log10(self.predict(x))
        return 10 ** (centre - half), 10 ** (centre + half)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_power_law(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> PowerLawFit:
    """Least-squares line through ``(log10 x, log10 y)``. Needs >= 2 points with distinct ``x``,
    all values > 0 (errors of exactly 0 have no logarithm: the message says which point)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or len(xs) < 2:
        raise ValueError(f"fit_power_law needs two equal-length sequences of >= 2 points (got {xs.shape}, {ys.shape})")
    for name, v in (("x", xs), ("y", ys)):
        bad = np.flatnonzero(~(v > 0) | ~np.isfinite(v))
        if bad.size:
            raise ValueError(f"fit_power_law: {name}[{int(bad[0])}] = {float(v[bad[0]])} "
                             "(a power law needs finite values > 0)")
    lx, ly = np.log10(xs), np.log10(ys)
    x_mean = float(lx.mean())
    sxx = float(((lx - x_mean) ** 2).sum())
    if sxx == 0:
        raise ValueError("fit_power_law: all x are equal")
    slope = float(((lx - x_mean) * (ly - ly.mean())).sum() / sxx)
    intercept = float(ly.mean() - slope * x_mean)
    resid = ly - (intercept + slope * lx)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    n = len(xs)
    sd = math.sqrt(float((resid ** 2).sum()) / (n - 2)) if n > 2 else 0.0
    ci = None
    if n > 2:
        half = t_quantile(0.5 + level / 2, n - 2) * sd / math.sqrt(sxx)
        ci = (slope - half, slope + half)
    return PowerLawFit(exponent=slope, coefficient=10 ** intercept, exponent_ci=ci, r2=r2, n=n, level=level,
                       residual_sd=sd, x_mean=x_mean, sxx=sxx)


def holdout_prediction(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Fit on every point but the one with the largest ``x``, predict that one: the test of a
    scaling law that matters (would the small runs have told you what the big one gets?)."""
    order = np.argsort(np.asarray(x, dtype=np.float64))
    xs, ys = [float(x[i]) for i in order], [float(y[i]) for i in order]
    fit = fit_power_law(xs[:-1], ys[:-1], level)
    predicted = fit.predict(xs[-1])
    interval = fit.prediction_interval(xs[-1])
    return {"fit": fit.to_dict(), "x": xs[-1], "measured": ys[-1], "predicted": predicted,
            "relative_error": (predicted - ys[-1]) / ys[-1], "prediction_interval": interval,
            "within_interval": None if interval is None else bool(interval[0] <= ys[-1] <= interval[1])}


__all__ = ["Curve", "read_curve", "Reach", "first_reach", "reach_ratio", "t_quantile", "PowerLawFit",
           "fit_power_law", "holdout_prediction"]
