"""bf16 mixed-precision training through the fast layer, and ``--precision auto``'s choice."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from clipforge import fast
from clipforge.fast import backend
from clipforge.fast.transformer import attention
from clipforge.models import create_model
from clipforge.training.config import TrainConfig
from clipforge.training.loop import run_precision
from clipforge.training.loss import ClipLoss
from clipforge.training.step import FeatureModel, TrainStep

from conftest import micro_config
from training.helpers_train import grads, random_batch


def _step_gradients(model, images, ids, precision):
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss = TrainStep(model, FeatureModel(model), ClipLoss(), opt, precision=precision).compute_gradients([(images, ids)])
    return loss, grads(model)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_attention_core_runs_in_fp32_under_cpu_autocast():
    """Under bf16 autocast the fast attention computes the softmax in fp32 from bf16 q, k, v and
    returns bf16 (plain torch autocast would run the whole kernel in bf16)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.bfloat16())  # exactly the fp32 kernel's result, rounded once
    bf16_kernel = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(got, bf16_kernel)  # not what the bf16 kernel gives


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_fast_bf16_training_gradients_match_fp32(kind):
    """amp_bf16 through the fast layer: master weights and gradients fp32, loss within bf16
    rounding of the fp32 step, every gradient tensor pointing the same way: cosine > 0.99 for the
    ViT; > 0.95 for the ResNet, whose convolutions and BatchNorm run in torch's bf16 autocast and
    whose stem gradient crosses every layer (measured 0.978 for its first conv)."""
    bound = 0.99 if kind == "vit" else 0.95
    base = create_model(micro_config(kind), seed=0).train()
    images, ids = random_batch(8, image_size=base.image_size, seed=5)
    fp32 = fast.enable(copy.deepcopy(base))
    bf16 = fast.enable(copy.deepcopy(base))
    loss32, g32 = _step_gradients(fp32, images, ids, "fp32")
    loss16, g16 = _step_gradients(bf16, images, ids, "amp_bf16")
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert set(g16) == set(g32)
    for name, g in g16.items():
        assert g.dtype == torch.float32, name
        if g32[name].abs().max() > 1e-6:
            assert _cosine(g, g32[name]) > bound, name


def _fake_probe(tmp_path, monkeypatch, fp32: float, bf16: float) -> None:
    """Point the machine cache at ``tmp_path`` holding a stored precision probe with these speeds."""
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path))
    backend._precision_record.cache_clear()
    path = backend.cache_path(f"precision-{backend.linear_backend()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": backend.machine_key(), "gflops": {"fp32": fp32, "bf16": bf16, "fp16": 1.0}}))


@pytest.fixture
def probe(tmp_path, monkeypatch):
    yield lambda fp32, bf16: _fake_probe(tmp_path, monkeypatch, fp32, bf16)
    backend._precision_record.cache_clear()


def test_auto_precision_follows_the_stored_probe(probe, tmp_path):
    cpu = torch.device("cpu")
    probe(fp32=400.0, bf16=900.0)
    precision, why = run_precision(TrainConfig(precision="auto"), cpu)
    assert precision == "amp_bf16" and "900" in why and "400" in why
    probe(fp32=400.0, bf16=200.0)  # a CPU without bf16 units: bf16 emulated, slower
    precision, why = run_precision(TrainConfig(precision="auto"), cpu)
    assert precision == "fp32" and "kept fp32" in why
    with pytest.warns(UserWarning, match="no faster than fp32"):
        assert run_precision(TrainConfig(precision="amp_bf16"), cpu) == ("amp_bf16", "as requested")
    assert run_precision(TrainConfig(precision="fp32"), cpu) == ("fp32", "as requested")


def test_auto_precision_on_gpus_and_resume(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert run_precision(TrainConfig(precision="auto"), torch.device("cuda", 0))[0] == "amp_bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert run_precision(TrainConfig(precision="auto"), torch.device("cuda", 0))[0] == "amp"
    assert run_precision(TrainConfig(precision="auto"), torch.device("mps"))[0] == "fp32"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**TrainConfig(precision="amp_bf16").to_dict()}))
    probe(fp32=400.0, bf16=100.0)  # the machine now says fp32: a resumed run keeps its recorded choice
    precision, why = run_precision(TrainConfig(precision="auto", resume=str(run)), torch.device("cpu"))
    assert precision == "amp_bf16" and "resolved when the run started" in why


def test_train_records_the_resolved_precision(probe, tmp_path):
    from clipforge.training import train

    probe(fp32=400.0, bf16=900.0)
    out = tmp_path / "out"
    summary = train(TrainConfig(model="tiny-vit", data="builtin:scenes", out=str(out), steps=2, batch_size=4,
                                precision="auto", eval_every=0, progress=False, num_workers=0, threads=1))
    saved = json.loads((out / "config.json").read_text())
    assert saved["precision"] == "amp_bf16"
    assert summary["backend"]["precision"] == "amp_bf16" and summary["backend"]["precision_why"].startswith("auto")
    assert summary["status"] == "completed" and summary["final_loss"] is not None
