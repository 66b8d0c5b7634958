"""End to end in a real browser: `clipforge serve` (uvicorn) on a free local port, the page driven by
headless Debian Chromium through Playwright. Skips when chromium or playwright is missing
(.ci/install-browser.sh installs both; never `playwright install`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clipforge.checkpoints import save_model
from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index
from clipforge.search.sources import ImageFolderSource
from search.searchutil import jpeg_bytes, make_image_folder, micro_model, pattern_image

CHROMIUM = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_or_skip():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"browser test needs Debian's chromium at {CHROMIUM} (run .ci/install-browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test needs the Python playwright package (run .ci/install-browser.sh)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sync_playwright = _browser_or_skip()
    d = tmp_path_factory.mktemp("web")
    model = micro_model()
    ckpt = save_model(model, d / "micro.safetensors")
    make_image_folder(d / "photos", n_good=14)
    embed_collection(model, ImageFolderSource(d / "photos"), d / "emb", shard_size=8, progress=False,
                     rank=0, world_size=1)
    build_index(d / "emb", d / "idx", n_queries=5, progress=False)
    return d, ckpt, sync_playwright


@contextlib.contextmanager
def _serving(d: Path, ckpt: Path, *extra: str):
    port = _free_port()
    log = open(d / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "clipforge.cli.main", "serve", "--index", str(d / "idx"),
                             "--model", str(ckpt), "--host", "127.0.0.1", "--port", str(port), "--max-k", "50",
                             "--log-level", "warning", *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"server did not start: {(d / f'server-{port}.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(built):
    d, ckpt, sync_playwright = built
    with _serving(d, ckpt) as url:
        yield url, d, sync_playwright


def _loaded_images(page) -> int:
    return page.evaluate("""() => [...document.querySelectorAll('#results .card img')]
                                   .filter(i => i.complete && i.naturalWidth > 0).length""")


def test_page_search_upload_and_click(server):
    url, d, sync_playwright = server
    query_img = d / "query.jpg"
    query_img.write_bytes(jpeg_bytes(pattern_image(7, (60, 48))))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('info').textContent.includes('images')")
            assert "14 images" in page.inner_text("#info")

            # type a query -> a grid of result thumbnails with scores
            page.select_option("#k", "10")
            page.fill("#query", "a striped picture")
            page.press("#query", "Enter")
            page.wait_for_selector("#results .card img")
            page.wait_for_function("[...document.querySelectorAll('#results .card img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("#results .card").count() == 10
            assert _loaded_images(page) == 10
            assert "10 results" in page.inner_text("#status")
            scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)
            assert "a striped picture" in page.inner_text("#query-label")

            # upload an image -> results for that image, its preview shown
            first_before = page.locator("#results .card").first.get_attribute("data-id")
            with page.expect_response(lambda r: r.url.endswith("/search") and r.request.method == "POST") as resp:
                page.set_input_files("#image-input", str(query_img))
            assert resp.value.status == 200
            page.wait_for_function("document.getElementById('query-label').textContent === 'query.jpg'")
            page.wait_for_function("document.getElementById('status').textContent.includes('results')")
            assert page.locator("#results .card").count() == 10
            assert page.locator("#query-thumb").is_visible()
            upload_ids = page.locator("#results .card").evaluate_all("els => els.map(e => e.dataset.id)")

            # click a result -> search by that item: it leaves the list, label names it
            target = page.locator("#results .card").nth(2)
            target_id = target.get_attribute("data-id")
            target_key = target.locator(".key").inner_text()
            with page.expect_response(lambda r: r.url.endswith("/search")) as resp2:
                target.click()
            assert resp2.value.status == 200
            page.wait_for_function(f"document.getElementById('query-label').textContent.startsWith({target_key!r})")
            page.wait_for_function("document.getElementById('status').textContent.includes('results')")
            after_ids = page.locator("#results .card").evaluate_all("els => els.map(e => e.dataset.id)")
            assert target_id not in after_ids and len(after_ids) == 10 and after_ids != upload_ids
            page.wait_for_function("[...document.querySelectorAll('#results .card img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")

            # an over-long query is searched on its first 77 tokens, and the page says so
            page.fill("#query", "word " * 90)
            with page.expect_response(lambda r: r.url.endswith("/search")) as resp3:
                page.press("#query", "Enter")
            assert resp3.value.status == 200
            page.wait_for_function("document.getElementById('status').textContent.includes('cut to')")
            assert "of 92 tokens" in page.inner_text("#status")
            assert not page.locator("#status").evaluate("e => e.classList.contains('error')")
            assert first_before is not None
            # no failed request (no missing asset, no JS error)
            assert console_errors == [], console_errors
        finally:
            browser.close()


def test_page_asks_for_the_token_and_sends_it(built):
    """A server started with --auth-token-file: the page loads without the token, asks for it,
    keeps it in sessionStorage and sends it with the search and the thumbnail requests."""
    d, ckpt, sync_playwright = built
    token = "s3cret-token-for-the-page-0123"
    (d / "token.txt").write_text(token + "\n")
    with _serving(d, ckpt, "--auth-token-file", str(d / "token.txt")) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            sent: list[tuple[str, str | None]] = []
            page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
            page.goto(url + "/")
            page.wait_for_selector("#token-form:not([hidden])")
            page.fill("#token", "wrong-token-wrong-token")
            page.press("#token", "Enter")
            page.fill("#query", "a striped picture")
            page.press("#query", "Enter")
            page.wait_for_function("document.getElementById('status').textContent.includes('refused this token')")
            page.wait_for_selector("#token-form:not([hidden])")
            page.fill("#token", token)
            page.press("#token", "Enter")
            assert page.evaluate("sessionStorage.getItem('clipforge-token')") == token
            page.select_option("#k", "10")
            page.fill("#query", "a striped picture")
            with page.expect_response(lambda r: r.url.endswith("/search")) as resp:
                page.press("#query", "Enter")
            assert resp.value.status == 200
            page.wait_for_function("[...document.querySelectorAll('#results .card img')].length === 10 && "
                                   "[...document.querySelectorAll('#results .card img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            assert "10 results" in page.inner_text("#status")
            thumbs = [a for u, a in sent if "/items/" in u]
            assert len(thumbs) == 10 and set(thumbs) == {f"Bearer {token}"}
            assert (url + "/search", f"Bearer {token}") in sent
        finally:
            browser.close()
