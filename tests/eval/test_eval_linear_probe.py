"""Torch L-BFGS logistic regression against scikit-learn; chunked == unchunked; C search; few-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipforge.eval import fit_logistic_regression, linear_probe, search_C, stratified_split
from clipforge.eval.fewshot import fewshot_curve, matching_shots, sample_kshot
from clipforge.eval.linear_probe import FeatureView


def _blobs(n, k=5, d=32, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(k, d)) * spread
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float16), y


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_matches_sklearn(C):
    sklearn = pytest.importorskip("sklearn.linear_model")
    Xtr, ytr = _blobs(1200, seed=0)
    Xte, yte = _blobs(3000, seed=1)
    sk = sklearn.LogisticRegression(C=C, solver="lbfgs", max_iter=5000, tol=1e-10).fit(Xtr.astype(np.float64), ytr)
    ours = fit_logistic_regression(Xtr, ytr, C=C)
    acc_sk = (sk.predict(Xte.astype(np.float64)) == yte).mean()
    acc = ours.score(Xte, yte)
    assert abs(acc - acc_sk) <= 1e-3, (acc, acc_sk)
    # Same optimum, not just the same accuracy: probabilities agree closely.
    p_sk = sk.predict_proba(Xte.astype(np.float64))
    assert np.abs(ours.predict_proba(Xte).numpy() - p_sk).max() < 1e-2
    assert 0.3 < acc < 1.0  # a non-trivial problem


def test_chunked_equals_unchunked():
    X, y = _blobs(700, k=4, d=16, seed=3)
    # float64: the two paths differ only in summation order, so they agree to ~1e-8.
    full = fit_logistic_regression(X, y, C=2.0, chunk_size=10_000, dtype=torch.float64)
    chunked = fit_logistic_regression(X, y, C=2.0, chunk_size=37, dtype=torch.float64)
    assert torch.allclose(full.weight, chunked.weight, atol=1e-6)
    assert torch.allclose(full.bias, chunked.bias, atol=1e-6)
    # float32 (the default): same optimum up to float32 resolution, same predictions.
    f32 = fit_logistic_regression(X, y, C=2.0, chunk_size=10_000)
    c32 = fit_logistic_regression(X, y, C=2.0, chunk_size=37)
    assert torch.allclose(f32.weight.double(), full.weight, atol=2e-3)
    assert torch.allclose(c32.weight.double(), full.weight, atol=2e-3)
    assert (f32.predict(X, chunk_size=50) == c32.predict(X)).all()
    # Index views over a shared fp16 matrix read the same rows as a copied subset.
    idx = np.arange(0, 700, 3)
    a = fit_logistic_regression(FeatureView(X, idx), y[idx], C=2.0, chunk_size=29, dtype=torch.float64)
    b = fit_logistic_regression(np.ascontiguousarray(X[idx]), y[idx], C=2.0, dtype=torch.float64)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_regularisation_strength_behaves():
    X, y = _blobs(400, seed=5)
    weak = fit_logistic_regression(X, y, C=100.0)
    strong = fit_logistic_regression(X, y, C=1e-4)
    assert weak.weight.norm() > 10 * strong.weight.norm()
    assert weak.score(X, y) >= strong.score(X, y) - 0.05


def test_search_C_prefers_validation_optimum():
    Xtr, ytr = _blobs(300, seed=0, spread=0.35)
    Xva, yva = _blobs(600, seed=1, spread=0.35)
    res = search_C(Xtr, ytr, Xva, yva, coarse_step=2.0, refine_steps=2)
    tried = {h["C"]: h["val_acc"] for h in res.history}
    assert len(tried) >= 7 and min(tried) == pytest.approx(1e-6) and max(tried) == pytest.approx(1e6)
    assert tried[res.C] == max(tried.values())
    assert res.model is not None and math.isclose(res.model.C, res.C)


def test_linear_probe_end_to_end_and_refit():
    Xtr, ytr = _blobs(500, seed=0)
    Xte, yte = _blobs(500, seed=1)
    res = linear_probe(Xtr, ytr, Xte, yte, search_kw={"coarse_step": 3.0, "refine_steps": 1})
    # 5 balanced classes: chance is 0.2; balanced accuracy must track top-1 on balanced data
    assert res.metrics["acc1"] > 0.6 and res.metrics["mean_per_class_recall"] > 0.6
    assert res.metrics["mean_per_class_recall"] == pytest.approx(res.metrics["acc1"], abs=0.05)
    # top-5 of 5 classes is trivial: NaN, as CLIP_benchmark's linear probe (acc5 only if a label >= 5)
    assert math.isnan(res.metrics["acc5"])
    assert len(res.search) >= 5 and res.predictions.shape == (500,)
    fixed = linear_probe(Xtr, ytr, Xte, yte, C=res.C)
    assert fixed.metrics["acc1"] == pytest.approx(res.metrics["acc1"], abs=2e-3)


def test_bad_inputs():
    X, y = _blobs(20)
    with pytest.raises(ValueError, match="labels"):
        fit_logistic_regression(X, y[:10], C=1.0)
    with pytest.raises(ValueError, match="C must be"):
        fit_logistic_regression(X, y, C=0.0)
    with pytest.raises(ValueError, match="2-D"):
        fit_logistic_regression(X[0], y, C=1.0)


def test_stratified_split():
    y = np.repeat(np.arange(4), [10, 2, 5, 1])
    a, b = stratified_split(y, 0.3, seed=0)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == len(y)
    assert set(y[b]) == {0, 1, 2}            # the 1-item class stays entirely in the first part
    assert (y[b] == 0).sum() == 3


def test_sample_kshot():
    y = np.repeat(np.arange(3), [10, 10, 2])
    pos = sample_kshot(y, 4, seed=1)
    assert np.bincount(y[pos]).tolist() == [4, 4, 2]
    assert not np.array_equal(pos, sample_kshot(y, 4, seed=2))
    assert np.array_equal(pos, sample_kshot(y, 4, seed=1))


def test_matching_shots_interpolates_on_log2():
    k, note = matching_shots([1, 2, 4, 8], [0.2, 0.4, 0.6, 0.8], 0.5)
    assert k == pytest.approx(2 ** 1.5) and "2 and 4" in note
    assert matching_shots([1, 2, 4], [0.2, 0.4, 0.6], 0.9)[0] is None
    assert matching_shots([1, 2, 4], [0.7, 0.8, 0.9], 0.5)[0] == 1.0
    k, _ = matching_shots([4, 1, 2], [0.9, 0.1, 0.5], 0.7)     # unsorted input
    assert k == pytest.approx(2 ** 1.5)


def test_fewshot_curve_improves_with_shots():
    Xtr, ytr = _blobs(400, seed=0)
    Xte, yte = _blobs(400, seed=1)
    res = fewshot_curve(Xtr, ytr, Xte, yte, shots=[1, 4, 16], seeds=2, zeroshot_acc=0.5)
    assert all(len(v) == 2 for v in res.accs.values())
    assert res.mean(16) > res.mean(1)
    assert res.matching_note
    curve = res.curve()
    assert set(curve) == {"1", "4", "16"} and curve["16"]["std"] >= 0
