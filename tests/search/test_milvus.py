"""The Milvus backend through milvus-lite (embedded, in this process; a Milvus server is reached by
the same client code but none runs here): built from `clipforge embed` output it answers like the
exact FAISS index, serves the HTTP API, grows with --add, deletes by id, keeps generations."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from clipforge.cli.main import main
from search.searchutil import clustered_vectors, exact_topk, micro_model, pattern_image, write_collection

try:
    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401
    HAVE_MILVUS = True
except ImportError:
    HAVE_MILVUS = False
needs_milvus = pytest.mark.skipif(not HAVE_MILVUS, reason="pymilvus / milvus-lite not installed (clipforge[milvus])")


def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    emb = write_collection(tmp_path / "emb", clustered_vectors(50, 8), shard_size=50)
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import fails as if not installed
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx"), "--backend", "milvus"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "clipforge[milvus]" in err[0] and "Traceback" not in err[0]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """300 images embedded by `clipforge embed`, indexed exactly by FAISS and by Milvus."""
    from clipforge.checkpoints import save_model

    d = tmp_path_factory.mktemp("milvus")
    model = micro_model()
    ckpt = save_model(model, d / "micro.safetensors")
    (d / "photos").mkdir()
    for i in range(300):
        pattern_image(i, (32 + i % 9, 30 + i % 7)).save(d / "photos" / f"p{i:03d}.png")
    assert main(["embed", "--model", str(ckpt), "--images", str(d / "photos"), "--out", str(d / "emb"),
                 "--shard-size", "70", "--no-progress"]) == 0
    assert main(["index", "--embeddings", str(d / "emb"), "--out", str(d / "faiss"), "--no-progress"]) == 0
    return d, model, ckpt


@needs_milvus
def test_milvus_search_matches_exact_faiss(embedded, capsys):
    from clipforge.search.index import load_index
    from clipforge.search.searcher import Searcher

    d, model, ckpt = embedded
    capsys.readouterr()
    assert main(["index", "--embeddings", str(d / "emb"), "--out", str(d / "mv"), "--backend", "milvus",
                 "--no-progress", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plan"]["factory"] == "FLAT" and rep["ntotal"] == 300
    info = json.loads((d / "mv" / "index.json").read_text())
    assert info["backend"] == "milvus" and info["uri"] == "milvus.db" and info["collection"].startswith("clipforge_g")
    assert info["recall_at_10"] == pytest.approx(1.0, abs=0.01)
    texts = [f"a photo of pattern number {i} in colour {i % 13}" for i in range(200)]
    faiss_s = Searcher(load_index(d / "faiss"), model)
    mv = load_index(d / "mv")
    try:
        milvus_s = Searcher(mv, model)
        same = [[h.id for h in faiss_s.search_text(t, 10)] == [h.id for h in milvus_s.search_text(t, 10)]
                for t in texts]
        assert np.mean(same) >= 0.99, f"{np.mean(same):.3f} of 200 queries give the same top-10"
        hit = milvus_s.search_text(texts[0], 3)[0]
        assert hit.row["key"].startswith("p") and hit.row["image_path"].endswith(".png")
    finally:
        mv.close()
    # the CLI, through the index directory alone (it finds backend, uri and collection in index.json)
    for t in texts[:3]:
        outs = []
        for idx in ("faiss", "mv"):
            assert main(["search", "--index", str(d / idx), "--model", str(ckpt), t, "-k", "10", "--json"]) == 0
            outs.append([r["id"] for r in json.loads(capsys.readouterr().out)["results"]])
        assert outs[0] == outs[1]


@needs_milvus
def test_serve_on_milvus(embedded):
    from fastapi.testclient import TestClient

    from clipforge.search.index import load_index
    from clipforge.search.service import create_app

    d, model, _ = embedded
    if not (d / "mv" / "index.json").is_file():
        assert main(["index", "--embeddings", str(d / "emb"), "--out", str(d / "mv"), "--backend", "milvus",
                     "--no-progress"]) == 0
    idx = load_index(d / "mv")
    try:
        c = TestClient(create_app(idx, model, max_k=20))
        h = c.get("/health").json()
        assert h["items"] == 300 and h["index"]["backend"] == "milvus"
        ref = TestClient(create_app(d / "faiss", model, max_k=20))
        body = {"text": "stripes and a square", "k": 8}
        got, want = c.post("/search", json=body).json(), ref.post("/search", json=body).json()
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
        item = c.post("/search", json={"item_id": 7, "k": 5}).json()["results"]
        assert len(item) == 5 and all(r["id"] != 7 for r in item)
        assert [r["id"] for r in item] == [r["id"] for r in ref.post("/search", json={"item_id": 7, "k": 5}).json()["results"]]
        meta = c.get("/items/7").json()
        assert meta["key"] == "p007.png" and meta["image_url"] == "/items/7/image"
        img = c.get("/items/7/image")
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert c.get("/items/300").status_code == 404
        knn = c.post("/knn-service", json={"text": "stripes", "modality": "image", "num_images": 4,
                                           "indice_name": h["name"]})
        assert knn.status_code == 200 and len(knn.json()) == 4
    finally:
        idx.close()


@needs_milvus
def test_milvus_ivf_add_delete_generations(tmp_path, capsys):
    from clipforge.search.index import delete_from_index, load_index
    from clipforge.search.milvus import build_milvus_index, connect, disconnect

    x = clustered_vectors(4000, 32, seed=0)
    emb = write_collection(tmp_path / "emb", x[:3000], shard_size=1000)
    r = build_milvus_index(emb, tmp_path / "idx", exact_threshold=0, n_queries=300, progress=False)
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert r.plan["factory"] == "IVF_FLAT" and info["params"]["nlist"] == r.plan["nlist"]
    assert r.recall_at_10 >= 0.95 and info["params"]["nprobe"] == r.nprobe and info["tuning"]
    xs = x.astype(np.float16).astype(np.float32)
    # a tight budget picks 8-bit codes
    assert build_milvus_index(emb, tmp_path / "sq", exact_threshold=0, max_memory="300K", n_queries=100,
                              progress=False).plan["factory"] == "IVF_SQ8"
    # --add streams the new shards in and re-tunes
    write_collection(emb, x[3000:], shard_size=1000, start_shard=3, first_key=3000)
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx"), "--add", "--no-progress",
                 "--queries", "300"]) == 0
    idx = load_index(tmp_path / "idx")
    try:
        assert idx.ntotal == 4000 and idx.count() == 4000
        ids = idx.search(xs[3990:4000], 1)[1][:, 0]
        assert list(ids) == list(range(3990, 4000))
        assert idx.row(3995)["key"] == "v3995"
    finally:
        idx.close()
    # deletes by id (CLI and Python API)
    capsys.readouterr()
    assert main(["index", "--out", str(tmp_path / "idx"), "--delete", "5,3995", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": [5, 3995], "not_found": [], "count": 3998}
    assert delete_from_index(tmp_path / "idx", [5, 6])["not_found"] == [5]
    idx = load_index(tmp_path / "idx")
    try:
        assert idx.count() == 3997 and not idx.has(5) and idx.has(7)
        _, ids = idx.search(xs[[5, 6, 3995]], 10)
        assert not {5, 6, 3995} & set(ids.ravel().tolist())
        with pytest.raises(KeyError):
            idx.row(6)
        truth = exact_topk(np.delete(xs, [5, 6, 3995], axis=0), xs[100:150], 10)
        keep = np.delete(np.arange(4000), [5, 6, 3995])
        got = idx.search(xs[100:150], 10)[1]
        recall = np.mean([len(set(keep[t]) & set(g)) / 10 for t, g in zip(truth, got)])
        assert recall >= 0.9
    finally:
        idx.close()
    # a rebuild writes a new generation and drops the old collection once committed
    old = json.loads((tmp_path / "idx" / "index.json").read_text())["collection"]
    build_milvus_index(emb, tmp_path / "idx", n_queries=100, progress=False)
    new = json.loads((tmp_path / "idx" / "index.json").read_text())["collection"]
    assert new != old
    uri = str((tmp_path / "idx" / "milvus.db").resolve())
    client = connect(uri)
    try:
        assert [c for c in client.list_collections() if c.startswith("clipforge_g")] == [new]
    finally:
        disconnect(client, uri)


@needs_milvus
def test_milvus_bad_input(tmp_path, capsys):
    emb = write_collection(tmp_path / "emb", clustered_vectors(100, 8), shard_size=100)
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "i"), "--backend", "milvus",
                 "--uri", str(tmp_path / "x.sqlite")]) == 1
    assert "must end in .db" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "i"), "--uri", "a.db"]) == 1
    assert "--uri and --collection are for --backend milvus" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "i"), "--backend", "milvus",
                 "--collection", "9lives"]) == 2
    assert "--collection" in capsys.readouterr().err
    # a database outside the index folder is stored by absolute path and found again
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "i"), "--backend", "milvus",
                 "--uri", str(tmp_path / "elsewhere" / "v.db"), "--collection", "mine", "--no-progress"]) == 0
    info = json.loads((tmp_path / "i" / "index.json").read_text())
    assert info["uri"] == str((tmp_path / "elsewhere" / "v.db").resolve()) and info["collection"].startswith("mine_g")
    from clipforge.search.index import load_index

    with load_index(tmp_path / "i") as idx:
        assert idx.count() == 100
