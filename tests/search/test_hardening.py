"""The service under hostile input (issue 13): size limits, malformed bodies -> 4xx never 5xx,
work off the event loop (health answers while a query is stuck in the pool), timeouts and a
saturated pool -> 503, uploads refused cleanly without python-multipart."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from search.searchutil import (
    LiveServer,
    jpeg_bytes,
    pattern_image,
    photo_index,
)

import clipforge.search.service as service
from clipforge.search.service import create_app


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("hard")
    return d, photo_index(d, shard_size=5)


@pytest.fixture(scope="module")
def client(built):
    d, model = built
    return TestClient(create_app(d / "idx", model, max_k=20, max_upload_bytes=50_000, max_json_bytes=4096),
                      raise_server_exceptions=False)


def _shape_ok(r) -> bool:
    body = r.json()
    return set(body) == {"detail", "errors"} and isinstance(body["detail"], str) and \
        (body["errors"] is None or isinstance(body["errors"], list))


def post_json(client, raw: bytes, **headers):
    return client.post("/search", content=raw, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("raw,status,needle", [
    (b"[" * 100_000 + b"]" * 100_000, 413, "limit of 4096 bytes for JSON"),  # over the 4 KiB cap of this app
    (b"[" * 2_000 + b"]" * 2_000, 400, "nested too deeply"),
    (b'{"text": "\\ud800 dog"}', 422, "unpaired surrogate"),
    (b'{"text": "\\udfff"}', 422, "unpaired surrogate"),
    (b'{"text": "dog", "k": NaN}', 400, "not valid JSON"),
    (b'{"text": "dog", "k": Infinity}', 400, "not valid JSON"),
    (b'{"text": "\xff\xfe dog"}', 400, "not UTF-8"),
    (b"", 400, "not valid JSON"),
    (b'{"text": "dog"} trailing', 400, "not valid JSON"),
    (b'{"text": {"nested": ["dog"]}}', 422, "string"),
    (b'{"text": null, "item_id": null}', 422, "exactly one"),
    (b'{"text": "dog", "k": 1e400}', 422, "integer"),
    (b'{"item_id": 1e30}', 404, "unknown item id"),
])
def test_malformed_json_is_4xx(client, raw, status, needle):
    r = post_json(client, raw)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"] and _shape_ok(r)


def test_deep_nesting_within_the_size_limit_is_400(built):
    """100,000-deep nesting (200 kB) under a limit that lets it through to the parser: 400, not 500."""
    d, model = built
    c = TestClient(create_app(d / "idx", model, max_json_bytes=1 << 20), raise_server_exceptions=False)
    r = post_json(c, b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"]
    r = post_json(c, b'{"text":' * 50_000 + b'"x"' + b"}" * 50_000)
    assert r.status_code == 400
    assert c.get("/health").status_code == 200


def test_nullable_fields_and_whole_floats(client):
    """What the schema allows is accepted: a null for the other field, k as 5.0 (a JSON Schema integer)."""
    r = post_json(client, b'{"text": "dog", "item_id": null, "k": 5.0}')
    assert r.status_code == 200 and r.json()["k"] == 5 and len(r.json()["results"]) == 5
    r = post_json(client, b'{"item_id": 2, "text": null}')
    assert r.status_code == 200 and r.json()["query"] == {"type": "item", "item_id": 2}


def test_long_text_is_truncated_and_said(client):
    r = client.post("/search", json={"text": "dog " * 100, "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["truncated_from_tokens"] == 102
    short = client.post("/search", json={"text": "dog", "k": 3}).json()["query"]
    assert "truncated_from_tokens" not in short


def test_body_limits_by_header_and_by_stream(client):
    body = json.dumps({"text": "dog " * 2000}).encode()
    assert len(body) > 4096
    r = post_json(client, body)
    assert r.status_code == 413 and _shape_ok(r) and "4096" in r.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer, refused once the cap is passed
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["detail"]
    r = client.post("/search", content=b"{}", headers={"content-type": "application/json", "content-length": "abc"})
    assert r.status_code == 400
    # the upload limit applies to uploads, not the JSON limit
    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8))
    ok = jpeg_bytes(noise)
    assert 4096 < len(ok) < 50_000
    assert client.post("/search", files={"image": ("q.jpg", ok, "image/jpeg")}).status_code == 200


def test_openapi_matches_errors(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/search"]["post"]
    for code in ("400", "404", "413", "415", "422", "503"):
        assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    err = spec["components"]["schemas"]["ErrorResponse"]["properties"]
    assert err["detail"]["type"] == "string"
    body = op["requestBody"]["content"]["application/json"]["schema"]
    text_branch, item_branch = body["oneOf"]
    assert text_branch["properties"]["item_id"] == {"type": "null"} and item_branch["properties"]["text"] == {
        "type": "null"}
    assert text_branch["properties"]["k"]["maximum"] == 20 and text_branch["properties"]["k"]["minimum"] == 1
    size = {p["name"]: p for p in spec["paths"]["/items/{item_id}/image"]["get"]["parameters"]}["size"]
    assert size["schema"]["anyOf"][0]["minimum"] == 16 and size["schema"]["anyOf"][0]["maximum"] == 1024
    r = client.get("/items/0/image", params={"size": -3})
    assert r.status_code == 422 and isinstance(r.json()["errors"], list) and _shape_ok(r)


def test_work_runs_off_the_event_loop(built):
    """A query stuck in the worker pool does not hold up /health (the pool, not the loop, waits)."""
    d, model = built
    app = create_app(d / "idx", model, workers=2)
    searcher = app.state.searcher
    release, entered = threading.Event(), threading.Event()
    real = searcher.text_tokens

    def slow(text):
        entered.set()
        release.wait(10)
        return real(text)

    searcher.text_tokens = slow
    with TestClient(app) as c:
        out: dict[str, object] = {}
        t = threading.Thread(target=lambda: out.setdefault("r", c.post("/search", json={"text": "dog"})))
        t.start()
        assert entered.wait(10)
        t0 = time.perf_counter()
        h = c.get("/health")
        health_s = time.perf_counter() - t0
        still_in_flight = t.is_alive()
        release.set()
        t.join(10)
    assert h.status_code == 200 and still_in_flight and health_s < 1.0, health_s
    assert out["r"].status_code == 200


def test_timeout_and_saturation_are_503(built):
    d, model = built
    app = create_app(d / "idx", model, workers=1, max_pending=1, request_timeout=0.2)
    release = threading.Event()
    real = app.state.searcher.text_tokens
    app.state.searcher.text_tokens = lambda text: (release.wait(10), real(text))[1]
    with TestClient(app) as c:
        r = c.post("/search", json={"text": "dog"})
        assert r.status_code == 503 and "longer than 0.2 s" in r.json()["detail"] and r.headers["retry-after"]
        # the timed-out query still occupies the only slot until it really ends: the next is refused
        r = c.post("/search", json={"text": "cat"})
        assert r.status_code == 503 and "busy" in r.json()["detail"]
        release.set()
        for _ in range(100):
            if c.post("/search", json={"text": "cat"}).status_code == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the pool never freed its slot")


def test_uploads_without_python_multipart(built, monkeypatch):
    d, model = built
    monkeypatch.setattr(service.http, "multipart_available", lambda: False)
    with pytest.raises(RuntimeError, match="python-multipart"):
        create_app(d / "idx", model, uploads=True)
    app = create_app(d / "idx", model)  # auto: uploads off, said in /health, the schema and the 415
    c = TestClient(app)
    assert c.get("/health").json()["uploads"] is False
    content = c.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json"}
    r = c.post("/search", files={"image": ("q.jpg", jpeg_bytes(pattern_image(1)), "image/jpeg")})
    assert r.status_code == 415 and "python-multipart" in r.json()["detail"]
    assert c.post("/search", json={"text": "dog"}).status_code == 200


def test_serve_refuses_to_start_without_python_multipart(built, monkeypatch, capsys):
    from clipforge.cli.main import main

    d, _ = built
    monkeypatch.setattr(service.http, "multipart_available", lambda: False)
    rc = main(["serve", "--index", str(d / "idx"), "--model", "tiny-vit", "--random-init", "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "python-multipart" in err[0] and "--no-uploads" in err[0], err


# --- a real server: /health while a 10 MB query is being refused ---------------------------------


@pytest.fixture
def live_server(built):
    d, model = built
    server = LiveServer(create_app(d / "idx", model))  # defaults: 256 KiB JSON limit
    yield server.port
    server.close()


def _read_status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        got = s.recv(4096)
        if not got:
            break
        data += got
    return int(data.split(b" ", 2)[1])


def test_health_answers_while_a_10mb_query_is_refused(live_server):
    import httpx

    port = live_server
    big = json.dumps({"text": "dog " * (10 * 2**20 // 4)}).encode()
    assert len(big) > 10 * 2**20
    for framing in ("content-length", "chunked"):
        s = socket.create_connection(("127.0.0.1", port))
        head = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                (f"Content-Length: {len(big)}\r\n".encode() if framing == "content-length"
                 else b"Transfer-Encoding: chunked\r\n") + b"\r\n")
        s.sendall(head)
        sent = 0
        try:  # send the first 1 MB only: the request is in flight, its body unfinished
            while sent < 2**20:
                part = big[sent:sent + 65536]
                s.sendall(part if framing == "content-length" else b"%x\r\n%s\r\n" % (len(part), part))
                sent += len(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed early: fine
        t0 = time.perf_counter()
        h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        health_s = time.perf_counter() - t0
        status = _read_status(s)
        s.close()
        print(f"{framing}: /health in {1000 * health_s:.1f} ms while the 10 MB query was in flight")
        assert h.status_code == 200 and health_s < 1.0, health_s
        assert status == 413


def test_listening_sockets_send_without_delay():
    """A socket made by ``socket.socket()`` (proto 0) gets no TCP_NODELAY from asyncio; the server
    sets it on the listener, whose accepted connections inherit it (else each keep-alive response
    written as headers + body waits ~40 ms for the client's delayed ACK)."""
    async def app(scope, receive, send):  # a bare ASGI app: only the sockets matter here
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server = LiveServer(app)
    try:
        assert server.sock.proto == 0
        assert server.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.close()
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # inherited on this OS
