"""ONNX export: ONNX Runtime outputs match torch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import clipforge
from clipforge.checkpoints import save_model
from clipforge.cli.main import main as cli_main
from clipforge.export import export_onnx
from clipforge.inference import optimize_for_inference

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_onnx_towers_match_torch(tmp_path, kind, optimized, micro_vit, micro_rn):
    model = micro_vit if kind == "vit" else micro_rn
    if optimized:  # packed oneDNN weights / fused convs are not traced: the export records standard ops
        model = optimize_for_inference(copy.deepcopy(model))
    paths = export_onnx(model, tmp_path)
    assert not any(m.training for m in model.modules())  # export leaves the model in eval mode
    s = model.image_size
    x = torch.randn(5, 3, s, s)  # a batch size other than the one traced
    ids = clipforge.tokenize(["a dog", "a much longer caption with many words in it", "", "x", "two cats"])
    with torch.inference_mode():
        ref_i, ref_t = model.encode_image(x).numpy(), model.encode_text(ids).numpy()
    got_i = ort.InferenceSession(str(paths["image"])).run(None, {"pixel_values": x.numpy()})[0]
    sess = ort.InferenceSession(str(paths["text"]))
    got_t = sess.run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(got_i - ref_i).max() < 1e-4
    assert np.abs(got_t - ref_t).max() < 1e-4
    # ids trimmed after the longest row's end-of-text token give the same features (causal tower)
    n = int(ids.argmax(-1).max()) + 1
    got_trim = sess.run(None, {"input_ids": ids[:, :n].numpy()})[0]
    assert np.abs(got_trim - ref_t).max() < 1e-4


def test_export_cli_check(tmp_path, micro_vit, capsys):
    src = save_model(micro_vit, tmp_path / "m.safetensors")
    assert cli_main(["export", str(src), str(tmp_path / "onnx"), "--check"]) == 0
    assert "ONNX Runtime vs torch" in capsys.readouterr().out
