"""The server's exposure and resources: no open door by default (loopback, no CORS, no server
paths), decompression bombs refused from the header, idle-connection floods, clients that
disconnect mid-body, originals that went bad after indexing, and the CLI's start-up errors."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import socket
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from search.searchutil import LiveServer, jpeg_bytes, pattern_image, photo_index

import clipforge.search.http as http
from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index
from clipforge.search.server import ACCEPT_BURST, IdleConnections, ServerLimits, bind_socket, is_loopback
from clipforge.search.service import create_app
from clipforge.search.sources import ImageFolderSource


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("expo")
    return d, photo_index(d, shard_size=50)


@pytest.fixture(scope="module")
def client(built):
    d, model = built
    return TestClient(create_app(d / "idx", model, max_k=20), raise_server_exceptions=False)


def bomb_png(side: int = 13_000) -> bytes:
    """A 1-bit PNG of side x side pixels: a few tens of KB on disk, 169 MP once decoded."""
    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, "PNG", optimize=False)
    return buf.getvalue()


# --- no open door by default ---------------------------------------------------------------------


def test_cors_is_off_unless_origins_are_given(built, client):
    d, model = built
    h = {"origin": "http://evil.example"}
    assert "access-control-allow-origin" not in client.get("/health", headers=h).headers
    pre = client.options("/search", headers={**h, "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    c = TestClient(create_app(d / "idx", model, cors_origins=("http://front.example",)))
    assert c.get("/health", headers={"origin": "http://front.example"}).headers[
        "access-control-allow-origin"] == "http://front.example"
    assert "access-control-allow-origin" not in c.get("/health", headers=h).headers


def test_no_server_path_in_any_response(built, client):
    d, _ = built
    root = str(d)
    item = client.get("/items/0")
    assert item.status_code == 200 and "image_path" not in item.json() and item.json()["key"]
    assert item.json()["image_url"] == "/items/0/image"
    hits = client.post("/search", json={"text": "a dog", "k": 5})
    meta = client.post("/metadata", json={"ids": [0, 1, 2]})
    knn = client.post("/knn-service", json={"text": "a dog", "modality": "image", "num_images": 3,
                                            "indice_name": None})
    for r in (item, hits, meta, knn):
        assert r.status_code == 200, r.text
        assert root not in r.text and str(d.resolve()) not in r.text
    assert meta.json()[0]["metadata"]["image_path"] == item.json()["key"]  # clip-retrieval's column: relative


def test_public_path():
    assert http.public_path("a/b.jpg") == "a/b.jpg"
    assert http.public_path("/srv/data/a/b.jpg") == "b.jpg"
    assert http.public_path(None) is None


# --- decompression bombs ------------------------------------------------------------------------


def test_bomb_is_refused_from_its_header(built, monkeypatch):
    d, model = built
    app = create_app(d / "idx", model)  # default limit: 40 MP
    assert Image.MAX_IMAGE_PIXELS == 40_000_000
    c = TestClient(app, raise_server_exceptions=False)
    data = bomb_png()
    assert len(data) < 1_000_000
    decoded: list[str] = []
    real = http.load_image
    monkeypatch.setattr(http, "load_image", lambda *a, **k: (decoded.append("x"), real(*a, **k))[1])
    r = c.post("/search", files={"image": ("bomb.png", data, "image/png")})
    assert r.status_code == 413, r.text
    assert "169000000 pixels" in r.json()["detail"] and "limit of 40000000" in r.json()["detail"]
    r = c.post("/knn-service", json={"image": base64.b64encode(data).decode(), "modality": "image",
                                     "num_images": 3, "indice_name": None})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert decoded == []  # refused before any decoding
    ok = c.post("/search", files={"image": ("q.jpg", jpeg_bytes(pattern_image(1)), "image/jpeg")})
    assert ok.status_code == 200 and decoded == ["x"]


def test_served_pixel_limit_and_pillow_warning(built):
    d, model = built
    c = TestClient(create_app(d / "idx", model, max_image_pixels=1000))
    assert Image.MAX_IMAGE_PIXELS == 1000
    r = c.post("/search", files={"image": ("q.jpg", jpeg_bytes(pattern_image(1, (48, 40))), "image/jpeg")})
    assert r.status_code == 413 and "1920 pixels" in r.json()["detail"] and "limit of 1000" in r.json()["detail"]
    with pytest.raises(Image.DecompressionBombWarning):  # Pillow's warning is an error in the server
        with Image.open(io.BytesIO(jpeg_bytes(pattern_image(1, (48, 40))))) as im:
            im.load()
    create_app(d / "idx", model)  # restore the default for the rest of the module


# --- originals gone bad after indexing ----------------------------------------------------------


def test_corrupted_or_removed_original_is_404_without_path(built, tmp_path):
    d, model = built
    photos = tmp_path / "photos"
    shutil.copytree(d / "photos", photos)
    embed_collection(model, ImageFolderSource(photos), tmp_path / "emb", shard_size=50, progress=False,
                     rank=0, world_size=1)
    build_index(tmp_path / "emb", tmp_path / "idx", n_queries=5, progress=False)
    c = TestClient(create_app(tmp_path / "idx", model), raise_server_exceptions=False)
    k1, k2, k3 = (c.get(f"/items/{i}").json()["key"] for i in (1, 2, 3))
    (photos / k1).write_bytes(b"\x89PNG\r\n\x1a\n garbage now")
    (photos / k2).unlink()
    Image.new("1", (13_000, 13_000)).save(photos / k3, "PNG")  # replaced by a bomb (whatever its extension)
    for i, status, needle in ((1, 404, "no longer readable"), (2, 404, "is gone"), (3, 413, "pixels")):
        r = c.get(f"/items/{i}/image")
        assert r.status_code == status, r.text
        assert needle in r.json()["detail"] and str(tmp_path) not in r.text and "photos" not in r.json()["detail"]


# --- real sockets: idle floods and disconnects ---------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    h = Records()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error")]  # uvicorn's do not propagate
    for lg in loggers:
        lg.addHandler(h)
    ours = logging.getLogger("clipforge")
    level = ours.level
    ours.setLevel(logging.DEBUG)
    yield h
    ours.setLevel(level)
    for lg in loggers:
        lg.removeHandler(h)


def test_mid_body_disconnects_are_debug_lines_and_counted(built, records):
    d, model = built
    app = create_app(d / "idx", model)
    server = LiveServer(app)
    try:
        import httpx

        n = 0
        part = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + b"\x89PNG" * 500)
        for path, ctype, body in (("/search", "application/json", b'{"text": "' + b"d" * 2000),
                                  ("/knn-service", "application/json", b'{"text": "' + b"d" * 2000),
                                  ("/search", "multipart/form-data; boundary=xyz", part)):
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: 100000\r\n\r\n".encode() + body)
                s.close()
                n += 1
        metrics = app.state.metrics
        for _ in range(200):  # a bounded wait for the server to see every disconnect (no timing assert)
            if metrics.total("clipforge_client_disconnects_total") >= n:
                break
            time.sleep(0.05)
        assert metrics.total("clipforge_client_disconnects_total") == n
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        server.close()
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    debug = [r for r in records.records if "client went away" in r.getMessage()]
    assert len(debug) == n and all(r.levelno == logging.DEBUG for r in debug)


def _flood(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def _flood_size(wanted: int) -> int:
    """``wanted`` idle sockets, fewer where the descriptor limit needs it (skip when too few remain)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(wanted, soft // 2 - 200)
    if n < 500:
        pytest.skip(f"descriptor limit {soft} is too low for an idle-connection flood")
    return n


def test_health_answers_beside_thousands_of_idle_connections(built):
    import httpx

    d, model = built
    n = _flood_size(3000)
    server = LiveServer(create_app(d / "idx", model), ServerLimits(max_connections=200, header_timeout=60))
    socks: list[socket.socket] = []
    try:
        socks = _flood(server.port, n)
        assert len(socks) > 400
        r = httpx.get(server.url + "/health", timeout=10)  # answers at all, within a generous bound
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = httpx.post(server.url + "/search", json={"text": "a dog"}, timeout=10)
        assert r.status_code == 200
        # the cap closed the oldest idle connections: the first socket of the flood reads EOF
        assert socks[0].recv(1) == b""
    finally:
        for s in socks:
            s.close()
        server.close()


def _get_health(sock: socket.socket) -> bytes:
    """One keep-alive GET /health on ``sock``; the response head and body (b"" once closed)."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_client_that_keeps_using_its_connection_outlives_a_flood(built):
    """Beyond the cap, connections that never sent a request go first: a poller's keep-alive
    connection (older than every flood socket) is not the one closed."""
    d, model = built
    n = _flood_size(2000)
    server = LiveServer(create_app(d / "idx", model), ServerLimits(max_connections=100, header_timeout=60))
    poller = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    socks: list[socket.socket] = []
    try:
        assert b" 200 " in _get_health(poller).split(b"\r\n")[0]
        socks = _flood(server.port, n)
        assert len(socks) > 400
        for _ in range(3):  # the same connection answers again, and again
            assert b" 200 " in _get_health(poller).split(b"\r\n")[0]
        assert socks[0].recv(1) == b""  # the oldest never-speaking socket was the one closed
    finally:
        poller.close()
        for s in socks:
            s.close()
        server.close()


class _Conn:
    """A stand-in for a uvicorn protocol: its request state and transport."""

    def __init__(self, busy: bool = False, sock: socket.socket | None = None) -> None:
        self.cycle = None if not busy else type("Cycle", (), {"response_complete": False})()
        self.closing = False
        self.transport = self
        self.sock = sock

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None


def test_idle_connections_evict_never_served_first_then_least_recently_active():
    idle = IdleConnections()
    a, b, c, new = _Conn(), _Conn(), _Conn(), _Conn()
    idle.waiting(a, served=True)
    idle.waiting(b, served=False)
    idle.waiting(c, served=True)
    idle.waiting(new, served=False)
    assert idle.victim(keep=new) is b  # never served, though younger than a
    idle.waiting(a, served=True)  # a finished another response: now more recent than c
    assert idle.victim(keep=new) is c
    assert idle.victim(keep=new) is a
    assert idle.victim(keep=new) is None  # only the newcomer is left
    busy = _Conn(busy=True)
    idle.waiting(busy, served=True)  # started a request after its last response: not idle
    assert idle.victim(keep=new) is None
    gone = _Conn()
    idle.waiting(gone, served=False)
    idle.forget(gone)
    assert idle.victim(keep=new) is None


def test_a_connection_whose_request_is_not_read_yet_is_not_idle():
    """The event loop runs a burst of accepts before earlier connections' reads: a socket with a
    request waiting in its buffer must not be taken for an idle one."""
    here, there = socket.socketpair()
    quiet_here, quiet_there = socket.socketpair()
    try:
        there.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        idle = IdleConnections()
        talking, quiet, new = _Conn(sock=here), _Conn(sock=quiet_here), _Conn()
        idle.waiting(talking, served=False)
        idle.waiting(quiet, served=False)
        idle.waiting(new, served=False)
        assert idle.victim(keep=new) is quiet
    finally:
        for s in (here, there, quiet_here, quiet_there):
            s.close()


def test_the_server_accepts_in_short_turns_from_a_deep_queue(built):
    d, model = built
    server = LiveServer(create_app(d / "idx", model))
    try:
        assert server.server.config.backlog == ACCEPT_BURST  # asyncio's accepts per event-loop turn
        ss = shutil.which("ss")
        if ss is None:
            pytest.skip("no `ss` to read the listening queue's depth")
        import subprocess

        out = subprocess.run([ss, "-lntH", f"sport = :{server.port}"], capture_output=True, text=True).stdout.split()
        assert int(out[2]) > ACCEPT_BURST, out  # Send-Q of a listening socket: its backlog
    finally:
        server.close()


def test_a_connection_that_sends_no_request_is_closed(built):
    d, model = built
    server = LiveServer(create_app(d / "idx", model), ServerLimits(header_timeout=0.3))
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # head never finished (slowloris)
        assert s.recv(100) == b""  # closed by the server, long before the 10 s socket timeout
        s.close()
    finally:
        server.close()


# --- the CLI: start-up errors before any banner ---------------------------------------------------


def serve(args, capsys):
    from clipforge.cli.main import main

    rc = main(["serve", "--model", "tiny-vit", "--random-init", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


def test_serve_startup_errors_are_one_line(built, capsys):
    d, _ = built
    idx = str(d / "idx")
    rc, out, err = serve(["--index", idx, "--port", "70000"], capsys)
    assert rc == 2 and len(err) == 1 and "--port" in err[0] and "70000" in err[0], err
    rc, out, err = serve(["--index", idx, "--host", "no-such-host.invalid", "--port", "0", "--insecure"], capsys)
    assert rc == 1 and len(err) == 1 and "no-such-host.invalid" in err[0] and "serving" not in out, err
    busy = bind_socket("127.0.0.1", 0)
    port = busy.getsockname()[1]
    try:
        rc, out, err = serve(["--index", idx, "--port", str(port)], capsys)
    finally:
        busy.close()
    assert rc == 1 and len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "serving" not in out, err


def test_serve_refuses_an_open_address_without_auth(built, capsys):
    d, _ = built
    rc, out, err = serve(["--index", str(d / "idx"), "--host", "0.0.0.0", "--port", "0"], capsys)
    assert rc == 1 and len(err) == 1 and "--insecure" in err[0] and "0.0.0.0" in err[0], err
    assert "serving" not in out


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.4")


def test_metrics_text_format():
    from clipforge.search.metrics import Metrics

    m = Metrics()
    m.counter("x_total", "things")
    m.histogram("lat_seconds", "latency", (0.1, 1.0))
    m.inc("x_total", route="/a", status="200")
    m.inc("x_total", 2, route="/a", status="200")
    for v in (0.05, 0.5, 5.0):
        m.observe("lat_seconds", v, route="/a")
    text = m.render()
    assert 'x_total{route="/a",status="200"} 3' in text
    assert 'lat_seconds_bucket{route="/a",le="0.1"} 1' in text and 'lat_seconds_bucket{route="/a",le="1"} 2' in text
    assert 'lat_seconds_bucket{route="/a",le="+Inf"} 3' in text and 'lat_seconds_count{route="/a"} 3' in text
    assert "# TYPE lat_seconds histogram" in text and json.dumps(text)
