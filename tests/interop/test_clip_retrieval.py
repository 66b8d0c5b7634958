"""clip-retrieval interop (issue 11), against the real package's code:

- a folder written by clip-retrieval's own writer (``clip_inference/writer.py``'s ``OutputSink``) is
  indexed and searched by clipforge (no manifest.json of ours) and read by curation;
- a folder written by ``clipforge embed`` is read by ``embedding_reader`` (what clip-retrieval's
  ``clip_index`` / autofaiss use to assign ids) and clip_back's ``ParquetMetadataProvider``, and the
  ids agree with clipforge's index;
- ``clipforge serve`` answers clip-retrieval's ``ClipClient`` (``/knn-service``) and the front
  end's ``/indices-list`` and ``/metadata``, with clip_back's dedup semantics.

Package modules are loaded from their files: ``import clip_retrieval`` runs its ``__init__``,
which imports the Flask back end and its dependencies (not needed for the parts used here).
Install: ``pip install --no-deps clip-retrieval==2.45.0 embedding-reader`` (+ pandas, requests).
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("requests")
pytest.importorskip("faiss")
pytest.importorskip("fastapi")
if importlib.util.find_spec("clip_retrieval") is None:
    pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval==2.45.0)",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (searchutil, conftest helpers)

from search.searchutil import LiveServer, jpeg_bytes, micro_model, pattern_image

from clipforge.embeddings import Collection
from clipforge.inference import embed_images, embed_texts
from clipforge.preprocess import load_image
from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index, load_index
from clipforge.search.searcher import Searcher
from clipforge.search.clip_back_api import near_duplicates
from clipforge.search.service import create_app
from clipforge.search.sources import ImageFolderSource

CR_DIR = Path(importlib.util.find_spec("clip_retrieval").submodule_search_locations[0])


def cr_module(rel: str) -> ModuleType:
    """A module of the installed clip_retrieval package, executed from its file."""
    spec = importlib.util.spec_from_file_location(f"_cr_{rel.replace('/', '_')}", CR_DIR / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def clip_back_parts(*names: str) -> dict:
    """Classes of clip_back.py compiled from the installed source (the module itself imports flask,
    prometheus and all_clip at the top, which are not needed here); "Dedup" holds KnnService's
    dedup methods (the class itself derives from flask_restful's Resource)."""
    import faiss
    import pandas as pd

    tree = ast.parse((CR_DIR / "clip_back.py").read_text(encoding="utf-8"))
    ns: dict = {"pd": pd, "np": np, "Path": Path, "faiss": faiss, "defaultdict": defaultdict}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in names and node.name != "KnnService":
            exec(compile(ast.Module([node], []), str(CR_DIR / "clip_back.py"), "exec"), ns)
            out[node.name] = ns[node.name]
        if isinstance(node, ast.ClassDef) and node.name == "KnnService":
            methods = [m for m in node.body if isinstance(m, ast.FunctionDef)
                       and m.name in ("connected_components", "get_non_uniques", "connected_components_dedup")]
            cls = ast.ClassDef("Dedup", [], [], methods, [])
            exec(compile(ast.fix_missing_locations(ast.Module([cls], [])), "clip_back.py", "exec"), ns)
            out["Dedup"] = ns["Dedup"]
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("cr")
    root = d / "photos"
    root.mkdir()
    paths = []
    for i in range(14):
        p = root / f"img_{i:02d}.jpg"
        p.write_bytes(jpeg_bytes(pattern_image(i, (48, 40))))
        paths.append(p)
    # two exact duplicates of image 3: clip_back's dedup must fold them
    for j in (1, 2):
        p = root / f"img_03_copy{j}.jpg"
        p.write_bytes((root / "img_03.jpg").read_bytes())
        paths.append(p)
    return d, sorted(paths)


def test_clip_retrieval_writer_folder_is_indexed_and_searched(photos):
    d, paths = photos
    model = micro_model()
    images = [load_image(p) for p in paths]
    captions = [f"photo number {i}" for i in range(len(paths))]
    img = embed_images(model, images).numpy().astype(np.float16)
    txt = embed_texts(model, captions).numpy().astype(np.float16)
    writer = cr_module("clip_inference/writer.py")
    out = d / "cr_emb"
    for part, sl in enumerate((slice(0, 9), slice(9, None))):  # two partitions, as two workers write
        w = writer.NumpyWriter(partition_id=part, output_folder=str(out), enable_text=True, enable_image=True,
                               enable_metadata=False, output_partition_count=2)
        w({"image_embs": img[sl], "image_filename": [str(p) for p in paths[sl]], "text": captions[sl],
           "text_embs": txt[sl]})
        w.flush()
    assert (out / "img_emb" / "img_emb_0.npy").is_file() and (out / "metadata" / "metadata_1.parquet").is_file()
    assert not (out / "manifest.json").exists()

    coll = Collection.open(out)
    assert coll.kind == "image" and coll.dim == model.config.embed_dim and coll.foreign
    r = build_index(out, d / "cr_idx", n_queries=5, progress=False)
    assert r.ntotal == len(paths) and any("clip-retrieval folder" in n for n in r.notes)
    assert any("text_emb" in n and "--kind" in n for n in r.notes)
    idx = load_index(d / "cr_idx")
    assert [idx.row(i)["image_path"] for i in range(len(paths))] == [str(p) for p in paths]
    assert idx.row(4)["key"] == str(paths[4]) and idx.row(4)["caption"] == captions[4]
    searcher = Searcher(idx, model)
    assert searcher.model_matches is None  # no model recorded by clip-retrieval: nothing to check against
    hits = searcher.search_text("photo number 5", 5)
    all_scores = img.astype(np.float32) @ embed_texts(model, ["photo number 5"]).numpy()[0]
    assert_topk([h.id for h in hits], [h.score for h in hits], all_scores, 5)
    # the text embeddings of the same folder, chosen with kind="text"
    from clipforge.cli.main import main

    assert main(["index", "--embeddings", str(out), "--out", str(d / "cr_tidx"), "--kind", "text",
                 "--queries", "5", "--no-progress"]) == 0
    tidx = load_index(d / "cr_tidx")
    assert tidx.ntotal == len(paths) and tidx.info["kind"] == "text" and tidx.info["embeddings_format"] == "clip-retrieval"
    assert tidx.row(3)["caption"] == captions[3]
    # curation reads the same folder through the same store
    from clipforge.curation import read_embeddings

    keys, vecs = read_embeddings(out)
    assert keys == [str(p) for p in paths]
    np.testing.assert_array_equal(vecs, img.astype(np.float32))


def test_clipforge_folder_is_read_by_clip_retrieval(photos):
    from embedding_reader import EmbeddingReader

    d, paths = photos
    model = micro_model()
    out = d / "cf_emb"
    embed_collection(model, ImageFolderSource(d / "photos"), out, shard_size=5, progress=False, rank=0, world_size=1)
    build_index(out, d / "cf_idx", n_queries=5, progress=False)
    idx = load_index(d / "cf_idx")
    # embedding_reader (clip_index -> autofaiss) numbers the rows of img_emb/*.npy in its own order
    reader = EmbeddingReader(str(out / "img_emb"), file_format="npy")
    assert reader.count == idx.ntotal and reader.dimension == model.config.embed_dim
    theirs = np.concatenate([emb for emb, _ in reader(batch_size=1000, show_progress=False)])
    ours = np.stack([idx.vector(i) for i in range(idx.ntotal)])
    np.testing.assert_array_equal(theirs.astype(np.float32), ours)
    # embeddings paired with metadata by clip-retrieval's reader: same image for the same row
    paired = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["image_path", "caption"])
    rows = []
    for emb, meta in paired(batch_size=1000, show_progress=False):
        rows.extend(zip(emb, meta["image_path"]))
    assert [p for _, p in rows] == [idx.row(i)["image_path"] for i in range(idx.ntotal)]
    # clip_back's metadata provider over our metadata/ folder: id -> the same image as our index
    provider = clip_back_parts("ParquetMetadataProvider")["ParquetMetadataProvider"](str(out / "metadata"))
    got = provider.get(list(range(idx.ntotal)), ["url", "image_path", "caption", "NSFW"])
    assert [g["image_path"] for g in got] == [idx.row(i)["image_path"] for i in range(idx.ntotal)]


@pytest.fixture(scope="module")
def server(photos):
    d, paths = photos
    model = micro_model()
    emb = d / "srv_emb"
    embed_collection(model, ImageFolderSource(d / "photos"), emb, shard_size=6, progress=False, rank=0, world_size=1)
    build_index(emb, d / "srv_idx", n_queries=5, progress=False)
    srv = LiveServer(create_app(d / "srv_idx", model, max_k=50, index_name="photos",
                                cors_origins=("http://front.example",)))
    yield srv, model, load_index(d / "srv_idx")
    srv.close()


def assert_topk(ids: list[int], scores, all_scores: np.ndarray, k: int) -> None:
    """``ids`` are a correct top-k of ``all_scores`` (ties, e.g. duplicate images, in any order)."""
    assert len(ids) == k == len(set(ids))
    np.testing.assert_allclose(scores, all_scores[ids], atol=1e-5)
    kth = np.sort(all_scores)[::-1][k - 1]
    assert set(np.flatnonzero(all_scores > kth + 1e-5)) <= set(ids) and all(all_scores[ids] >= kth - 1e-5)


def brute(idx, q: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    vecs = np.stack([idx.vector(i) for i in range(idx.ntotal)])
    s = vecs @ q
    order = np.argsort(-s, kind="stable")[:k]
    return order.tolist(), s[order]


def test_clip_client_against_clipforge_serve(server, photos):
    import requests

    srv, model, idx = server
    d, paths = photos
    cc = cr_module("clip_client.py")
    assert requests.get(f"{srv.url}/indices-list", timeout=10).json() == ["photos"]

    client = cc.ClipClient(url=f"{srv.url}/knn-service", indice_name="photos", num_images=6, deduplicate=False,
                           modality=cc.Modality.IMAGE)
    vecs = np.stack([idx.vector(i) for i in range(idx.ntotal)])
    res = client.query(text="a photo of stripes")
    q = embed_texts(model, ["a photo of stripes"]).numpy()[0]
    assert_topk([r["id"] for r in res], [r["similarity"] for r in res], vecs @ q, 6)
    for r in res:
        assert set(r) == {"image_path", "caption", "image", "id", "similarity"}
        assert r["image_path"] == idx.row(r["id"])["key"]  # relative: the server's paths are not shown
        assert base64.b64decode(r["image"])[:2] == b"\xff\xd8"  # a JPEG, as clip_back sends

    res = client.query(image=str(paths[9]))  # a local file: ClipClient sends it base64
    q = embed_images(model, [load_image(paths[9])]).numpy()[0]
    assert_topk([r["id"] for r in res], [r["similarity"] for r in res], vecs @ q, 6)
    assert res[0]["image_path"] == paths[9].relative_to(d / "photos").as_posix() and res[0]["similarity"] == pytest.approx(1.0, abs=2e-3)

    res = client.query(embedding_input=q.tolist())
    assert_topk([r["id"] for r in res], [r["similarity"] for r in res], vecs @ q, 6)

    # ClipClient's defaults: deduplicate=True (and safety flags, accepted with no model behind them)
    dedup = cc.ClipClient(url=f"{srv.url}/knn-service", indice_name="photos", num_images=6)
    copies = {i for i in range(idx.ntotal) if "img_03" in idx.row(i)["image_path"]}
    assert len(copies) == 3
    res = dedup.query(image=str(paths[[p.name for p in paths].index("img_03.jpg")]))
    got = [r["id"] for r in res]
    assert len(copies & set(got)) == 1 and len(got) == len(set(got))
    # the same dedup as clip_back's own code on the same result embeddings
    raw = requests.post(f"{srv.url}/knn-service", timeout=30, json={
        "image": base64.b64encode((d / "photos" / "img_03.jpg").read_bytes()).decode(), "modality": "image",
        "num_images": 6, "indice_name": "photos", "deduplicate": False})
    raw_ids = [r["id"] for r in raw.json()]
    emb = np.stack([idx.vector(i) for i in raw_ids]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    theirs = set(clip_back_parts("Dedup")["Dedup"]().connected_components_dedup(emb))
    assert near_duplicates(emb) == theirs
    assert got == [i for j, i in enumerate(raw_ids) if j not in theirs]


def test_front_end_calls(server):
    """clip-front sends JSON without a JSON content type, asks num_result_ids >> num_images, then
    fetches the rest with /metadata (request shapes from its bundle, front/build/main.*.js)."""
    import json

    import requests

    srv, model, idx = server
    body = {"text": "stripes", "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 3, "indice_name": "photos", "num_result_ids": 10, "use_mclip": False,
            "deduplicate": False, "use_safety_model": False, "use_violence_detector": False,
            "aesthetic_score": "", "aesthetic_weight": ""}
    r = requests.post(f"{srv.url}/knn-service", data=json.dumps(body), headers={"content-type": "text/plain"},
                      timeout=30)
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") is None  # same-origin here
    res = r.json()
    assert len(res) == 10 and all("image_path" in x for x in res[:3]) and all(set(x) == {"id", "similarity"}
                                                                               for x in res[3:])
    ids = [x["id"] for x in res[3:]]
    meta = requests.post(f"{srv.url}/metadata", data=json.dumps({"ids": ids, "indice_name": "photos"}),
                         timeout=30).json()
    assert [m["id"] for m in meta] == ids
    assert [m["metadata"]["image_path"] for m in meta] == [idx.row(i)["key"] for i in ids]  # relative
    cors = requests.post(f"{srv.url}/knn-service", data=json.dumps(body),
                         headers={"origin": "http://front.example"}, timeout=30)
    assert cors.headers["access-control-allow-origin"] == "http://front.example"  # the origin allowed at start
    for bad, status in (({**body, "indice_name": "other"}, 404), ({**body, "modality": "text"}, 404),
                        ({**body, "text": None, "image_url": "http://example.com/x.jpg"}, 422),
                        ({**body, "num_images": 1000}, 422)):
        r = requests.post(f"{srv.url}/knn-service", data=json.dumps(bad), timeout=30)
        assert r.status_code == status, r.text
        assert isinstance(r.json()["detail"], str)
