"""Learning-rate schedules (cosine | const | const-cooldown) and the preprocessing overrides."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import micro_config

from clipforge.models import create_model
from clipforge.training import TrainConfig, train
from clipforge.training.optim import CosineWarmup, build_optimizer
from clipforge.training.schedule import Schedule, const_cooldown_lr, make_schedule


def test_const_and_cooldown_values():
    # warm-up 2, 10 steps, cooldown over the last 4 from 1.0 to 0.1, linear then quadratic
    assert [const_cooldown_lr(s, 1.0, 2, 10, 4) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert const_cooldown_lr(8, 1.0, 2, 10, 4, power=2.0, end_lr=0.1) == pytest.approx(0.5 ** 2 * 0.9 + 0.1)
    model = create_model(micro_config("vit"), seed=0)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    const = Schedule(opt, 1e-3, 3, 100, "const")
    assert [const(s) for s in (0, 2, 3, 99)] == pytest.approx([1e-3 / 3, 1e-3, 1e-3, 1e-3])
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups)
    cfg = TrainConfig(lr=1e-3, warmup=0, steps=10, lr_scheduler="const-cooldown", lr_cooldown_steps=5,
                      lr_cooldown_end=1e-4)
    sched = make_schedule(opt, cfg)
    assert sched(4) == pytest.approx(1e-3) and sched(9) == pytest.approx(1e-4 + 0.2 * 9e-4)
    assert type(make_schedule(opt, TrainConfig())) is CosineWarmup  # the default: checkpoints unchanged


def test_bad_schedule_options():
    with pytest.raises(ValueError, match="lr_cooldown_steps"):
        TrainConfig(lr_scheduler="const-cooldown")
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="step")
    with pytest.raises(ValueError, match="lr_cooldown_end"):
        TrainConfig(lr=1e-3, lr_cooldown_end=1e-2)


def test_run_logs_the_schedule_and_records_preprocess_overrides(tmp_path, model_json):
    out = tmp_path / "run"
    train(TrainConfig(model=model_json, data="builtin:scenes?n=16&size=32", steps=6, batch_size=8, lr=1e-3, warmup=1,
                      num_workers=0, save_every=0, log_every=1, progress=False, threads=1, out=str(out),
                      lr_scheduler="const-cooldown", lr_cooldown_steps=2, image_mean=(0.5, 0.5, 0.5),
                      image_std=(0.25, 0.25, 0.25), image_resize_mode="squash"))
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 5e-4])
    pre = json.loads((out / "model_config.json").read_text())["preprocess"]
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.25, 0.25, 0.25] and pre["resize_mode"] == "squash"
    from clipforge.checkpoints import load_model

    assert load_model(out / "final.safetensors").config.preprocess.std == (0.25, 0.25, 0.25)
    saved = json.loads((out / "config.json").read_text())
    assert saved["image_mean"] == [0.5, 0.5, 0.5] and TrainConfig.for_resume(out).image_mean == (0.5, 0.5, 0.5)
