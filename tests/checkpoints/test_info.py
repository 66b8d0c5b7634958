"""``clipforge info``: format, architecture, parameters, preprocessing, tokenizer, training summary."""

from __future__ import annotations

import json

import torch

import clipforge
from clipforge.checkpoints import openai as openai_format
from clipforge.checkpoints import save_model
from clipforge.cli.main import main as cli_main

from conftest import micro_config


def _info(capsys, *args):
    code = cli_main(["info", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_of_our_checkpoint_text_and_json(tmp_path, capsys, micro_vit):
    path = save_model(micro_vit, tmp_path / "m.safetensors")
    code, out, _ = _info(capsys, path)
    assert code == 0
    assert "format        clipforge" in out and "architecture  micro-vit" in out
    assert "activation    quick_gelu\n" in out and "context length 77" in out
    code, out, _ = _info(capsys, path, "--json")
    rec = json.loads(out)
    n = micro_vit.num_parameters()
    assert rec["parameters"] == {"total": n["total"], "image": n["image"], "text": n["text"]}
    assert rec["embed_dim"] == 32 and rec["preprocess"]["image_size"] == 32
    assert rec["activation_recorded"] is True and rec["assumed"] == [] and rec["training"] is None
    assert abs(rec["logit_scale_exp"] - float(micro_vit.logit_scale.detach().exp())) < 1e-3


def test_info_names_zoo_architecture_and_assumed_activation(tmp_path, capsys):
    m = clipforge.create_model("tiny-vit", seed=0)
    torch.save(openai_format.from_native(m.state_dict()), tmp_path / "bare.pt")
    code, out, _ = _info(capsys, tmp_path / "bare.pt", "--json")
    rec = json.loads(out)
    # A bare OpenAI-layout dict cannot say it is GELU: QuickGELU is assumed, so no zoo name matches.
    assert rec["format"] == "openai" and rec["activation"] == "quick_gelu"
    assert rec["activation_recorded"] is False and rec["architecture"] == "custom"
    assert rec["assumed"] == ["activation", "heads"]
    clipforge.convert(save_model(m, tmp_path / "m.safetensors"), tmp_path / "oc", "openclip")
    rec = json.loads(_info(capsys, tmp_path / "oc", "--json")[1])
    assert rec["format"] == "openclip" and rec["architecture"] == "tiny-vit" and rec["activation"] == "gelu"
    assert "not recorded: assumed" in _info(capsys, tmp_path / "bare.pt")[1]


def test_info_training_summary_from_checkpoint_and_run_folder(tmp_path, capsys, micro_vit):
    ck = tmp_path / "run" / "checkpoints" / "step_0000040.pt"
    ck.parent.mkdir(parents=True)
    torch.save({"model": micro_vit.state_dict(), "config": micro_vit.config.to_dict(), "step": 40,
                "train_config": {"model": "micro-vit", "data": "scenes", "steps": 100, "lr": 5e-4},
                "metrics": [{"step": 20, "loss": 2.5}, {"step": 40, "loss": 1.25}, {"step": 40, "eval/acc": 0.5}]}, ck)
    rec = json.loads(_info(capsys, ck, "--json")[1])
    assert rec["training"] == {"step": 40, "model": "micro-vit", "data": "scenes", "steps": 100, "lr": 5e-4,
                               "last_logged": {"step": 40, "loss": 1.25}}
    save_model(micro_vit, tmp_path / "run" / "final.safetensors")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"status": "completed", "steps_done": 100,
                                                               "final_loss": 0.75, "curves": "x.png"}))
    rec = json.loads(_info(capsys, tmp_path / "run" / "final.safetensors", "--json")[1])
    assert rec["training"]["status"] == "completed" and rec["training"]["final_loss"] == 0.75
    assert "curves" not in rec["training"]
    assert "training" in _info(capsys, tmp_path / "run" / "final.safetensors")[1]


def test_info_errors_are_one_line(tmp_path, capsys):
    code, _, err = _info(capsys, tmp_path / "missing.pt")
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pt")
    code, _, err = _info(capsys, tmp_path / "other.pt")
    assert code == 1 and "unrecognised checkpoint layout" in err


def test_info_resnet(tmp_path, capsys):
    m = clipforge.create_model(micro_config("resnet"), seed=0)
    rec = json.loads(_info(capsys, save_model(m, tmp_path / "rn.safetensors"), "--json")[1])
    assert rec["vision"]["kind"] == "resnet" and rec["parameters"]["total"] == m.num_parameters()["total"]
    assert "ResNet stages [1, 1, 1, 1]" in _info(capsys, tmp_path / "rn.safetensors")[1]
