"""Our checkpoint format, OpenCLIP layouts, strict loading errors, conversions and the CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.checkpoints import CheckpointError, convert, load_model, save_model, save_openai
from clipforge.checkpoints import openai as openai_format
from clipforge.cli.main import main as cli_main

from conftest import micro_config


def _same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size)
    ids = clipforge.tokenize(["a cat", "two dogs on grass"])
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
        assert torch.equal(a.encode_text(ids), b.encode_text(ids))


@pytest.mark.parametrize("target", ["model.safetensors", "folder"])
def test_native_round_trip_is_exact_and_self_describing(tmp_path, micro_vit, target):
    path = save_model(micro_vit, tmp_path / target)
    model, pre = clipforge.load(path, fast=False)  # the plain model: bit-exact outputs
    assert model.config == micro_vit.config  # activation, preprocessing, tokenizer all travel along
    assert pre.config == micro_vit.config.preprocess
    _same_outputs(micro_vit, model, 32)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write leaves no temporaries


def test_load_returns_the_fast_model_by_default(tmp_path, micro_vit):
    """``clipforge.load`` applies the fast layer (inference calls packed, 1e-4 of the plain model);
    the Parameters and state_dict are the plain model's."""
    from clipforge import fast

    path = save_model(micro_vit, tmp_path / "m.safetensors")
    model, _ = clipforge.load(path)
    assert fast.is_enabled(model) and not fast.is_enabled(micro_vit)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = clipforge.tokenize(["a cat", "two dogs on grass", "a red cube left of a ball"])
    with torch.no_grad():
        assert (model.encode_image(x) - micro_vit.encode_image(x)).abs().max() <= 1e-4
        assert (model.encode_text(ids) - micro_vit.encode_text(ids)).abs().max() <= 1e-4
    packing = [m for m in model.modules() if isinstance(m, fast.transformer.Packing)]
    assert packing and all(m.pack_weights for m in packing)
    if fast.linear_backend() == "onednn":
        assert all(m.packed for m in packing)  # made by the inference calls above
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), micro_vit.state_dict().values()))


def test_gelu_activation_survives_round_trip(tmp_path):
    m = clipforge.create_model(micro_config("vit", activation="gelu"), seed=1).eval()
    model = load_model(save_model(m, tmp_path / "m.safetensors"))
    assert model.config.activation == "gelu"
    _same_outputs(m, model, 32)


def test_training_checkpoint_wrapper_with_config(tmp_path, micro_rn):
    torch.save({"model": micro_rn.state_dict(), "config": micro_rn.config.to_dict(), "step": 3}, tmp_path / "ck.pt")
    _same_outputs(micro_rn, load_model(tmp_path / "ck.pt"), 64)


def test_openclip_state_dict_with_wrapper_prefix_and_config(tmp_path):
    m = clipforge.create_model(micro_config("vit", activation="gelu"), seed=2).eval()
    sd = {f"module.{k}": v for k, v in openai_format.from_native(m.state_dict()).items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": sd}, tmp_path / "epoch_3.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 32, "quick_gelu": False,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                           "resize_mode": "shortest"}}))
    model, info = load_model(tmp_path / "epoch_3.pt", return_info=True)
    assert info.format == "openclip" and info.extras["epoch"] == 3
    assert model.config.activation == "gelu"  # from the OpenCLIP config, not guessed
    assert model.config.preprocess.mean == (0.5, 0.5, 0.5)
    _same_outputs(m, model, 32)


def test_openclip_safetensors_and_unsupported_option(tmp_path, micro_vit):
    save_file(openai_format.from_native(micro_vit.state_dict()), str(tmp_path / "open_clip_model.safetensors"))
    cfg = {"model_cfg": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"image_size": 32, "head_width": 32},
                         "text_cfg": {"heads": 2}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    _same_outputs(micro_vit, load_model(tmp_path), 32)
    # pool_type "last" is an open_clip family option now (clipforge.families); layer scale is not
    cfg["model_cfg"]["text_cfg"]["ls_init_value"] = 0.1
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ls_init_value"):
        load_model(tmp_path)


def test_bare_state_dict_warns_about_activation(tmp_path, micro_vit, caplog):
    torch.save(openai_format.from_native(micro_vit.state_dict()), tmp_path / "bare.pt")
    with caplog.at_level(logging.WARNING):
        m = load_model(tmp_path / "bare.pt")
    assert m.config.activation == "quick_gelu" and "activation" in caplog.text
    assert load_model(tmp_path / "bare.pt", activation="gelu").config.activation == "gelu"


def test_missing_unexpected_and_shape_errors_are_listed(tmp_path, micro_vit):
    sd = openai_format.from_native(micro_vit.state_dict())
    sd.pop("ln_final.weight")
    sd["visual.extra_thing"] = torch.zeros(2)
    sd["text_projection"] = torch.zeros(64, 32)  # right shape: inference still works
    sd["logit_scale"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises((CheckpointError, ValueError)) as e:
        load_model(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "ln_final.weight" in msg or "missing" in msg


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, micro_vit):
    cfg = micro_vit.config
    path = save_model(micro_vit, tmp_path / "m.safetensors")
    other = micro_config("vit")
    other.embed_dim = 16
    with pytest.raises(CheckpointError, match=r"text\.text_projection: checkpoint \(64, 32\) vs model \(64, 16\)"):
        load_model(path, config=other)
    assert cfg.embed_dim == 32


def test_strict_loader_lists_missing_and_unexpected(micro_vit):
    from clipforge.checkpoints import load_state_dict_strict

    sd = dict(micro_vit.state_dict())
    sd.pop("text.ln_final.bias")
    sd["bogus.weight"] = torch.zeros(1)
    model = clipforge.create_model(micro_vit.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, sd)
    assert "missing keys (1): text.ln_final.bias" in str(e.value)
    assert "unexpected keys (1): bogus.weight" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing partially loaded


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        clipforge.load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        clipforge.load("ViT-B/32")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        clipforge.load(tmp_path / "junk.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        clipforge.load(tmp_path / "other.pt")


@pytest.mark.parametrize("fmt", ["clipforge", "openai", "hf"])
def test_round_trips_between_all_formats(tmp_path, micro_vit, fmt):
    src = save_model(micro_vit, tmp_path / "src.safetensors")
    dst = {"clipforge": tmp_path / "a.safetensors", "openai": tmp_path / "oa" / "m.pt", "hf": tmp_path / "hf"}[fmt]
    convert(src, dst, fmt)
    back = tmp_path / "back.safetensors"
    convert(dst, back, "clipforge")
    m = load_model(back)
    assert m.config.activation == micro_vit.config.activation
    assert all(torch.equal(a, b) for a, b in zip(micro_vit.state_dict().values(), m.state_dict().values()))


def test_resnet_round_trip_openai_keeps_gelu_through_the_sidecar(tmp_path):
    # GELU, not the QuickGELU a bare OpenAI state dict falls back to: without the sidecar this fails.
    rn = clipforge.create_model(micro_config("resnet", activation="gelu"), seed=0).eval()
    save_openai(rn, tmp_path / "rn.pt")
    assert (tmp_path / "clipforge_config.json").is_file()
    m = load_model(tmp_path / "rn.pt")  # clipforge_config.json beside it records the activation
    assert m.config.activation == "gelu"
    _same_outputs(rn, m, 64)
    (tmp_path / "clipforge_config.json").unlink()
    assert load_model(tmp_path / "rn.pt").config.activation == "quick_gelu"  # the sidecar did the work


def test_cli_convert_and_models(tmp_path, micro_vit, capsys):
    src = save_model(micro_vit, tmp_path / "src.safetensors")
    assert cli_main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    assert cli_main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert abs(rows["RN50"]["params_total_M"] - 102.0) < 0.1
    assert abs(rows["ViT-B/32"]["params_total_M"] - 151.3) < 0.1
    assert abs(rows["ViT-L/14"]["params_total_M"] - 427.6) < 0.1


def test_every_format_module_has_the_same_interface():
    from clipforge.checkpoints import FORMATS

    assert set(FORMATS) == {"clipforge", "openai", "openclip", "hf", "openclip-family", "hf-siglip", "hf-siglip2"}
    for name, module in FORMATS.items():
        assert module.NAME == name
        for fn in ("detect", "read_config", "to_native", "from_native", "write"):
            assert callable(getattr(module, fn)), f"{name}.{fn}"


def test_openclip_folder_is_open_clips_local_dir_layout_and_reads_back(tmp_path):
    m = clipforge.create_model(micro_config("vit", activation="gelu"), seed=3).eval()
    out = convert(save_model(m, tmp_path / "src.safetensors"), tmp_path / "oc", "openclip")
    # What open_clip 3.x factory.py reads for "local-dir:": open_clip_config.json with model_cfg (and
    # preprocess_cfg, as its hub configs have), weights under a name _find_checkpoint_in_dir prefers.
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    oc = json.loads((out / "open_clip_config.json").read_text())
    assert oc["model_cfg"]["quick_gelu"] is False and oc["model_cfg"]["embed_dim"] == 32
    assert oc["model_cfg"]["vision_cfg"]["head_width"] == 32 and oc["model_cfg"]["text_cfg"]["heads"] == 2
    assert set(oc["preprocess_cfg"]) == {"mean", "std", "interpolation", "resize_mode"}
    back, info = load_model(out, return_info=True)
    assert info.format == "openclip" and info.assumed == ()
    assert back.config.activation == "gelu" and back.config.vision == m.config.vision
    _same_outputs(m, back, 32)


@pytest.mark.parametrize("name", ["w.pt", "w.bin", "w.safetensors"])
def test_openclip_single_file_targets_describe_themselves(tmp_path, name):
    m = clipforge.create_model(micro_config("vit", activation="gelu"), seed=4).eval()
    out = convert(save_model(m, tmp_path / "src.safetensors"), tmp_path / "o" / name, "openclip")
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # no sidecar open_clip could mis-pair
    if out.suffix != ".safetensors":  # open_clip's load_state_dict takes the "state_dict" entry
        assert set(torch.load(out, weights_only=True)) == {"state_dict", "config"}
    back = load_model(out)
    assert back.config.activation == "gelu"
    _same_outputs(m, back, 32)


def test_openai_writer_refuses_a_folder_and_openclip_a_wrong_eps(tmp_path, micro_vit):
    with pytest.raises(ValueError, match="single file"):
        save_openai(micro_vit, tmp_path / "dir")
    cfg = micro_config("vit")
    cfg.norm_eps = 1e-6
    with pytest.raises(ValueError, match="norm_eps"):
        convert(save_model(clipforge.create_model(cfg), tmp_path / "e.safetensors"), tmp_path / "oc", "openclip")
    assert not (tmp_path / "oc").exists()  # refused before anything was written


def test_bare_state_dict_reports_the_assumed_activation(tmp_path, micro_vit):
    torch.save(openai_format.from_native(micro_vit.state_dict()), tmp_path / "bare.pt")
    _, info = load_model(tmp_path / "bare.pt", return_info=True)
    assert info.format == "openai" and info.assumed == ("activation", "heads")
    _, info = load_model(tmp_path / "bare.pt", activation="quick_gelu", return_info=True)
    assert info.assumed == ("heads",)
