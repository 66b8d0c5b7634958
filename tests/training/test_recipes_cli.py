"""The recipe flags of ``clipforge train`` reach TrainConfig (open_clip's names), and bad values
are one-line errors."""

from __future__ import annotations

import argparse
import json

from clipforge.cli.main import main
from clipforge.cli.train import add_train_arguments, config_from_args


def _config(argv: list[str]):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_flags_set_the_fields():
    cfg = _config(["--force-patch-dropout", "0.5", "--lock-image", "--lock-image-unlocked-groups", "2",
                   "--lock-text", "--lock-text-unlocked-layers", "1", "--lock-text-freeze-layer-norm",
                   "--layer-decay-image", "0.7", "--layer-decay-text", "0.9"])
    assert (cfg.patch_dropout, cfg.lock_image_unlocked_groups, cfg.lock_text_unlocked_layers) == (0.5, 2, 1)
    assert cfg.lock_text and cfg.lock_text_freeze_layer_norm and (cfg.layer_decay_image, cfg.layer_decay_text) == (0.7, 0.9)
    assert _config(["--patch-dropout", "0.25"]).patch_dropout == 0.25
    cfg = _config(["--imagenet-val", "builtin:scenes-counting", "--zeroshot-frequency", "5", "--zeroshot-n", "50",
                   "--zeroshot-classnames", "cifar10", "--zeroshot-templates", "photo"])
    assert (cfg.zeroshot_data, cfg.zeroshot_frequency, cfg.zeroshot_n) == ("builtin:scenes-counting", 5, 50)
    assert (cfg.zeroshot_classnames, cfg.zeroshot_templates) == ("cifar10", "photo")
    cfg = _config(["--lora-rank", "8", "--lora-alpha", "4", "--lora-targets", "attn,c_fc", "--lora-towers", "text"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_towers) == (8, 4.0, ["attn", "c_fc"], ["text"])
    cfg = _config(["--distill-model", "t.safetensors", "--distill-weight", "0.5", "--distill-precision", "bf16"])
    assert (cfg.distill_model, cfg.distill_weight, cfg.distill_precision) == ("t.safetensors", 0.5, "bf16")
    cfg = _config(["--lr-scheduler", "const-cooldown", "--lr-cooldown-steps", "5", "--lr-cooldown-end", "1e-5",
                   "--lr-cooldown-power", "2", "--image-mean", "0.5,0.5,0.5", "--image-std", "0.2", "0.2", "0.2",
                   "--image-interpolation", "bilinear", "--image-resize-mode", "squash"])
    assert (cfg.lr_scheduler, cfg.lr_cooldown_steps, cfg.lr_cooldown_end, cfg.lr_cooldown_power) == (
        "const-cooldown", 5, 1e-5, 2.0)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.2, 0.2, 0.2)
    assert (cfg.image_interpolation, cfg.image_resize_mode) == ("bilinear", "squash")
    assert _config(["--report-to", "tensorboard"]).tensorboard is True
    cfg = _config(["--aug-cfg", "scale=(0.5,1)", "color_jitter=0.4", "re_prob=0.25"])
    assert cfg.aug_cfg == {"scale": [0.5, 1.0], "color_jitter": [0.4, 0.4, 0.4, 0.0], "re_prob": 0.25}


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--force-patch-dropout", "1.5", "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    assert "patch_dropout" in capsys.readouterr().err
    assert main(["train", "--lock-text-unlocked-layers", "1", "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    assert "lock_text" in capsys.readouterr().err
    assert main(["train", "--layer-decay-image", "2", "--out", str(tmp_path / "r")]) != 0
    assert "--layer-decay-image: must be in (0, 1]" in capsys.readouterr().err
    assert main(["train", "--aug-cfg", "scale=(0.5,3)", "--out", str(tmp_path / "r")]) == 1
    assert "aug_cfg: scale" in capsys.readouterr().err
    assert main(["train", "--report-to", "neptune", "--out", str(tmp_path / "r")]) != 0
    assert "expected tensorboard, wandb or both" in capsys.readouterr().err


def test_cli_run_records_the_recipe(tmp_path, capsys, model_json):
    out = tmp_path / "run"
    code = main(["train", "--model", model_json, "--data", "builtin:scenes?n=16&size=32", "--steps", "2",
                 "--batch-size", "8", "--workers", "0", "--out", str(out), "--no-progress",
                 "--force-patch-dropout", "0.5", "--lock-text", "--lock-text-unlocked-layers", "1",
                 "--aug-cfg", "gray_scale_prob=0.5", "scale=(0.4,1)"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["patch_dropout"] == 0.5 and saved["lock_text"] and saved["lock_text_unlocked_layers"] == 1
    assert saved["aug_cfg"] == {"scale": [0.4, 1.0], "gray_scale_prob": 0.5}
