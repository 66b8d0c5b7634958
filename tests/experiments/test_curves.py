"""The experiments' numbers: images-to-reach, ratios with their bounds, Student-t quantiles, and
power-law fits with confidence / prediction intervals (checked against closed forms and an
independent least-squares solve)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from clipforge.experiments.curves import (first_reach, fit_power_law, holdout_prediction, reach_ratio, read_curve,
                                          t_quantile)


def test_first_reach_interpolates_between_evaluations():
    curve = [(100, 0.1), (200, 0.3), (400, 0.7)]
    r = first_reach(curve, 0.5)
    assert r.images == pytest.approx(300.0) and not r.upper_bound
    assert first_reach(curve, 0.3).images == 200           # exactly at an evaluation
    assert first_reach(curve, 0.71).images is None          # never reached


def test_first_reach_at_first_evaluation_is_an_upper_bound():
    r = first_reach([(100, 0.8), (200, 0.9)], 0.5)
    assert r.images == 100 and r.upper_bound


def test_ratio_bounds_follow_the_reference():
    exact, bound = first_reach([(100, 0.1), (300, 0.6)], 0.35), first_reach([(50, 0.9)], 0.35)
    assert exact.images == pytest.approx(200.0)
    assert reach_ratio(exact, bound) == {"ratio": pytest.approx(4.0), "bound": ">="}   # reference reached earlier
    assert reach_ratio(bound, exact) == {"ratio": pytest.approx(0.25), "bound": "<="}
    assert reach_ratio(exact, exact)["bound"] == "="
    assert reach_ratio(bound, bound)["ratio"] is None


def test_read_curve_keeps_the_last_record_of_a_step(tmp_path):
    lines = [{"step": 10, "loss": 3.0}, {"step": 10, "eval/x_acc": 0.2}, {"step": 20, "eval/x_acc": 0.4},
             {"step": 20, "eval/x_acc": 0.5}]  # step 20 logged again after a resume
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert read_curve(tmp_path, "eval/x_acc", 8) == [(80, 0.2), (160, 0.5)]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_curve(tmp_path, "eval/x_acc", 8)


@pytest.mark.parametrize("p,dof,expected", [(0.975, 1, 12.7062), (0.975, 3, 3.18245), (0.975, 10, 2.22814),
                                            (0.95, 30, 1.69726), (0.5, 4, 0.0), (0.025, 5, -2.57058)])
def test_t_quantile_matches_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_approaches_the_normal():
    assert t_quantile(0.975, 5000) == pytest.approx(1.95996, abs=2e-3)


def test_power_law_recovers_an_exact_law():
    x = np.geomspace(1e9, 1e13, 6)
    fit = fit_power_law(x, 3.0 * x ** -0.25)
    assert fit.exponent == pytest.approx(-0.25, abs=1e-9)
    assert fit.coefficient == pytest.approx(3.0, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    lo, hi = fit.exponent_ci
    assert hi - lo < 1e-6


def test_power_law_intervals_match_an_independent_solve():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e9, 1e12, 7)
    y = 2.0 * x ** -0.1 * np.exp(rng.normal(0, 0.05, size=x.size))
    fit = fit_power_law(x, y)
    A = np.stack([np.ones_like(x), np.log10(x)], axis=1)
    coef, res, *_ = np.linalg.lstsq(A, np.log10(y), rcond=None)
    assert fit.exponent == pytest.approx(coef[1], rel=1e-9)
    sigma2 = float(res[0]) / (len(x) - 2)
    se = math.sqrt(sigma2 * np.linalg.inv(A.T @ A)[1, 1])
    half = 2.57058 * se  # t(0.975, 5)
    assert fit.exponent_ci[0] == pytest.approx(coef[1] - half, rel=1e-3)
    assert fit.exponent_ci[1] == pytest.approx(coef[1] + half, rel=1e-3)
    # prediction interval at a new x: standard OLS formula
    x0 = 1e13
    a0 = np.array([1.0, 13.0])
    pse = math.sqrt(sigma2 * (1 + a0 @ np.linalg.inv(A.T @ A) @ a0))
    lo, hi = fit.prediction_interval(x0)
    centre = coef[0] + 13.0 * coef[1]
    assert math.log10(lo) == pytest.approx(centre - 2.57058 * pse, rel=1e-3)
    assert math.log10(hi) == pytest.approx(centre + 2.57058 * pse, rel=1e-3)


def test_holdout_predicts_the_largest_from_the_rest():
    x = [1e10, 1e9, 1e11, 1e12, 1e13]             # unsorted on purpose
    y = [0.5 * v ** -0.1 for v in x]
    y[x.index(1e13)] *= 1.2                       # the largest does 20% worse than the law
    h = holdout_prediction(x, y)
    assert h["x"] == 1e13
    assert h["relative_error"] == pytest.approx(1 / 1.2 - 1, rel=1e-6)
    assert h["within_interval"] is False          # the other four lie exactly on a line: a zero-width interval


@pytest.mark.parametrize("x,y,match", [([1, 2], [1, 0], r"y\[1\] = 0.0"), ([1, 1], [1, 2], "all x are equal"),
                                       ([1], [1], ">= 2 points"), ([1, -2], [1, 1], r"x\[1\]")])
def test_power_law_refuses_bad_points(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y)
