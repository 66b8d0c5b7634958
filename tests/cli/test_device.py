"""Device resolution and the precision vocabulary (open_clip's names), exercised on the CPU."""

from __future__ import annotations

import pytest
import torch

from clipforge import device as dv
from conftest import micro_config


def test_auto_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dv, "_mps_available", lambda: False)
    assert dv.resolve_device("auto") == torch.device("cpu")
    assert dv.resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        dv.resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        dv.resolve_device("mps")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(dv, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dv.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dv.resolve_device("auto") == torch.device("cuda", 0)


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for k, v in {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}.items():  # as torchrun sets them
        monkeypatch.setenv(k, v)
    assert dv.resolve_device("auto") == torch.device("cuda", 2)
    assert dv.resolve_device("cuda") == torch.device("cuda", 2)
    assert dv.resolve_device("cuda:1") == torch.device("cuda", 1)  # explicit index wins
    with pytest.raises(ValueError, match="only 4 GPU"):
        dv.resolve_device("cuda:7")
    from clipforge.training.distributed import resolve_device as training_resolve

    assert training_resolve is dv.resolve_device  # one implementation


def test_one_visible_gpu_per_task_is_cuda0_for_every_rank(monkeypatch):
    # srun --gpus-per-task=1 (or CUDA_VISIBLE_DEVICES per rank): each task sees only its own GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    assert dv.resolve_device("auto") == torch.device("cuda", 0)
    assert dv.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 1 GPU"):
        dv.resolve_device("cuda:3")  # an explicit index is taken literally


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "", "tpu"])
def test_bad_device_spec(bad):
    with pytest.raises(ValueError, match="expected auto | cpu | cuda | cuda:N | mps"):
        dv.resolve_device(bad)


def test_to_device_on_cpu_is_a_no_op():
    t = torch.arange(6.0).reshape(2, 3)
    out = dv.to_device(t, torch.device("cpu"))
    assert out is t and not out.is_pinned()
    assert dv.to_device(t, "cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert dv.pin_memory_for("cuda:0") and not dv.pin_memory_for("cpu") and not dv.pin_memory_for("mps")


def test_precision_table_matches_open_clip_semantics():
    p = dv.get_precision
    assert p("fp32").autocast_dtype is None and p("fp32").weight_scope == "none"
    assert p("amp").autocast_dtype == torch.float16 and p("amp").grad_scaler
    assert p("amp_bf16").autocast_dtype == torch.bfloat16 and not p("amp_bf16").grad_scaler
    assert p("amp_bfloat16") .autocast_dtype == torch.bfloat16
    assert p("bf16").autocast_dtype is None and p("bf16").weight_dtype == torch.bfloat16
    assert p("pure_fp16").weight_scope == "all"
    assert p("bf16").input_dtype == torch.bfloat16 and p("amp_bf16").input_dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        p("int8")
    assert dv.inference_precision("pure_bf16") == "pure_bf16" and dv.inference_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="autocast precisions are for training"):
        dv.inference_precision("amp_bf16")


def test_cast_weights_bf16_keeps_norms_and_embeddings_fp32():
    from clipforge.models import create_model

    model = dv.cast_weights(create_model(micro_config("vit"), seed=0), "bf16")
    dtypes = {n: t.dtype for n, t in model.named_parameters()}
    low = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert "text.text_projection" in low and "visual.proj" in low
    assert any(n.endswith("in_proj_weight") for n in low) and any(n.endswith("c_fc.weight") for n in low)
    for n, d in dtypes.items():
        if "ln_" in n or "embedding" in n or n == "logit_scale":
            assert d == torch.float32, n
    pure = dv.cast_weights(create_model(micro_config("vit"), seed=0), "pure_bf16")
    assert {t.dtype for t in pure.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16", "pure_bf16"])
def test_train_step_in_each_cpu_precision(precision):
    from clipforge.models import create_model
    from clipforge.training.loss import ClipLoss
    from clipforge.training.step import FeatureModel, TrainStep
    from clipforge.tokenizer import tokenize

    torch.manual_seed(0)
    ref_model = create_model(micro_config("vit"), seed=0).train()
    model = dv.cast_weights(create_model(micro_config("vit"), seed=0), precision).train()
    images = torch.randn(4, 3, 32, 32)
    ids = tokenize(["a red circle", "two blue squares", "a green triangle", "a dog"])
    losses = []
    for m, prec in ((ref_model, "fp32"), (model, precision)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        step = TrainStep(m, FeatureModel(m), ClipLoss(), opt, precision=prec)
        losses.append(step([(images, ids)]).loss)
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    if precision != "amp_bf16":
        assert model.text.text_projection.dtype == torch.bfloat16  # stayed low precision through the update


def test_amp_needs_cuda():
    from clipforge.training.step import autocast_context, make_grad_scaler

    with pytest.raises(ValueError, match="amp_bf16"):
        autocast_context("amp", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_grad_scaler("amp", torch.device("cpu"))
    assert make_grad_scaler("bf16", torch.device("cpu")) is None
