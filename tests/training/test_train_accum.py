"""Gradient accumulation gives the gradient of the whole contrastive batch."""

from __future__ import annotations

import pytest
import torch

from clipforge.models import create_model
from clipforge.training.loss import ClipLoss
from clipforge.training.step import FeatureModel, TrainStep, autocast_context

from conftest import micro_config
from training.helpers_train import grads, random_batch


def _gradients(model, batches, precision="fp32"):
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    step = TrainStep(model, FeatureModel(model), ClipLoss(), opt, precision=precision)
    loss = step.compute_gradients(batches)
    return loss, grads(model)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_full_batch_gradient(k):
    model = create_model(micro_config("vit"), seed=0).double().train()
    images, ids = random_batch(8, seed=1)
    images = images.double()
    full_loss, full = _gradients(model, [(images, ids)])
    micro = list(zip(images.chunk(k), ids.chunk(k)))
    acc_loss, acc = _gradients(model, micro)
    assert acc_loss == pytest.approx(full_loss, rel=1e-10)
    assert set(acc) == set(full) and "logit_scale" in full
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_float32_within_1e5():
    model = create_model(micro_config("vit"), seed=0).train()
    images, ids = random_batch(8, seed=2)
    _, full = _gradients(model, [(images, ids)])
    _, acc = _gradients(model, list(zip(images.chunk(2), ids.chunk(2))))
    worst = max(float((acc[n] - full[n]).abs().max()) for n in full)
    assert worst < 1e-5, worst


def test_naive_loss_sum_is_not_the_full_batch_gradient():
    """The reason for the feature cache: averaging per-micro-batch losses is a different objective."""
    model = create_model(micro_config("vit"), seed=0).double().train()
    images, ids = random_batch(8, seed=1)
    images = images.double()
    _, full = _gradients(model, [(images, ids)])
    model.zero_grad(set_to_none=True)
    fm = FeatureModel(model)
    for im, tx in zip(images.chunk(2), ids.chunk(2)):
        (ClipLoss()(*fm(im, tx)) / 2).backward()
    naive = grads(model)
    assert not torch.allclose(naive["logit_scale"], full["logit_scale"], rtol=1e-3)


def test_bf16_autocast_runs_and_is_close_on_cpu():  # amp_bf16: open_clip's name for bf16 autocast
    model = create_model(micro_config("vit"), seed=0).train()
    images, ids = random_batch(4, seed=3)
    loss32, _ = _gradients(model, [(images, ids)])
    loss16, g16 = _gradients(model, [(images, ids)], precision="amp_bf16")
    assert loss16 == pytest.approx(loss32, rel=0.05)
    assert all(torch.isfinite(g).all() for g in g16.values())


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="amp .*needs a CUDA GPU"):
        autocast_context("amp", torch.device("cpu"))  # open_clip's "amp" = float16 autocast
