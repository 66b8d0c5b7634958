"""NaN/inf and integer-typed weights load (as before) but never silently: one warning naming how
many tensors and the first names, and ``clipforge info`` shows them (``--json`` fields, a text line)."""

from __future__ import annotations

import json
import logging

import torch

import clipforge
from clipforge.checkpoints import read_checkpoint, save_model
from clipforge.checkpoints.files import native_state_dict, write_safetensors
from clipforge.cli.main import main as cli_main

from conftest import micro_config


def _write(tmp_path, model, edit) -> str:
    sd = {k: v.clone() for k, v in native_state_dict(model).items()}  # the model's own tensors stay clean
    edit(sd)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, sd, {"format": "clipforge", "clipforge_config": model.config.to_json(indent=None)})
    return str(path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("clipforge")]


def test_nonfinite_weights_warn_once_with_count_and_names(tmp_path, caplog, micro_vit):
    def edit(sd):
        sd["visual.proj"][0, 0] = float("nan")
        sd["text.text_projection"][1, 2] = float("inf")
        sd["logit_scale"] = torch.tensor(float("-inf"))
        sd["visual.ln_post.bias"][3] = float("nan")

    path = _write(tmp_path, micro_vit, edit)
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        model, _ = clipforge.load(path)
    (msg,) = _warnings(caplog)
    assert path in msg and "4 tensors hold NaN or inf values" in msg and "..." in msg
    assert msg.count(",") >= 2 and "integer" not in msg
    assert torch.isnan(model.visual.proj[0, 0])  # loaded as stored: the warning is the signal
    _, info = read_checkpoint(path)
    assert sorted(info.nonfinite) == sorted(["visual.proj", "text.text_projection", "logit_scale",
                                             "visual.ln_post.bias"])
    assert info.integer == ()


def test_integer_weights_warn_and_are_cast(tmp_path, caplog, micro_vit):
    def edit(sd):
        sd["visual.class_embedding"] = sd["visual.class_embedding"].round().to(torch.int32)

    path = _write(tmp_path, micro_vit, edit)
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        model = clipforge.load_model(path)
    (msg,) = _warnings(caplog)
    assert "1 weight tensor has an integer dtype (visual.class_embedding; cast to float" in msg
    assert model.visual.class_embedding.dtype == torch.float32


def test_clean_checkpoints_do_not_warn(tmp_path, caplog, micro_vit, micro_rn):
    # BatchNorm's step counter is an integer by design: not a suspect weight.
    for m, name in ((micro_vit, "v.safetensors"), (micro_rn, "r.safetensors")):
        with caplog.at_level(logging.WARNING, logger="clipforge"):
            _, info = read_checkpoint(save_model(m, tmp_path / name))
        assert info.nonfinite == () and info.integer == ()
    assert any(k.endswith("num_batches_tracked") for k in native_state_dict(micro_rn))
    assert _warnings(caplog) == []


def test_info_shows_suspect_weights(tmp_path, capsys, caplog, micro_vit):
    def edit(sd):
        sd["visual.proj"][0, 0] = float("nan")
        sd["text.token_embedding.weight"] = sd["text.token_embedding.weight"].to(torch.int64)

    path = _write(tmp_path, micro_vit, edit)
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        assert cli_main(["info", path, "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["nonfinite_tensors"] == ["visual.proj"] and rec["integer_tensors"] == ["text.token_embedding.weight"]
    assert len(_warnings(caplog)) == 1  # the warning is logged too (stderr outside pytest)
    assert cli_main(["info", path]) == 0
    text = capsys.readouterr().out
    (line,) = [ln for ln in text.splitlines() if ln.startswith("WARNING")]
    assert "1 tensor holds NaN or inf values (visual.proj)" in line and "1 weight tensor has an integer dtype" in line
    clean = str(save_model(micro_vit, tmp_path / "clean.safetensors"))
    assert cli_main(["info", clean, "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["nonfinite_tensors"] == [] and rec["integer_tensors"] == []
    assert cli_main(["info", clean]) == 0
    assert "WARNING" not in capsys.readouterr().out
