"""The learned logit bias (SigLIP): config, forward, and every checkpoint format that can or cannot hold it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import clipforge
from clipforge.checkpoints import convert, load_model, save_model, save_hf, save_openai
from clipforge.checkpoints import openclip as openclip_format
from clipforge.cli.info import describe
from clipforge.config import CLIPConfig
from clipforge.models import create_model

from conftest import micro_config


def _biased(bias: float = -10.0) -> CLIPConfig:
    return dataclasses.replace(micro_config("vit"), init_logit_bias=bias)


def test_config_without_bias_is_unchanged_and_with_bias_round_trips():
    plain = micro_config("vit")
    assert "init_logit_bias" not in plain.to_dict()  # existing configs, files and hashes unchanged
    cfg = _biased(-10.0)
    assert cfg.to_dict()["init_logit_bias"] == -10.0
    assert CLIPConfig.from_json(cfg.to_json()) == cfg


def test_forward_adds_the_bias_and_counts_it():
    plain = create_model(micro_config("vit"), seed=0).eval()
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()
    model = create_model(_biased(-3.5), seed=0).eval()
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.item() == -3.5
    x, ids = torch.randn(2, 3, 32, 32), clipforge.tokenize(["a cat", "a dog", "a bird"])
    with torch.no_grad():
        lp, lt = plain(x, ids)
        bp, bt = model(x, ids)
    assert torch.allclose(bp, lp - 3.5, atol=1e-5) and torch.equal(bt, bp.t())  # same seed, same towers
    assert model.num_parameters()["total"] == plain.num_parameters()["total"] + 1


@pytest.mark.parametrize("target", ["m.safetensors", "folder"])
def test_native_round_trip_keeps_the_learned_bias(tmp_path, target):
    model = create_model(_biased(), seed=0)
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)  # a learned value, not the init
    loaded = clipforge.load(save_model(model, tmp_path / target), fast=False)[0]
    assert loaded.config == model.config and float(loaded.logit_bias) == -7.25


def test_openclip_folder_writes_and_reads_logit_bias(tmp_path):
    model = create_model(_biased(), seed=0)
    with torch.no_grad():
        model.logit_bias.fill_(-6.5)
    out = convert(save_model(model, tmp_path / "m.safetensors"), tmp_path / "oc", to="openclip")
    oc = json.loads((out / openclip_format.CONFIG_NAME).read_text())
    assert oc["model_cfg"]["init_logit_bias"] == -10.0  # open_clip's CLIP(init_logit_bias=...) makes the key
    from safetensors.torch import load_file

    assert float(load_file(out / openclip_format.WEIGHTS_NAME)["logit_bias"]) == -6.5  # open_clip's key name
    back, info = load_model(out, return_info=True)
    assert info.format == "openclip" and back.config.init_logit_bias == -10.0 and float(back.logit_bias) == -6.5


def test_bare_openclip_state_dict_with_bias_is_read(tmp_path):
    """An OpenAI-layout state dict (open_clip's ``pretrained=FILE``) carrying ``logit_bias``."""
    model = create_model(_biased(), seed=0)
    from clipforge.checkpoints import openai as openai_format

    sd = openai_format.from_native(model.state_dict())
    torch.save(sd, tmp_path / "oc.pt")
    back = load_model(tmp_path / "oc.pt", activation="quick_gelu", config=None)
    assert float(back.logit_bias) == -10.0


@pytest.mark.parametrize("writer", ["hf", "openai"])
def test_formats_without_a_bias_refuse_it_in_one_line(tmp_path, writer):
    model = create_model(_biased(), seed=0)
    with pytest.raises(ValueError, match="logit_bias") as e:
        (save_hf if writer == "hf" else save_openai)(model, tmp_path / ("hf" if writer == "hf" else "m.pt"))
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_info_reports_bias(tmp_path):
    model = create_model(_biased(), seed=0)
    rec = describe(save_model(model, tmp_path / "m.safetensors"))
    assert rec["logit_bias"] == -10.0 and rec["loss"] == "siglip"
    rec = describe(save_model(create_model(micro_config("vit"), seed=0), tmp_path / "p.safetensors"))
    assert rec["logit_bias"] is None and rec["loss"] == "clip"
