"""Inputs that parse but are wrong once opened: one line naming the problem, exit code 1 (the
cases of issue 13 item 6), missing optional packages naming the extra, and typed config files."""

from __future__ import annotations

import sys

import pytest
import yaml
from PIL import Image

from clipforge.cli.main import build_parser, main

PARSER = build_parser()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 24), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i}.png")
    return folder


def test_embed_empty_image_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["embed", "--model", "tiny-vit", "--random-init", "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out"), "--no-progress"], parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1
    assert "--images" in line and "no images" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_embed_manifest_without_captions_embeds_the_images(tmp_path, capsys):
    _images(tmp_path / "imgs")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("image,label\nimgs/0.png,cat\nimgs/1.png,dog\nimgs/2.png,cat\nimgs/0.png,cat\n")
    code = main(["embed", "--model", "tiny-vit", "--random-init", "--device", "cpu", "--manifest", str(manifest),
                 "--out", str(tmp_path / "out"), "--no-progress", "--json"], parser=PARSER)
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    summary = json.loads(out)
    assert summary["total"] == 3 and summary["embedded"] == 3  # the repeated row counts once


@pytest.mark.parametrize("argv", [
    ["embed", "--images", "{imgs}", "--out", "{out}"],
    ["eval", "zeroshot", "--dataset", "builtin:scenes-colour", "--out", "{out}"],
    ["data", "score", "--data", "builtin:scenes?n=4", "--out", "{out}"],
])
def test_text_file_as_checkpoint_says_so(tmp_path, capsys, argv):
    text = tmp_path / "text.pt"
    text.write_text("101 is not a model\n")
    _images(tmp_path / "imgs")
    argv = [a.format(imgs=tmp_path / "imgs", out=tmp_path / "out") for a in argv]
    code = main([*argv, "--model", str(text), "--no-progress", "--device", "cpu"], parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1
    assert "text.pt is not a checkpoint" in line, line


def test_architecture_name_without_random_init_is_refused(tmp_path, capsys):
    _images(tmp_path / "imgs")
    code = main(["embed", "--model", "ViT-B/32", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")],
                parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1 and "architecture name" in line and "--random-init" in line


def test_missing_extra_names_it(tmp_path, capsys, monkeypatch):
    """`clipforge index` without faiss: one line naming clipforge[search], not a traceback."""
    emb = tmp_path / "emb"
    emb.mkdir()
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "clipforge.search.index", raising=False)
    code = main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx")], parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1
    assert "clipforge[search]" in line and "faiss" in line


def test_other_import_errors_are_not_hidden(monkeypatch):
    """Only optional packages map to an extra: a missing module of clipforge itself still raises."""
    from clipforge.cli.options import missing_extra

    assert missing_extra(ModuleNotFoundError("x", name="faiss")) is not None
    assert missing_extra(ModuleNotFoundError("x", name="onnxruntime")).endswith("clipforge[onnx]'")
    assert missing_extra(ModuleNotFoundError("x", name="clipforge.nothing")) is None


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    from clipforge.training import TrainConfig

    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 5e-4\nsteps: '3'\nbetas: [0.9, '0.95']\ngrad_clip: 1\nprogress: 'false'\n")
    assert yaml.safe_load(cfg.read_text())["lr"] == "5e-4"  # what PyYAML gives: a string
    c = TrainConfig.from_file(cfg)
    assert (c.lr, c.steps, c.betas, c.grad_clip, c.progress) == (5e-4, 3, (0.9, 0.95), 1.0, False)
    assert isinstance(c.lr, float) and isinstance(c.steps, int) and isinstance(c.grad_clip, float)


@pytest.mark.parametrize("line,key", [("lr: fast", "lr"), ("steps: 2.5", "steps"), ("betas: [0.9]", "betas"),
                                      ("deterministic: maybe", "deterministic")])
def test_bad_config_value_names_the_key(tmp_path, capsys, line, key):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(line + "\n")
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], parser=PARSER)
    msg = _one_error_line(capsys)
    assert code == 1
    assert str(cfg) in msg and f"{key}:" in msg, msg
    assert not (tmp_path / "run").exists()


def test_eval_suite_values_are_converted(tmp_path):
    from clipforge.eval.suite import load_suite

    suite = tmp_path / "suite.yaml"
    suite.write_text("defaults: {batch_size: '16'}\ntasks:\n"
                     "  - {task: fewshot, dataset: x.npz, shots: '1,2', seeds: '2', C: 1e-2}\n"
                     "  - {task: retrieval, dataset: y, ks: [1, '5']}\n")
    s = load_suite(suite)
    assert s["defaults"] == {"batch_size": 16}
    assert s["tasks"][0]["shots"] == [1, 2] and s["tasks"][0]["seeds"] == 2 and s["tasks"][0]["C"] == 0.01
    assert s["tasks"][1]["ks"] == [1, 5]
    suite.write_text("tasks:\n  - {task: retrieval, dataset: y, ks: [one]}\n")
    with pytest.raises(ValueError, match=r"tasks\[0\] \(retrieval\): ks: expected a list of int"):
        load_suite(suite)


def test_train_model_checkpoint_path_means_init(tmp_path, micro_vit):
    from clipforge.checkpoints import save_model
    from clipforge.cli.train import config_from_args

    ckpt = tmp_path / "m.safetensors"
    save_model(micro_vit, ckpt)
    cfg = config_from_args(PARSER.parse_args(["train", "--model", str(ckpt), "--out", str(tmp_path / "r")]))
    assert cfg.init == str(ckpt) and cfg.model == "tiny-vit"  # the architecture comes with the weights
    cfg = config_from_args(PARSER.parse_args(["train", "--model", "ViT-B/32", "--pretrained", str(ckpt)]))
    assert cfg.model == "ViT-B/32" and cfg.init == str(ckpt)


def test_precision_note_for_the_changed_meaning(tmp_path, capsys):
    from clipforge.cli.train import config_from_args

    cfg = config_from_args(PARSER.parse_args(["train", "--precision", "bf16"]))
    assert cfg.precision == "bf16"
    assert "amp_bf16" in capsys.readouterr().err
    assert config_from_args(PARSER.parse_args(["train", "--precision", "amp_bf16"])).precision == "amp_bf16"
    assert "amp_bf16" not in capsys.readouterr().err


@pytest.mark.parametrize("to", ["clipforge", "openclip", "hf"])
def test_convert_onto_an_existing_file_is_one_line(tmp_path, capsys, micro_vit, to):
    from clipforge.checkpoints import save_model

    save_model(micro_vit, tmp_path / "m.safetensors")
    (tmp_path / "taken").write_text("x")
    code = main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "taken"), "--to", to], parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1 and "taken" in line
    assert (tmp_path / "taken").read_text() == "x"


def test_extras_named_exist_in_pyproject():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from clipforge.cli.options import EXTRAS

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert extra in extras, f"{module} -> clipforge[{extra}]: no such extra"
    packages = " ".join(extras["search"])
    assert "faiss-cpu" in packages and "fastapi" in packages and "pydantic>=2" in packages
    assert any(d.startswith("torch>=") for d in pyproject["project"]["dependencies"])
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["clipforge"]
    assert (Path(__file__).resolve().parents[2] / "src" / "clipforge" / "py.typed").is_file()


def test_unknown_shift_is_refused_while_parsing(tmp_path, capsys, monkeypatch):
    import clipforge.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "load_model_arg", lambda *a: pytest.fail("model loaded before --shifts was checked"))
    (tmp_path / "m.safetensors").write_bytes(b"")
    for argv in (["eval", "robustness", "--model", "tiny-vit", "--random-init", "--dataset", "builtin:scenes-colour",
                  "--shifts", "grayscale,bogus"],
                 ["finetune", "--model", str(tmp_path / "m.safetensors"), "--dataset", "builtin:scenes-colour",
                  "--steps", "2", "--shifts", "bogus",
                  "--out", str(tmp_path / "ft")]):
        assert main(argv, parser=PARSER) == 2
        err = capsys.readouterr().err
        assert "argument --shifts: unknown shift 'bogus'" in err and "grayscale" in err and "Traceback" not in err
    assert PARSER.parse_args(["eval", "robustness", "--model", "m", "--dataset", "d", "--shifts", "blur:2,noise"]).shifts \
        == "blur:2,noise"


def test_long_text_overlap_error_names_the_option(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a dog\na cat\n", encoding="utf-8")
    code = main(["embed", "--model", "tiny-vit", "--random-init", "--texts", str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "out"), "--long-text", "chunks", "--long-text-overlap", "99",
                 "--no-progress"], parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1
    assert "--long-text-overlap 99" in line and "0..37" in line


def test_retrieval_on_an_image_folder_says_what_it_needs(tmp_path, capsys):
    folder = _images(tmp_path / "photos")
    code = main(["eval", "retrieval", "--model", "tiny-vit", "--random-init", "--dataset", str(folder),
                 "--out", str(tmp_path / "res"), "--no-progress"], parser=PARSER)
    line = _one_error_line(capsys)
    assert code == 1
    assert "folder of images without captions" in line and str(folder) in line
    assert ".csv/.tsv/.jsonl" in line and ".tar shards" in line and "no .tar shards in directory" not in line
