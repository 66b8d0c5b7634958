"""Patch dropout (FLIP): the count kept, off at eval, gradients equal to the plain model run on the
kept tokens, fast == plain, exact under accumulation and resumption."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config

from clipforge import fast
from clipforge.models import create_model
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint
from clipforge.training.recipes import set_patch_dropout
from clipforge.training.step import FeatureModel, TrainStep
from clipforge.training.loss import ClipLoss
from training.helpers_train import random_batch


def _model(p: float, use_fast: bool = False):
    model = create_model(micro_config("vit"), seed=0).train()  # 32 px, patch 8: 16 patches
    if use_fast:
        fast.enable(model)
    set_patch_dropout(model, p)
    return model


@pytest.mark.parametrize("p, kept", [(0.5, 8), (0.75, 4), (0.3, 11), (0.97, 1)])
def test_keeps_exactly_round_of_the_patches_per_image(p, kept):
    model = _model(p)
    seen = []
    hook = model.visual.transformer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model.encode_image(torch.randn(5, 3, 32, 32))
    hook.remove()
    assert seen == [torch.Size([5, 1 + kept, 64])]  # class token + kept patches
    keep = model.visual.keep_indices(5, torch.device("cpu"))
    assert keep.shape == (5, kept)
    assert all(len(set(row.tolist())) == kept for row in keep)  # distinct patches per image
    assert len({tuple(row.tolist()) for row in model.visual.keep_indices(64, torch.device("cpu"))}) > 1  # per image


def test_off_in_eval_mode_and_at_zero():
    model = _model(0.5)
    plain = create_model(micro_config("vit"), seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    assert model.visual.keep_indices(3, x.device) is None
    assert torch.equal(model.encode_image(x), plain.encode_image(x))
    model.train()
    assert not torch.allclose(model.encode_image(x), plain.encode_image(x), atol=1e-3)
    set_patch_dropout(model, 0.0)
    assert torch.equal(model.encode_image(x), plain.encode_image(x))


@pytest.mark.parametrize("use_fast", [False, True])
def test_gradients_equal_the_plain_model_on_the_kept_tokens(use_fast):
    model, ref = _model(0.5, use_fast), create_model(micro_config("vit"), seed=0).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    model.encode_image(x).square().sum().backward()
    torch.manual_seed(7)
    keep = model.visual.keep_indices(4, x.device)  # the same draw the forward made
    v = ref.visual  # by hand: all tokens embedded, the kept ones gathered, the plain blocks on them
    tokens = v.conv1(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([v.class_embedding.expand(4, 1, -1), tokens], 1) + v.positional_embedding
    tokens = torch.cat([tokens[:, :1], torch.stack([t[1:][k] for t, k in zip(tokens, keep)])], 1)
    out = v.ln_post(v.transformer(v.ln_pre(tokens))[:, 0]) @ v.proj
    out.square().sum().backward()
    got = dict(model.visual.named_parameters())
    for name, p in ref.visual.named_parameters():
        assert torch.allclose(got[name].grad, p.grad, atol=1e-5, rtol=1e-4), name


def test_fast_equals_plain_under_the_same_seed():
    plain, quick = _model(0.75), _model(0.75, use_fast=True)
    x = torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    a = plain.encode_image(x)
    torch.manual_seed(3)
    b = quick.encode_image(x)
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # the no-grad path chunks big batches: one draw for the whole batch
        quick.visual.inference_chunk_tokens = 10
        torch.manual_seed(3)
        c = quick.encode_image(x)
    assert torch.allclose(a, c, atol=1e-5)


def test_accumulation_recomputes_the_cached_features():
    """Accumulation builds the union's loss from cached features of the other micro-batches, so
    each micro-batch's re-run with gradients must draw the patches its cached pass drew."""
    images, ids = random_batch(8, 32)
    model = _model(0.5, use_fast=True)
    module = FeatureModel(model)
    seen = []
    module.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().clone()))
    step = TrainStep(model, module, ClipLoss(), torch.optim.SGD(model.parameters(), lr=0.0))
    step.compute_gradients([(images[:4], ids[:4]), (images[4:], ids[4:])])
    cached, fresh = seen[:2], seen[2:]
    assert len(fresh) == 2 and all(torch.allclose(c, f, atol=1e-6) for c, f in zip(cached, fresh))
    torch.manual_seed(12345)
    again = model.visual(images[:4])  # a new draw gives other features: the replay is what matched them
    assert not torch.allclose(F.normalize(again.float(), dim=-1), cached[0], atol=1e-3)


def test_refused_for_resnet_and_bad_values(model_json):
    rn = create_model(micro_config("resnet"), seed=0)
    with pytest.raises(ValueError, match="ViT"):
        set_patch_dropout(rn, 0.5)
    with pytest.raises(ValueError, match="patch_dropout"):
        TrainConfig(patch_dropout=1.0)


def test_resumed_run_with_patch_dropout_is_exact(tmp_path, model_json):
    base = dict(model=model_json, data="builtin:scenes?n=48&size=32", steps=8, batch_size=8, lr=2e-3, warmup=2,
                num_workers=0, save_every=0, log_every=1, deterministic=True, progress=False, threads=1,
                patch_dropout=0.5, accum_steps=2)
    ref = tmp_path / "ref"
    train(TrainConfig(**base, out=str(ref)))
    out = tmp_path / "run"
    assert train(TrainConfig(**base, out=str(out)), should_stop=lambda s: s == 3)["steps_done"] == 3
    train(TrainConfig.for_resume(out, progress=False))
    a, b = (load_checkpoint(list_checkpoints(r)[-1][1])["model"] for r in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, out)]
    assert losses[0] == losses[1]
    assert json.loads((ref / "config.json").read_text())["patch_dropout"] == 0.5
    plain = tmp_path / "plain"
    train(TrainConfig(**{**base, "patch_dropout": 0.0}, out=str(plain)))
    c = load_checkpoint(list_checkpoints(plain)[-1][1])["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the option acts
