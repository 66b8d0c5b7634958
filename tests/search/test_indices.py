"""Several indexes behind one server: chosen per request (``index``, clip-retrieval's
``indice_name``), listed by /indices-list, each answering as it would alone; the CLI's
``--index NAME=PATH`` and ``indices_paths.json``."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from fastapi.testclient import TestClient
from search.searchutil import make_image_folder, micro_model

from clipforge.cli.search import index_spec
from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index
from clipforge.search.service import create_app
from clipforge.search.sources import ImageFolderSource, TextFileSource

CAPTIONS = ["a dog on a beach", "a cat on a mat", "red car in the rain", "blue sky over hills", "a bowl of fruit"]


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    model = micro_model()
    make_image_folder(d / "photos")
    make_image_folder(d / "more", n_good=5)
    for name in ("photos", "more"):
        embed_collection(model, ImageFolderSource(d / name), d / f"emb_{name}", shard_size=50, progress=False,
                         rank=0, world_size=1)
        build_index(d / f"emb_{name}", d / f"idx_{name}", n_queries=3, progress=False)
    (d / "caps.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    embed_collection(model, TextFileSource(d / "caps.txt"), d / "emb_caps", progress=False, rank=0, world_size=1)
    build_index(d / "emb_caps", d / "idx_caps", n_queries=2, progress=False)
    app = create_app({"photos": d / "idx_photos", "captions": d / "idx_caps", "more": d / "idx_more"}, model,
                     max_k=20)
    return d, model, TestClient(app, raise_server_exceptions=False)


def test_each_index_answers_as_it_would_alone(three):
    d, model, c = three
    assert c.get("/indices-list").json() == ["photos", "captions", "more"]
    alone = {n: TestClient(create_app(d / f"idx_{p}", model, max_k=20))
             for n, p in (("photos", "photos"), ("captions", "caps"), ("more", "more"))}
    for name, single in alone.items():
        want = single.post("/search", json={"text": "a dog", "k": 5}).json()["results"]
        got = c.post("/search", json={"text": "a dog", "k": 5, "index": name}).json()
        assert [x["id"] for x in got["results"]] == [x["id"] for x in want] and got["query"]["index"] == name
        assert [x["key"] for x in got["results"]] == [x["key"] for x in want]
    default = c.post("/search", json={"text": "a dog", "k": 5}).json()
    assert default["query"]["index"] == "photos"
    caps = c.post("/search", json={"text": "a dog on a beach", "k": 1, "index": "captions"}).json()["results"]
    assert caps[0]["caption"] == "a dog on a beach" and caps[0]["image_url"] is None
    more = c.post("/search", json={"item_id": 1, "k": 2, "index": "more"}).json()["results"]
    assert all(x["image_url"] == f"/items/{x['id']}/image?index=more" for x in more)
    assert c.get(more[0]["image_url"]).status_code == 200
    assert c.get("/items/0", params={"index": "captions"}).json()["caption"] == CAPTIONS[0]
    assert c.get("/items/0/image", params={"index": "captions"}).status_code == 404
    h = c.get("/health").json()
    assert [(x["name"], x["items"], x["kind"]) for x in h["indices"]] == [("photos", 14, "image"),
                                                                         ("captions", 5, "text"), ("more", 5, "image")]


def test_unknown_index_and_clip_retrieval_names(three):
    _, _, c = three
    r = c.post("/search", json={"text": "a dog", "index": "nope"})
    assert r.status_code == 404 and "unknown index 'nope'" in r.json()["detail"]
    assert c.get("/items/0", params={"index": "nope"}).status_code == 404
    knn = c.post("/knn-service", json={"text": "a cat", "modality": "text", "num_images": 2,
                                       "indice_name": "captions"})
    assert knn.status_code == 200 and knn.json()[0]["caption"] == "a cat on a mat"
    r = c.post("/knn-service", json={"text": "a cat", "modality": "image", "num_images": 2, "indice_name": "captions"})
    assert r.status_code == 404 and "holds text embeddings" in r.json()["detail"]
    r = c.post("/knn-service", json={"text": "a cat", "modality": "image", "num_images": 2, "indice_name": "more"})
    assert r.status_code == 200 and len(r.json()) == 2
    meta = c.post("/metadata", json={"ids": [2], "indice_name": "captions"}).json()
    assert meta[0]["id"] == 2 and meta[0]["metadata"]["caption"] == CAPTIONS[2]
    assert c.post("/metadata", json={"ids": [0], "indice_name": "nope"}).status_code == 404


def test_cli_index_specs(three, tmp_path, capsys):
    from clipforge.cli.main import main

    d, _, _ = three
    assert index_spec(str(d / "idx_photos")) == [(None, str(d / "idx_photos"))]
    assert index_spec(f"p={d / 'idx_photos'}") == [("p", str(d / "idx_photos"))]
    shutil.copytree(d / "idx_caps", tmp_path / "caps")
    f = tmp_path / "indices_paths.json"
    f.write_text(json.dumps({"captions": "caps", "photos": str(d / "idx_photos")}))
    assert index_spec(str(f)) == [("captions", str(tmp_path / "caps")), ("photos", str(d / "idx_photos"))]
    f.write_text(json.dumps({"x": "missing"}))
    with pytest.raises(argparse.ArgumentTypeError, match="'x'.*not a directory"):
        index_spec(str(f))
    base = ["serve", "--model", "tiny-vit", "--random-init", "--port", "0"]
    for extra, needle in (([f"--index={d / 'idx_photos'}", f"--index={d / 'idx_caps'}"], "name each one"),
                          ([f"--index=a={d / 'idx_photos'}", f"--index=a={d / 'idx_caps'}"], "given twice")):
        rc = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0], err
