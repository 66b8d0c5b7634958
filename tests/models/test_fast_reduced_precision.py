"""Fast paths under reduced precision, found by the GPU acceptance script's CPU run: the bucketed
text path under autocast (its output takes the chunks' dtype, not the fp32 weights'), and bf16
inference on a CPU whose oneDNN has no bf16 products (weights left unpacked instead of raising)."""

from __future__ import annotations

import copy

import torch

import clipforge
from clipforge import fast
from clipforge.fast import backend
from clipforge.inference import optimize_for_inference
from conftest import micro_config


def _texts() -> torch.Tensor:
    return clipforge.tokenize(["a dog", "a red circle above a blue square on the left", "two cats", "x"])


def test_bucketed_text_path_under_bf16_autocast_matches_plain():
    plain = clipforge.create_model(micro_config("vit"), seed=0).eval()
    quick = fast.enable(copy.deepcopy(plain)).eval()
    ids = _texts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain.encode_text(ids, normalize=True).float()
        got = quick.encode_text(ids, normalize=True)  # > 1 row without grad: the bucketed path
    assert got.dtype == torch.bfloat16
    cos = (got.float() * ref).sum(-1)
    assert cos.min() > 0.99, cos


def test_bf16_inference_runs_where_onednn_has_no_bf16(monkeypatch):
    backend.onednn_bf16_available.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    try:
        assert not backend.packs(torch.zeros(4, 4, dtype=torch.bfloat16))
        model = clipforge.create_model(micro_config("vit"), seed=0)
        ref = model.eval().encode_text(_texts(), normalize=True).detach()
        quick = optimize_for_inference(copy.deepcopy(model), precision="bf16")
        with torch.no_grad():
            got = quick.encode_text(_texts(), normalize=True).float()
        assert (got * ref).sum(-1).min() > 0.99
    finally:
        backend.onednn_bf16_available.cache_clear()
