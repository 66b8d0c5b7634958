"""Partial locking (image groups, text layers, LayerNorm and BatchNorm options) and layer-wise
learning-rate decay: frozen parameters are bit-for-bit unchanged by training, the others move,
and each optimiser group's learning rate is the decayed one."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_config

from clipforge.models import create_model
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint
from clipforge.training.lock import group_of, layer_decay_scales, lock_image, lock_text
from clipforge.training.optim import CosineWarmup, build_optimizer
from clipforge.training.recipes import lr_scales


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_groups_follow_open_clips_order():
    model = create_model(micro_config("vit"), seed=0)  # 2 blocks per tower: 4 groups
    assert group_of(model, "visual", "conv1.weight") == (0, 4)
    assert group_of(model, "visual", "transformer.resblocks.0.mlp.c_fc.weight") == (1, 4)
    assert group_of(model, "visual", "transformer.resblocks.1.ln_1.weight") == (2, 4)
    assert group_of(model, "visual", "ln_post.bias") == (2, 4)
    assert group_of(model, "visual", "proj") == (3, 4)
    assert group_of(model, "text", "token_embedding.weight") == (0, 4)
    assert group_of(model, "text", "ln_final.weight") == (2, 4)
    assert group_of(model, "text", "text_projection") == (3, 4)
    rn = create_model(micro_config("resnet"), seed=0)
    assert group_of(rn, "visual", "bn2.weight") == (0, 6)
    assert group_of(rn, "visual", "layer3.0.conv1.weight") == (3, 6)
    assert group_of(rn, "visual", "attnpool.c_proj.weight") == (5, 6)


def test_lock_text_layers_and_layer_norm():
    model = create_model(micro_config("vit"), seed=0)
    lock_text(model, unlocked_layers=1)
    text = {n for n in _trainable(model) if n.startswith("text.")}
    # the projection trains, and the LayerNorms of the locked part (open_clip's default)
    assert text == {"text.text_projection", "text.ln_final.weight", "text.ln_final.bias"} | {
        f"text.transformer.resblocks.{i}.{ln}.{w}" for i in (0, 1) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")}
    model = create_model(micro_config("vit"), seed=0)
    lock_text(model, unlocked_layers=2, freeze_layer_norm=True)
    text = {n for n in _trainable(model) if n.startswith("text.")}
    assert text == {"text.text_projection", "text.ln_final.weight", "text.ln_final.bias"} | {
        n for n, _ in model.named_parameters() if n.startswith("text.transformer.resblocks.1.")}
    with pytest.raises(ValueError, match="4 layer groups"):
        lock_text(create_model(micro_config("vit"), seed=0), unlocked_layers=5)


def test_lock_image_groups_and_batch_norm_stats():
    model = create_model(micro_config("vit"), seed=0)
    lock_image(model, unlocked_groups=2)
    visual = {n for n in _trainable(model) if n.startswith("visual.")}
    assert visual == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"} | {
        n for n, _ in model.named_parameters() if n.startswith("visual.transformer.resblocks.1.")}
    assert model.visual.training or not model.training
    rn = create_model(micro_config("resnet"), seed=0).train()
    lock_image(rn, unlocked_groups=1, freeze_bn_stats=True)
    rn.train()  # the loop calls train() after evaluations: BatchNorm must stay in eval mode
    bns = [m for m in rn.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and rn.visual.layer4.training
    before = [m.running_mean.clone() for m in bns]
    rn.encode_image(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_layer_decay_learning_rates():
    model = create_model(micro_config("vit"), seed=0)
    scales = layer_decay_scales(model, image=0.5, text=0.8)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6, scales)
    CosineWarmup(optimizer, 1e-3, 0, 100)(0)  # step 0 after no warm-up: the peak rate
    params = dict(model.named_parameters())
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    expected = {"visual.conv1.weight": 1e-3 * 0.5 ** 3, "visual.class_embedding": 1e-3 * 0.5 ** 3,
                "visual.transformer.resblocks.0.attn.in_proj_weight": 1e-3 * 0.5 ** 2,
                "visual.transformer.resblocks.1.attn.in_proj_weight": 1e-3 * 0.5,
                "visual.ln_post.weight": 1e-3 * 0.5, "visual.proj": 1e-3,
                "text.token_embedding.weight": 1e-3 * 0.8 ** 3, "text.text_projection": 1e-3, "logit_scale": 1e-3}
    for name, lr in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr, rel=1e-12), name
    # weight decay grouping is kept under the split by scale
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert wd_of[id(params["visual.proj"])] == 0.1 and wd_of[id(params["visual.ln_post.weight"])] == 0.0
    assert lr_scales(model, TrainConfig()) is None  # off: the two plain groups, as before


def test_locked_parameters_do_not_move_in_training(tmp_path, model_json):
    cfg = TrainConfig(model=model_json, data="builtin:scenes?n=16&size=32", steps=3, batch_size=8, lr=5e-3,
                      warmup=0, num_workers=0, save_every=0, progress=False, threads=1, out=str(tmp_path / "run"),
                      lock_image=True, lock_image_unlocked_groups=1, lock_text=True, lock_text_unlocked_layers=1,
                      lock_text_freeze_layer_norm=True, layer_decay_image=0.5, patch_dropout=0.5)
    start = create_model(micro_config("vit"), seed=0).state_dict()
    train(cfg)
    end = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])["model"]
    moving = {"visual.proj", "text.text_projection", "logit_scale"}
    for name, value in end.items():
        if name in moving:
            assert not torch.equal(value, start[name]), name
        else:
            assert torch.equal(value, start[name]), name
    saved = TrainConfig.for_resume(tmp_path / "run")
    assert saved.lock_text_unlocked_layers == 1 and saved.layer_decay_image == 0.5


def test_config_refuses_options_without_their_lock():
    with pytest.raises(ValueError, match="lock_text_unlocked_layers.*lock_text"):
        TrainConfig(lock_text_unlocked_layers=2)
    with pytest.raises(ValueError, match="lock_image_freeze_bn_stats"):
        TrainConfig(lock_image_freeze_bn_stats=True)
    with pytest.raises(ValueError, match="layer_decay_text"):
        TrainConfig(layer_decay_text=0.0)
    with pytest.raises(ValueError, match="eval mode"):
        TrainConfig(lock_image=True, patch_dropout=0.5)
