"""A checkpoint's config is checked like a user's: an impossible value is one error naming the key
and the file, through ``clipforge.load`` and the CLI (``info``, ``embed``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.checkpoints import openai as openai_format
from clipforge.checkpoints import save_model
from clipforge.checkpoints.files import native_state_dict, write_safetensors
from clipforge.cli.main import main as cli_main
from clipforge.config import CLIPConfig, ConfigError

from conftest import micro_config

# (where in the config dict, bad value, what the error must say)
BAD = [
    (("vision", "image_size"), -64, "vision.image_size must be an integer >= 1, got -64"),
    (("vision", "image_size"), "224", "vision.image_size must be an integer >= 1, got '224'"),
    (("vision", "width"), 0, "vision.width must be an integer >= 1, got 0"),
    (("vision", "layers"), 0, "vision.layers must be an integer >= 1, got 0"),
    (("vision", "heads"), 3, "vision.width 64 is not divisible by vision.heads 3"),
    (("vision", "heads"), -2, "vision.heads must be an integer >= 1, got -2"),
    (("vision", "patch_size"), 7, "vision.image_size 32 is not a multiple of patch_size 7"),
    (("vision", "patch_size"), 0, "vision.patch_size must be an integer >= 1, got 0"),
    (("vision", "mlp_ratio"), -1.0, "vision.mlp_ratio must be a finite number > 0, got -1.0"),
    (("vision", "kind"), "swin", "vision.kind must be one of vit, resnet, siglip, got 'swin'"),
    (("text", "context_length"), 0, "text.context_length must be an integer >= 2, got 0"),
    (("text", "width"), -8, "text.width must be an integer >= 1, got -8"),
    (("text", "heads"), 5, "text.width 64 is not divisible by text.heads 5"),
    (("text", "layers"), 0, "text.layers must be an integer >= 1, got 0"),
    (("text", "vocab_size"), 1000, "text.vocab_size 1000 is smaller than the openai-bpe tokenizer's 49408 ids"),
    (("text", "mlp_ratio"), float("nan"), "text.mlp_ratio must be a finite number > 0, got nan"),
    (("preprocess", "mean"), [0.5, 0.5], "preprocess.mean must be 3 numbers"),
    (("preprocess", "std"), [0.3, 0.0, 0.3], "preprocess.std[1] must be a finite number > 0, got 0.0"),
    (("preprocess", "interpolation"), "lanczos", "preprocess.interpolation must be one of bicubic, bilinear"),
    (("tokenizer", "context_length"), -1, "tokenizer.context_length must be an integer >= 2, got -1"),
    (("activation",), "relu", "activation must be one of quick_gelu, gelu, got 'relu'"),
    (("embed_dim",), 0, "embed_dim must be an integer >= 1, got 0"),
    (("norm_eps",), 0.0, "norm_eps must be a finite number > 0, got 0.0"),
    (("max_logit_scale",), 0.5, "max_logit_scale must be a finite number >= 1, got 0.5"),
    (("objective",), "mse", "objective must be one of contrastive, bow, caption, got 'mse'"),
    (("vision",), 5, "vision must be a mapping of VisionConfig fields, got 5"),
    (("text", "colour"), "red", "unknown text config keys: ['colour']"),
]
IDS = [".".join(where) + f"={value!r}" for where, value, _ in BAD]


def _bad_config(where: tuple[str, ...], value) -> dict:
    d = copy.deepcopy(micro_config("vit").to_dict())
    node = d
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return d


def _embedded(tmp_path: Path, cfg: dict) -> Path:
    """Our single-file format with ``cfg`` as the embedded config (as a tampered file would hold)."""
    model = clipforge.create_model(micro_config("vit"), seed=0)
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, native_state_dict(model), {"format": "clipforge", "clipforge_config": json.dumps(cfg)})
    return path


def test_every_zoo_config_and_the_micro_configs_are_valid():
    for name in clipforge.available_models():
        cfg = clipforge.get_model_config(name)
        assert CLIPConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for kind in ("vit", "resnet"):
        assert CLIPConfig.from_dict(micro_config(kind).to_dict()) == micro_config(kind)


def test_validation_keeps_values_as_written():
    d = micro_config("vit").to_dict()
    d["vision"]["mlp_ratio"] = 4  # an int stays an int: the config's JSON (and any hash of it) is unchanged
    assert CLIPConfig.from_dict(d).to_dict() == d


@pytest.mark.parametrize("where,value,message", BAD, ids=IDS)
def test_bad_embedded_config_is_refused_naming_key_and_file(tmp_path, where, value, message):
    path = _embedded(tmp_path, _bad_config(where, value))
    with pytest.raises(ConfigError) as e:
        clipforge.load(path)
    msg = str(e.value)
    assert message in msg and str(path) in msg and "embedded config" in msg and "\n" not in msg, msg


def test_resnet_stage_depths_are_checked(tmp_path):
    d = micro_config("resnet").to_dict()
    d["vision"]["layers"] = [1, 0, 1, 1]
    with pytest.raises(ConfigError, match=r"vision.layers\[1\] must be an integer >= 1, got 0"):
        CLIPConfig.from_dict(d)
    d["vision"]["layers"] = [1, 1, 1, 1]
    d["vision"]["image_size"] = 48
    d["preprocess"]["image_size"] = 48
    with pytest.raises(ConfigError, match="vision.image_size of a resnet tower must be a multiple of 32"):
        CLIPConfig.from_dict(d)


def test_bad_side_config_json_names_that_file(tmp_path):
    model = clipforge.create_model(micro_config("vit"), seed=0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(native_state_dict(model), folder / "model.pt")  # no embedded config: config.json beside it
    (folder / "config.json").write_text(json.dumps(_bad_config(("vision", "image_size"), -64)))
    with pytest.raises(ConfigError) as e:
        clipforge.load_model(folder)
    assert str(folder / "config.json") in str(e.value) and "vision.image_size" in str(e.value)


def test_bad_openclip_head_width_is_one_line(tmp_path):
    m = clipforge.create_model("tiny-vit", seed=0)
    out = clipforge.convert(save_model(m, tmp_path / "m.safetensors"), tmp_path / "oc", "openclip")
    cfg_path = out / "open_clip_config.json"
    d = json.loads(cfg_path.read_text())
    d["model_cfg"]["vision_cfg"]["head_width"] = 0
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="vision_cfg.head_width must be an integer >= 1, got 0"):
        clipforge.load_model(out)


def test_cli_info_and_embed_exit_1_with_one_line(tmp_path, capsys):
    path = _embedded(tmp_path, _bad_config(("vision", "image_size"), -64))
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog\n")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), "red").save(images / "a.png")
    for argv in (["info", str(path)], ["info", str(path), "--json"],
                 ["embed", "--images", str(images), "--model", str(path), "--out", str(tmp_path / "e1")],
                 ["embed", "--texts", str(texts), "--model", str(path), "--out", str(tmp_path / "e2")]):
        assert cli_main(argv) == 1, argv
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1, out.err
        assert "vision.image_size must be an integer >= 1, got -64" in out.err and str(path) in out.err
    assert not (tmp_path / "e1" / "manifest.json").exists()


def test_openai_layout_with_impossible_shapes_names_the_shapes(tmp_path):
    m = clipforge.create_model(micro_config("vit"), seed=0)
    sd = openai_format.from_native(native_state_dict(m))
    sd["visual.conv1.weight"] = sd["visual.conv1.weight"][:, :, :7, :7].contiguous()  # patch 7: 32 not a multiple
    sd["visual.positional_embedding"] = sd["visual.positional_embedding"][:17]  # grid 4 -> image 28, keep the rest
    torch.save(sd, tmp_path / "odd.pt")
    clipforge.load_model(tmp_path / "odd.pt")  # 28 = 4 x 7: a consistent (if strange) architecture loads
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"] = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][:0]
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match="architecture read from the tensor shapes.*vision.mlp_ratio"):
        clipforge.load_model(tmp_path / "odd.pt")


def test_config_json_file_errors_name_the_file(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(_bad_config(("text", "layers"), 0)))
    with pytest.raises(ConfigError, match=r"arch.json: text.layers must be an integer >= 1, got 0"):
        CLIPConfig.from_json(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match=r"arch.json: invalid JSON at line 1"):
        CLIPConfig.from_json(path)
