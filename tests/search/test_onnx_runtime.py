"""``--runtime onnx``: the exported towers in ONNX Runtime give the torch features (cosine), and
the service runs on them unchanged."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient
from search.searchutil import jpeg_bytes, make_image_folder, micro_model, pattern_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from clipforge.inference import embed_images, embed_texts
from clipforge.preprocess import load_image
from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index
from clipforge.search.onnx_runtime import onnx_model
from clipforge.search.service import create_app
from clipforge.search.sources import ImageFolderSource


def test_onnx_runtime_matches_torch_and_serves(tmp_path):
    model = micro_model()
    make_image_folder(tmp_path / "photos")
    embed_collection(model, ImageFolderSource(tmp_path / "photos"), tmp_path / "emb", shard_size=50,
                     progress=False, rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx", n_queries=3, progress=False)
    ort_model = onnx_model(model, tmp_path / "onnx")
    texts = ["a dog", "two red circles on a long striped blue background", ""]
    images = [jpeg_bytes(pattern_image(i, (40 + 8 * i, 36))) for i in range(3)]
    want_t = embed_texts(model, texts).numpy()
    want_i = embed_images(model, [load_image(x) for x in images]).numpy()
    got_t = embed_texts(ort_model, texts).numpy()
    got_i = embed_images(ort_model, [load_image(x) for x in images]).numpy()
    assert (got_t * want_t).sum(1).min() > 0.9999 and (got_i * want_i).sum(1).min() > 0.9999
    app = create_app(tmp_path / "idx", ort_model)
    c = TestClient(app)
    assert c.get("/health").json()["model_matches_index"] is True  # the checkpoint's weights, recognised
    out = c.post("/embed", json={"texts": texts[:2], "images": [base64.b64encode(x).decode() for x in images]}).json()
    np.testing.assert_allclose(out["texts"], want_t[:2], atol=1e-4)
    np.testing.assert_allclose(out["images"], want_i, atol=1e-4)
    key = c.get("/items/3").json()["key"]
    r = c.post("/search", files={"image": (key, (tmp_path / "photos" / key).read_bytes(), "image/jpeg")}).json()
    assert r["results"][0]["id"] == 3
    rank = c.post("/rank", json={"query": {"text": "a dog"}, "texts": ["a dog", "a cat"]}).json()
    assert rank["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)


def test_serve_onnx_options_are_checked(tmp_path, capsys):
    from clipforge.cli.main import main

    model = micro_model()
    (tmp_path / "t.txt").write_text("a dog\na cat\n", encoding="utf-8")
    from clipforge.search.sources import TextFileSource

    embed_collection(model, TextFileSource(tmp_path / "t.txt"), tmp_path / "emb", progress=False, rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx", n_queries=1, progress=False)
    for extra, needle in ((["--runtime", "onnx", "--precision", "bf16"], "--precision fp32"),
                          (["--onnx-dir", str(tmp_path / "o")], "--runtime onnx")):
        rc = main(["serve", "--index", str(tmp_path / "idx"), "--model", "tiny-vit", "--random-init", "--port", "0",
                   *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0], err
