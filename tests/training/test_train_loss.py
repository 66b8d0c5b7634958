"""Contrastive loss against a hand computation; weight-decay grouping; the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipforge.training.loss import ClipLoss, contrastive_loss, scale_grad
from clipforge.training.optim import CosineWarmup, build_optimizer, cosine_lr, param_groups


def _hand_loss(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE written out with loops, in float64."""
    n = img.shape[0]
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = np.array([[scale * float(np.dot(img[i], txt[j])) for j in range(n)] for i in range(n)])
    i2t = -sum(sim[i, i] - math.log(sum(math.exp(sim[i, j]) for j in range(n))) for i in range(n)) / n
    t2i = -sum(sim[j, j] - math.log(sum(math.exp(sim[i, j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    scale = torch.tensor(7.5, dtype=torch.float64)
    got = contrastive_loss(torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1), scale)
    assert got.item() == pytest.approx(_hand_loss(img.numpy(), txt.numpy(), 7.5), rel=1e-12)
    # asymmetric case: the two directions differ, so averaging them is actually tested
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    assert not torch.allclose(sim.softmax(0).diag(), sim.softmax(1).diag())


def test_loss_class_single_process_equals_function_and_checks_shapes():
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    s = torch.tensor(10.0)
    assert ClipLoss()(img, txt, s).item() == pytest.approx(contrastive_loss(img, txt, s).item())
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        contrastive_loss(img, txt[:3], s)


def test_perfect_alignment_gives_low_loss():
    x = torch.nn.functional.normalize(torch.eye(5), dim=-1)
    assert contrastive_loss(x, x, torch.tensor(100.0)).item() < 1e-6
    assert contrastive_loss(x, x, torch.tensor(1.0)).item() > 0.5


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([3.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.75, 1.0]))


def test_weight_decay_groups(micro_vit):
    groups = param_groups(micro_vit, 0.2)
    decay = set(groups[0]["names"])
    other = set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    for name, p in micro_vit.named_parameters():
        assert (name in decay) != (name in other), name
    for name in ("logit_scale", "text.token_embedding.weight", "text.positional_embedding",
                 "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                 "text.transformer.resblocks.0.attn.in_proj_bias", "text.transformer.resblocks.0.mlp.c_fc.bias"):
        assert name in other, name
    for name in ("visual.conv1.weight", "visual.proj", "text.text_projection",
                 "text.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_proj.weight",
                 "text.transformer.resblocks.0.attn.out_proj.weight"):
        assert name in decay, name
    assert all(micro_vit.get_parameter(n).dim() >= 2 for n in decay)


def test_locked_image_tower_is_left_out_of_the_optimizer(micro_vit):
    micro_vit.lock_image_tower()
    opt = build_optimizer(micro_vit, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in micro_vit.visual.parameters())
    assert all(id(p) in in_opt for p in micro_vit.text.parameters())
    assert id(micro_vit.logit_scale) in in_opt


def test_resnet_batchnorm_and_attnpool_embedding_not_decayed(micro_rn):
    other = set(param_groups(micro_rn, 0.1)[1]["names"])
    assert "visual.bn1.weight" in other and "visual.attnpool.positional_embedding" in other
    assert "visual.conv1.weight" in set(param_groups(micro_rn, 0.1)[0]["names"])


def test_cosine_schedule_values():
    base, warm, total = 1e-3, 10, 110
    assert cosine_lr(0, base, warm, total) == pytest.approx(base / 10)
    assert cosine_lr(4, base, warm, total) == pytest.approx(base * 5 / 10)
    assert cosine_lr(9, base, warm, total) == pytest.approx(base)
    assert cosine_lr(10, base, warm, total) == pytest.approx(base)
    assert cosine_lr(60, base, warm, total) == pytest.approx(base / 2)
    assert cosine_lr(85, base, warm, total) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert cosine_lr(110, base, warm, total) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(5, base, 0, total) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 5 / 110)))
    lrs = [cosine_lr(s, base, warm, total) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_sets_lr_and_checks_state():
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    sched = CosineWarmup(opt, 1e-3, 5, 50)
    assert sched(2) == pytest.approx(6e-4)
    assert all(g["lr"] == pytest.approx(6e-4) for g in opt.param_groups)
    other = CosineWarmup(opt, 1e-3, 5, 60)
    with pytest.raises(ValueError, match="total"):
        other.load_state_dict(sched.state_dict())
