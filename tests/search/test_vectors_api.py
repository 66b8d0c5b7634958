"""/embed and /rank against the model itself, batching across requests inside the service
(each caller its own result, failure isolation, a client leaving mid-batch), the bearer token
and /metrics."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from search.searchutil import LiveServer, jpeg_bytes, micro_model, pattern_image, photo_index

from clipforge.inference import embed_images, embed_texts
from clipforge.preprocess import image_transform, load_image
from clipforge.search.service import create_app

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("vec")
    return d, photo_index(d, shard_size=50)


@pytest.fixture(scope="module")
def client(built):
    d, model = built
    return TestClient(create_app(d / "idx", model, max_embed_items=4), raise_server_exceptions=False)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMAGES = [jpeg_bytes(pattern_image(i, (40 + 8 * i, 36))) for i in range(3)]
TEXTS = ["a dog on the beach", "red and blue stripes", "a small green block"]


def reference(model):
    pre = image_transform(model.config.preprocess)
    t = embed_texts(model, TEXTS).numpy()
    i = embed_images(model, [load_image(x) for x in IMAGES], preprocess=pre).numpy()
    return t, i


def test_embed_equals_the_model(client, built):
    _, model = built
    want_t, want_i = reference(model)
    r = client.post("/embed", json={"texts": TEXTS, "images": [b64(x) for x in IMAGES[:1]]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["dim"] == 32 and out["encoding"] == "json" and out["dtype"] == "float32"
    np.testing.assert_allclose(np.array(out["texts"]), want_t, atol=1e-5)
    np.testing.assert_allclose(np.array(out["images"]), want_i[:1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.array(out["texts"]), axis=1), 1.0, atol=1e-5)
    for dtype, np_dtype, tol in (("float32", "<f4", 1e-5), ("float16", "<f2", 2e-3)):
        r = client.post("/embed", json={"images": [b64(x) for x in IMAGES], "encoding": "base64", "dtype": dtype})
        assert r.status_code == 200, r.text
        got = np.stack([np.frombuffer(base64.b64decode(v), dtype=np_dtype) for v in r.json()["images"]])
        np.testing.assert_allclose(got.astype(np.float32), want_i, atol=tol)


def test_rank_equals_clip_logits(client, built):
    _, model = built
    want_t, want_i = reference(model)
    r = client.post("/rank", json={"query": {"image": b64(IMAGES[1])}, "texts": TEXTS})
    assert r.status_code == 200, r.text
    out = r.json()
    scale = float(model.logit_scale.detach().exp())
    logits = scale * want_i[1] @ want_t.T
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).numpy()
    assert out["activation"] == "softmax" and out["logit_bias"] is None
    np.testing.assert_allclose(out["scores"], want_i[1] @ want_t.T, atol=1e-5)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-3)
    np.testing.assert_allclose(out["probs"], probs, atol=1e-4)
    assert abs(sum(out["probs"]) - 1) < 1e-9
    r = client.post("/rank", json={"query": {"text": TEXTS[0]}, "images": [b64(x) for x in IMAGES]})
    np.testing.assert_allclose(r.json()["scores"], want_i @ want_t[0], atol=1e-5)


def test_rank_is_sigmoid_with_a_logit_bias(built):
    d, _ = built
    model = micro_model()
    model.logit_bias = torch.nn.Parameter(torch.tensor(-3.0))
    with pytest.warns(UserWarning, match="weights differ"):  # another model than the index's: fine here
        c = TestClient(create_app(d / "idx", model))
    want_t, want_i = reference(model)
    out = c.post("/rank", json={"query": {"image": b64(IMAGES[0])}, "texts": TEXTS}).json()
    logits = float(model.logit_scale.detach().exp()) * (want_i[0] @ want_t.T) - 3.0
    assert out["activation"] == "sigmoid" and out["logit_bias"] == -3.0
    np.testing.assert_allclose(out["probs"], 1 / (1 + np.exp(-logits)), atol=1e-4)


@pytest.mark.parametrize("path,body,status,needle", [
    ("/embed", {}, 422, "nothing to embed"),
    ("/embed", {"texts": []}, 422, "non-empty list"),
    ("/embed", {"texts": ["a"] * 5}, 422, "at most 4"),
    ("/embed", {"texts": ["  "]}, 422, "empty"),
    ("/embed", {"texts": ["a"], "dtype": "int8"}, 422, "dtype"),
    ("/embed", {"texts": ["a"], "extra": 1}, 422, "unknown field"),
    ("/embed", {"images": ["not base64!"]}, 422, "not valid base64"),
    ("/embed", {"images": [b64(b"GIF89a not really")]}, 415, "not a readable image"),
    ("/rank", {"query": {"text": "a"}}, 422, "exactly one candidate"),
    ("/rank", {"query": {"text": "a"}, "texts": ["b"], "images": ["x"]}, 422, "exactly one candidate"),
    ("/rank", {"query": "a dog", "texts": ["b"]}, 422, "query must be"),
    ("/rank", {"query": {"text": "a", "image": "x"}, "texts": ["b"]}, 422, "query must be"),
])
def test_vector_request_errors(client, path, body, status, needle):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_embed_bomb_is_413(client):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(buf, "PNG")
    r = client.post("/embed", json={"images": [b64(buf.getvalue())]})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


# --- batching inside the service --------------------------------------------------------------------


class Gate:
    def __init__(self, real, fail_text: str | None = None) -> None:
        self.real, self.fail_text = real, fail_text
        self.batches: list[list] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(20)
        if self.fail_text in items:
            raise RuntimeError(f"cannot encode {self.fail_text!r}")
        return self.real(items)


def wait_for(cond, what: str) -> None:
    for _ in range(400):  # bounded wait for a state, not a timing assertion
        if cond():
            return
        time.sleep(0.025)
    pytest.fail(f"never reached: {what}")


def test_concurrent_queries_share_a_batch_and_get_their_own_results(built):
    d, model = built
    texts = [f"query number {i} about {w}" for i, w in enumerate(("dogs", "cats", "cars", "boats", "trees", "rain"))]
    app = create_app(d / "idx", model, max_batch=len(texts), batch_wait_ms=0, workers=8)
    c = TestClient(app, raise_server_exceptions=False)
    single = {t: [h["id"] for h in c.post("/search", json={"text": t, "k": 5}).json()["results"]] for t in texts}
    vecs = {t: np.array(c.post("/embed", json={"texts": [t]}).json()["texts"][0]) for t in texts}
    app.state.searcher._cache.data.clear()
    b = app.state.batchers["text"]
    gate = Gate(b.encode, fail_text=texts[3])
    b.encode = gate
    with ThreadPoolExecutor(len(texts) + 1) as pool:
        first = pool.submit(c.post, "/search", json={"text": "the first, held", "k": 5})
        assert gate.entered.wait(20)
        b.wait_s = 30.0  # only a full batch leaves: all six queries ride together
        futs = {t: pool.submit(c.post, "/search" if i % 2 else "/embed",
                               json={"text": t, "k": 5} if i % 2 else {"texts": [t]})
                for i, t in enumerate(texts)}
        wait_for(lambda: b.depth == len(texts), "six queued items")
        gate.release.set()
        assert first.result(20).status_code == 200
        for i, (t, f) in enumerate(futs.items()):
            r = f.result(20)
            if t == texts[3]:  # the failing item fails only its own request
                assert r.status_code == 500 and "cannot encode" in r.json()["detail"]
            elif i % 2:
                assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == single[t]
            else:
                np.testing.assert_allclose(r.json()["texts"][0], vecs[t], atol=1e-5)
    assert sorted(gate.batches[1]) == sorted(texts)  # one batch of six, then the retries one by one
    assert [len(x) for x in gate.batches[2:]] == [1] * len(texts)
    text = c.get("/metrics").text
    assert 'clipforge_batch_size_bucket{kind="text",le="8"}' in text


def test_a_client_leaving_mid_batch_is_dropped(built):
    import httpx

    d, model = built
    app = create_app(d / "idx", model, batch_wait_ms=0)
    b = app.state.batchers["text"]
    gate = Gate(b.encode)
    b.encode = gate
    server = LiveServer(app)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, server.url + "/search", json={"text": "held query"}, timeout=30)
            assert gate.entered.wait(20)
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            body = b'{"text": "the query of a client that leaves"}'
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: b.depth == 1, "the leaving client's item queued")
            s.close()
            metrics = app.state.metrics
            wait_for(lambda: metrics.total("clipforge_client_disconnects_total") == 1, "the disconnect seen")
            gate.release.set()
            assert first.result(20).status_code == 200
            assert httpx.post(server.url + "/search", json={"text": "after"}, timeout=30).status_code == 200
    finally:
        server.close()
    assert ["the query of a client that leaves"] not in gate.batches and b.dropped == 1
    assert gate.batches[-1] == ["after"]


# --- bearer token and metrics -------------------------------------------------------------------------


def test_bearer_token(built):
    d, model = built
    with pytest.raises(ValueError, match="16 characters"):
        create_app(d / "idx", model, auth_token="short")
    c = TestClient(create_app(d / "idx", model, auth_token=TOKEN))
    assert c.get("/health").status_code == 200  # open
    for path, method in (("/search", "post"), ("/embed", "post"), ("/items/0", "get"), ("/metrics", "get"),
                         ("/openapi.json", "get"), ("/knn-service", "post")):
        r = getattr(c, method)(path, **({"json": {"text": "a"}} if method == "post" else {}))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
    bad = c.post("/search", json={"text": "a"}, headers={"authorization": "Bearer " + TOKEN[:-1] + "x"})
    assert bad.status_code == 401
    ok = c.post("/search", json={"text": "a"}, headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_page_is_open_with_a_token_and_sends_it(built):
    """The page and its assets hold no data: served without the token; its script sends the token."""
    d, model = built
    c = TestClient(create_app(d / "idx", model, auth_token=TOKEN))
    assert c.get("/").status_code == 200 and c.get("/static/style.css").status_code == 200
    js = c.get("/static/app.js")
    assert js.status_code == 200 and "Authorization: `Bearer ${t}`" in js.text and "sessionStorage" in js.text
    assert c.get("/health").json()["auth"] is True
    assert c.get("/items/0").status_code == 401


def test_token_file_satisfies_the_open_address_rule(built, tmp_path, capsys):
    from clipforge.cli.main import main

    d, _ = built
    tok = tmp_path / "token"
    tok.write_text("short\n")
    rc = main(["serve", "--index", str(d / "idx"), "--model", "tiny-vit", "--random-init", "--host", "0.0.0.0",
               "--port", "0", "--auth-token-file", str(tok)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "16 characters" in err[0], err
    tok.write_text(TOKEN + "\n")
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:  # past the open-address rule (a token is given): stopped by the busy port instead
        rc = main(["serve", "--index", str(d / "idx"), "--model", "tiny-vit", "--random-init", "--host", "0.0.0.0",
                   "--port", str(port), "--auth-token-file", str(tok)])
    finally:
        busy.close()
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"0.0.0.0:{port}" in err[0] and "--insecure" not in err[0], err


def test_metrics_count_requests_by_route_and_status(built):
    d, model = built
    c = TestClient(create_app(d / "idx", model), raise_server_exceptions=False)
    c.post("/search", json={"text": "a dog"})
    c.post("/search", json={"text": ""})
    c.get("/items/3")
    c.get("/items/999")
    text = c.get("/metrics").text
    assert 'clipforge_requests_total{route="/search",status="200"} 1' in text
    assert 'clipforge_requests_total{route="/search",status="422"} 1' in text
    assert 'clipforge_requests_total{route="/items/{item_id}",status="404"} 1' in text
    assert 'clipforge_request_seconds_count{route="/search"} 2' in text
    assert 'clipforge_errors_total{kind="422"} 1' in text and 'clipforge_queue_depth{kind="text"} 0' in text
    assert logging.getLogger("clipforge").level is not None


def test_shutdown_drains_in_flight_requests(built):
    """SIGTERM / Ctrl-C (uvicorn's should_exit): a query waiting on its batch still gets its answer."""
    import httpx

    d, model = built
    app = create_app(d / "idx", model, batch_wait_ms=0)
    b = app.state.batchers["text"]
    gate = Gate(b.encode)
    b.encode = gate
    server = LiveServer(app)
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, server.url + "/search", json={"text": "in flight at shutdown"}, timeout=30)
            assert gate.entered.wait(20)
            server.server.should_exit = True  # what uvicorn's signal handler sets

            def refusing() -> bool:  # the listener is closed: shutdown has begun, the query still held
                try:
                    socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                    return False
                except OSError:
                    return True

            wait_for(refusing, "the server stopped accepting")
            assert not held.done()
            gate.release.set()
            r = held.result(30)
        assert r.status_code == 200 and len(r.json()["results"]) == 10
    finally:
        server.close()
    assert not server.thread.is_alive()
