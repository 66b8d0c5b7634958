"""Evaluation of sigmoid-loss models: logits carry the learned bias, probabilities are per-pair
sigmoids, and rankings (accuracy, Recall@K) equal those of the same towers without a bias."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from clipforge.eval import ZeroShotClassifier, pair_logits, pair_probabilities, retrieval_metrics
from clipforge.eval.metrics import chunked_topk
from clipforge.models import create_model

from conftest import micro_config

NAMES = ["cat", "dog", "red car", "blue bird"]


def _pair(bias: float = -4.0):
    plain = create_model(micro_config("vit"), seed=0).eval()
    biased = create_model(dataclasses.replace(micro_config("vit"), init_logit_bias=bias), seed=0).eval()
    return plain, biased


def test_zeroshot_logits_include_the_bias_and_probabilities_are_sigmoids(tmp_path):
    plain, biased = _pair(-4.0)
    feats = torch.nn.functional.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    a = ZeroShotClassifier(plain, NAMES, "simple", cache_dir=tmp_path / "a")
    b = ZeroShotClassifier(biased, NAMES, "simple", cache_dir=tmp_path / "b")
    assert a.logit_bias is None and b.logit_bias == -4.0
    la, lb = a.logits(feats), b.logits(feats)
    torch.testing.assert_close(lb, la - 4.0)
    torch.testing.assert_close(b.predict_proba(feats), torch.sigmoid(la - 4.0))
    torch.testing.assert_close(a.predict_proba(feats).sum(dim=1), torch.ones(6))  # softmax for CLIP
    assert not torch.allclose(b.predict_proba(feats).sum(dim=1), torch.ones(6))  # independent sigmoids
    assert torch.equal(a.predict(feats), b.predict(feats))  # the ranking is the bias-free one
    top_a, conf_a = chunked_topk(feats, a.weights, scale=a.logit_scale)
    top_b, conf_b = chunked_topk(feats, b.weights, scale=b.logit_scale, bias=b.logit_bias)
    assert np.array_equal(top_a, top_b)
    np.testing.assert_allclose(conf_b, torch.sigmoid(lb.max(dim=1).values).numpy(), rtol=1e-6)
    np.testing.assert_allclose(conf_a, a.predict_proba(feats).max(dim=1).values.numpy(), rtol=1e-5)


def test_retrieval_pair_scores_and_unchanged_recall():
    plain, biased = _pair(-2.5)
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(10, 32, generator=g), dim=-1)
    owner = np.repeat(np.arange(5), 2)
    scale = float(biased.logit_scale.detach().exp())
    torch.testing.assert_close(pair_logits(biased, img, txt), scale * img @ txt.t() - 2.5)
    torch.testing.assert_close(pair_probabilities(biased, img, txt), torch.sigmoid(scale * img @ txt.t() - 2.5))
    torch.testing.assert_close(pair_probabilities(plain, img, txt), (scale * img @ txt.t()).softmax(dim=-1))
    # Recall@K from the biased logits (a similarity matrix) equals Recall@K from the cosines.
    from clipforge.eval import recall_from_similarity

    assert recall_from_similarity(pair_logits(biased, img, txt), owner) == retrieval_metrics(img, txt, owner)
