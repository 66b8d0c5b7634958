"""clipforge.precision: one vocabulary for training, inference, the fast layer and the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

from clipforge import precision as P
from clipforge.checkpoints import save_model
from clipforge.fast import backend
from clipforge.loading import load_for_inference


def test_one_dtype_map_serves_the_casts_and_the_matmul_probe():
    assert P.DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert backend.DTYPES is P.DTYPES  # the probe measures exactly the casts inference can make
    assert [P.inference_dtype(c) for c in P.INFERENCE_CASTS if c != "auto"] == [
        torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float16,
        torch.float32]  # int8 keeps fp32 weights
    for name in P.INFERENCE_PRECISIONS:
        assert P.inference_precision(name) in P.INFERENCE_CASTS


def test_every_training_name_has_one_meaning():
    for name, p in P.PRECISIONS.items():
        assert p.name == name
        casts, autocasts = p.weight_scope != "none", p.autocast_dtype is not None
        assert not (casts and autocasts) and (casts or autocasts or name == "fp32")
    assert P.TRAIN_PRECISION_CHOICES == (*P.PRECISIONS, "auto")
    assert "int8" not in P.PRECISIONS and not set(P.INFERENCE_PRECISIONS) & {"amp", "amp_bf16", "amp_bfloat16"}


@pytest.mark.parametrize("name", ["bf16", "fp16", "pure_bf16"])
def test_a_name_casts_the_same_weights_in_training_and_at_inference(name, tmp_path, micro_vit):
    """open_clip's meaning in both columns: ``bf16`` casts the matmul weights (LayerNorm, embeddings
    and the logit scale stay float32), ``pure_bf16`` every weight."""
    ckpt = save_model(micro_vit, tmp_path / "m.safetensors")
    inferred, _ = load_for_inference(ckpt, precision=name)
    trained = P.cast_weights(load_for_inference(ckpt)[0], name)
    sa, sb = inferred.state_dict(), trained.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    low = P.DTYPES[name.removeprefix("pure_")]
    assert P.lowest_weight_dtype(inferred) == low
    pure = name.startswith("pure_")
    assert (sa["visual.ln_pre.weight"].dtype == low) == pure and (sa["logit_scale"].dtype == low) == pure
    assert sa["visual.conv1.weight"].dtype == sa["text.text_projection"].dtype == low
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, got = micro_vit.encode_image(images, normalize=True), inferred.encode_image(images, normalize=True)
    assert (ref * got.float()).sum(-1).min() > 0.99


def test_device_keeps_the_old_spellings_warning_once():
    import clipforge.device as dv
    from clipforge.utils import deprecation

    for name in ("get_precision", "cast_weights"):
        deprecation._warned.discard(f"clipforge.device.{name}")  # another test may have asked first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dv.get_precision is P.get_precision and dv.get_precision is P.get_precision
        assert dv.cast_weights is P.cast_weights
    assert [str(w.message) for w in caught] == [
        "clipforge.device.get_precision is deprecated; use clipforge.precision.get_precision",
        "clipforge.device.cast_weights is deprecated; use clipforge.precision.cast_weights"]
    with pytest.raises(AttributeError):
        dv.no_such_name


def test_bf16_inference_of_a_bfloat16_model_keeps_layernorm_float32(tmp_path, micro_vit):
    """The cast starts from float32 whatever dtype the model held: a model already in bfloat16
    (``pure_bf16``) given to ``optimize_for_inference(precision="bf16")`` ends with the same dtypes as
    a float32 one (LayerNorm, embeddings float32); a file stored in bfloat16 loads the same way."""
    import copy

    from clipforge.fast import optimize_for_inference

    ref = optimize_for_inference(copy.deepcopy(micro_vit), precision="bf16")
    dtypes = {k: v.dtype for k, v in ref.state_dict().items()}
    low = optimize_for_inference(copy.deepcopy(micro_vit).to(torch.bfloat16), precision="bf16")
    assert {k: v.dtype for k, v in low.state_dict().items()} == dtypes
    assert dtypes["visual.ln_pre.weight"] == torch.float32
    stored = save_model(copy.deepcopy(micro_vit).to(torch.bfloat16), tmp_path / "bf16.safetensors")
    loaded, _ = load_for_inference(stored, precision="bf16")
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == dtypes
