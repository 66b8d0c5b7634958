"""The per-objective zero-shot scorers (clipforge.eval.scorers): one registry entry per objective,
and the memory-bounded caption scorer equal to the model's reference computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config

from clipforge.config import OBJECTIVES
from clipforge.eval import ZeroShotClassifier
from clipforge.eval import scorers
from clipforge.models import create_model
from clipforge.tokenizer import tokenize
from clipforge.training.token_losses import TOKEN_OBJECTIVES


def _model(objective: str, seed: int = 0):
    return create_model(dataclasses.replace(micro_config("vit"), objective=objective), seed=seed).eval()


def test_every_objective_has_one_scorer_and_contrastive_alone_has_no_token_loss():
    assert set(scorers.SCORERS) == set(OBJECTIVES)
    assert set(TOKEN_OBJECTIVES) == set(OBJECTIVES) - {"contrastive"}
    for objective in OBJECTIVES:
        clf = ZeroShotClassifier(_model(objective), ["cat", "dog"], ["a {}"], use_cache=False)
        assert clf.scorer is scorers.SCORERS[objective] and clf.objective == objective


@pytest.mark.parametrize("rows_per_chunk", [None, 1, 5])
def test_chunked_caption_likelihood_equals_the_model_reference(monkeypatch, rows_per_chunk):
    """Prefix sharing, pair chunks and the logit budget (forced down to a few rows) change nothing."""
    model = _model("caption", seed=3)
    ids = tokenize(["a photo of a cat.", "a photo of a dog.", "a photo of a red triangle.", "a cat"])
    feats = F.normalize(torch.randn(3, model.config.embed_dim), dim=-1)
    monkeypatch.setattr(scorers, "LOGIT_BUDGET", 3 * model.config.text.vocab_size)
    got = scorers.caption_log_likelihood(model, feats, ids, rows_per_chunk=rows_per_chunk)
    want = model.prompt_log_likelihood(feats, ids)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.equal(got[:, 0], got[:, 1])  # the scores depend on the prompt


def test_topk_matches_scores_for_every_objective():
    feats = torch.randn(4, 32)
    for objective in OBJECTIVES:
        clf = ZeroShotClassifier(_model(objective), ["cat", "dog", "bird"], ["a {}"], use_cache=False)
        top = clf.topk(feats, k=5)
        assert top.shape == (4, 3)
        assert top[:, 0].tolist() == clf.scores(F.normalize(feats, dim=-1)).argmax(dim=1).tolist()
        assert clf.topk(feats[:0], k=2).shape == (0, 2)
