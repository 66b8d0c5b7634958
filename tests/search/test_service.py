"""The HTTP service in-process (FastAPI TestClient): every endpoint, every 4xx, 500s, concurrency."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipforge.inference import embed_texts
from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index, load_index
from clipforge.search.service import create_app
from clipforge.search.sources import ImageFolderSource, TextFileSource
from search.searchutil import jpeg_bytes, make_image_folder, micro_model, pattern_image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("svc")
    model = micro_model()
    facts = make_image_folder(d / "photos")
    embed_collection(model, ImageFolderSource(d / "photos"), d / "emb", shard_size=5, progress=False,
                     rank=0, world_size=1)
    build_index(d / "emb", d / "idx", n_queries=5, progress=False)
    app = create_app(d / "idx", model, max_k=20, max_upload_bytes=50_000)
    return d, model, facts, app


@pytest.fixture(scope="module")
def client(setup):
    return TestClient(setup[3])


def test_health_page_static_docs(client, setup):
    _, _, facts, _ = setup
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["items"] == len(facts["sizes"]) and h["kind"] == "image"
    assert h["index"]["type"] == "flat" and h["model_matches_index"] is True and h["max_k"] == 20
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="query"' in page.text and 'type="file"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/items/{item_id}/image", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


def test_text_search_matches_brute_force(client, setup):
    d, model, _, _ = setup
    r = client.post("/search", json={"text": "a red square on a blue background", "k": 5})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["query"] == {"type": "text", "text": "a red square on a blue background"} and data["k"] == 5
    res = data["results"]
    assert len(res) == 5 and all(a["score"] >= b["score"] for a, b in zip(res, res[1:]))
    idx = load_index(d / "idx")
    base = np.concatenate([idx.vector(i)[None] for i in range(idx.ntotal)])
    q = embed_texts(model, ["a red square on a blue background"]).numpy()[0]
    want = np.argsort(-(base @ q), kind="stable")[:5]
    assert [x["id"] for x in res] == want.tolist()
    assert res[0]["image_url"] == f"/items/{res[0]['id']}/image" and res[0]["key"]


def test_item_search_excludes_itself(client):
    r = client.post("/search", json={"item_id": 3, "k": 4})
    assert r.status_code == 200, r.text
    ids = [x["id"] for x in r.json()["results"]]
    assert len(ids) == 4 and 3 not in ids


def test_image_upload_finds_the_same_image(client, setup):
    d, _, facts, _ = setup
    key = sorted(facts["sizes"])[2]
    data = (d / "photos" / key).read_bytes()
    r = client.post("/search", files={"image": (key, data, "application/octet-stream")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["query"]["type"] == "image" and out["query"]["filename"] == key and out["k"] == 3
    assert out["results"][0]["key"] == key and out["results"][0]["score"] > 0.999


def test_items_and_thumbnails(client, setup):
    _, _, facts, _ = setup
    meta = client.get("/items/0").json()
    assert meta["id"] == 0 and meta["key"] == sorted(facts["sizes"])[0]
    assert (meta["width"], meta["height"]) == facts["sizes"][meta["key"]]
    r = client.get("/items/0/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and img.size == facts["sizes"][meta["key"]]  # small originals: not upscaled
    small = Image.open(io.BytesIO(client.get("/items/0/image", params={"size": 16}).content))
    assert max(small.size) == 16
    assert client.get("/items/0/image").content == r.content  # cached copy is identical


@pytest.mark.parametrize("body,status,needle", [
    ({"text": "", "k": 5}, 422, "empty"),
    ({"text": "   ", "k": 5}, 422, "empty"),
    ({"text": "dog", "k": 0}, 422, "between 1 and 20"),
    ({"text": "dog", "k": 21}, 422, "between 1 and 20"),
    ({"text": "dog", "k": "ten"}, 422, "integer"),
    ({"text": "dog", "k": True}, 422, "integer"),
    ({"text": 5}, 422, "string"),
    ({"text": "dog", "item_id": 1}, 422, "exactly one"),
    ({"k": 3}, 422, "exactly one"),
    ({"query": "dog"}, 422, "unknown field"),
    ({"item_id": 10_000}, 404, "unknown item id"),
    ({"item_id": -1}, 404, "unknown item id"),
    ({"item_id": "3"}, 422, "integer"),
])
def test_json_query_errors(client, body, status, needle):
    r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_other_request_errors(client):
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = client.post("/search", json=["dog"])
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]
    r = client.post("/search", content=b"dog", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "unsupported content type" in r.json()["detail"]
    r = client.post("/search", files={"image": ("x.jpg", b"definitely not an image", "image/jpeg")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"] and "x.jpg" in r.json()["detail"]
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    assert len(buf.getvalue()) > 50_000
    r = client.post("/search", files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "limit of 50000 bytes" in r.json()["detail"]
    r = client.post("/search", files={"image": ("e.jpg", b"", "image/jpeg")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/search", files={"other": ("e.jpg", b"x", "image/jpeg")})
    assert r.status_code == 422 and "unknown form field(s) ['other']" in r.json()["detail"]
    r = client.post("/search", data={"k": "3"}, files={"file": ("e.txt", b"", "text/plain")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/search", data={"image": "not a file"}, files={"k": ("k", b"3", "text/plain")})
    assert r.status_code == 422 and "'image' file field" in r.json()["detail"]
    ok = jpeg_bytes(pattern_image(1))
    r = client.post("/search", files={"image": ("q.jpg", ok, "image/jpeg")}, data={"k": "999"})
    assert r.status_code == 422 and "between 1 and 20" in r.json()["detail"]
    r = client.post("/search", files={"image": ("q.jpg", ok, "image/jpeg")}, data={"k": "many"})
    assert r.status_code == 422 and "integer" in r.json()["detail"]
    assert client.get("/items/10000").status_code == 404
    assert "unknown item id" in client.get("/items/10000/image").json()["detail"]
    r = client.get("/items/abc")
    assert r.status_code == 422 and "item_id" in r.json()["detail"]
    assert client.get("/items/0/image", params={"size": 5000}).status_code == 422


def test_server_survives_internal_errors(setup, monkeypatch):
    _, _, _, app = setup
    client = TestClient(app, raise_server_exceptions=False)

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr("clipforge.search.searcher.search_flat_exact", boom)  # the batched search of an exact index
    monkeypatch.setattr(app.state.searcher, "search_vector", boom)
    r = client.post("/search", json={"text": "dog"})
    assert r.status_code == 500 and "simulated failure" in r.json()["detail"]
    monkeypatch.undo()
    assert client.post("/search", json={"text": "dog"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_missing_original_image_is_404(setup, tmp_path):
    d, model, _, _ = setup
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(d / "photos", photos)
    embed_collection(model, ImageFolderSource(photos), tmp_path / "emb", shard_size=50, progress=False,
                     rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx", n_queries=5, progress=False)
    client = TestClient(create_app(tmp_path / "idx", model))
    key = client.get("/items/1").json()["key"]
    (photos / key).unlink()
    r = client.get("/items/1/image")
    assert r.status_code == 404 and "is gone" in r.json()["detail"]


def test_concurrent_clients(setup):
    _, _, facts, app = setup
    client = TestClient(app)
    texts = ["a dog", "red and blue", "stripes", "a small green block", "sunset over water", "a cat"]
    expected = {t: [x["id"] for x in client.post("/search", json={"text": t, "k": 5}).json()["results"]]
                for t in texts}
    upload = jpeg_bytes(pattern_image(3, (50, 40)))
    exp_img = [x["id"] for x in client.post("/search", files={"image": ("q.jpg", upload, "image/jpeg")},
                                            data={"k": "5"}).json()["results"]]
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(6):
            t = texts[(i + j) % len(texts)]
            if (i + j) % 3 == 0:
                r = client.post("/search", files={"image": ("q.jpg", upload, "image/jpeg")}, data={"k": "5"})
                want = exp_img
            else:
                r = client.post("/search", json={"text": t, "k": 5})
                want = expected[t]
            got = [x["id"] for x in r.json()["results"]] if r.status_code == 200 else None
            if got != want:
                with lock:
                    errors.append(f"{r.status_code} {t} {got} != {want}")
            if client.get(f"/items/{(i + j) % len(facts['sizes'])}/image").status_code != 200:
                with lock:
                    errors.append("thumbnail failed")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert errors == []
    stats = client.get("/health").json()["query_cache"]
    assert stats["hits"] > 0  # repeated text queries come from the cache


def test_text_collection_service(tmp_path):
    model = micro_model()
    f = tmp_path / "t.txt"
    f.write_text("a dog\na cat on a mat\nred car\nblue sky\n", encoding="utf-8")
    embed_collection(model, TextFileSource(f), tmp_path / "emb", progress=False, rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx", n_queries=2, progress=False)
    client = TestClient(create_app(tmp_path / "idx", model))
    res = client.post("/search", json={"text": "a dog", "k": 4}).json()["results"]
    assert res[0]["caption"] == "a dog" and res[0]["score"] > 0.999 and all(r["image_url"] is None for r in res)
    r = client.get("/items/0/image")
    assert r.status_code == 404 and "text" in r.json()["detail"]
