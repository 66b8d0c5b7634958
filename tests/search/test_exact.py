"""Batch-invariant query encoding, checked on this CPU: a text or image encoded alone has exactly
the bits it has inside batches of other sizes, at other positions, next to other companions; and
the served /embed answers with the same bits batched (max_batch 32) as alone (max_batch 1)."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
import torch

from clipforge.loading import load_for_inference
from clipforge.search.exact import TEXT_TOKENS, _pack, encode_images_exact, encode_texts_exact, packs_text
from clipforge.tokenizer import get_tokenizer
from clipforge.utils import torch_threads

WORDS = "dog cat beach red blue car tree house river mountain city night snow bird flower street boat".split()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)  # lengths from 2 to 40 words: several length buckets
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 41)))) for _ in range(n)]


@pytest.fixture(autouse=True)
def one_thread(request):
    """1 thread keeps a busy CI machine fast; the slow ViT-B/32 cases run at torch's own count."""
    with torch_threads(None if request.node.get_closest_marker("slow") else 1):
        yield


def all_at_once(one, n: int) -> None:
    """``one(i)`` for every ``i < n``, each from its own thread, all started before any is joined."""
    ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()


def assert_batch_invariant(encode, queries, others) -> None:
    alone = [encode([q])[0] for q in queries]
    rng = np.random.default_rng(0)
    for size in (2, 5, 11):
        for q, ref in zip(queries, alone):
            for pos in sorted({0, size - 1}):
                comp = [others[int(j)] for j in rng.choice(len(others), size - 1, replace=False)]
                batch = comp[:pos] + [q] + comp[pos:]
                got = encode(batch)[pos]
                assert torch.equal(got, ref), f"query moved in bits: batch of {size}, position {pos}"


@pytest.mark.parametrize("arch", ["tiny-vit", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_text_bits_do_not_depend_on_the_batch(arch):
    model, _ = load_for_inference(arch, random_init=True, seed=0)
    tok = get_tokenizer().tokenize
    queries = ["a dog", "a photo of a red car parked on a street at night", " ".join(["river"] * 30), " ".join(["dog"] * 90)]
    assert_batch_invariant(lambda t: encode_texts_exact(model, t, tok), queries, texts(40, 1))


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_image_bits_do_not_depend_on_the_batch(arch):
    model, _ = load_for_inference(arch, random_init=True, seed=0)
    g = torch.Generator().manual_seed(0)
    imgs = list(torch.randn(30, 3, model.image_size, model.image_size, generator=g))
    assert_batch_invariant(lambda x: encode_images_exact(model, x), imgs[:3], imgs[3:])


def test_exact_features_are_the_model_features():
    """Padding and buckets change only the last bits, never the meaning."""
    model, _ = load_for_inference("tiny-vit", random_init=True, seed=0)
    t = texts(9, 3)
    ref = model.encode_text(get_tokenizer().tokenize(t, model.context_length, truncate=True), normalize=True)
    torch.testing.assert_close(encode_texts_exact(model, t, get_tokenizer().tokenize), ref, rtol=0, atol=1e-5)
    x = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(encode_images_exact(model, list(x)), model.encode_image(x, normalize=True),
                               rtol=0, atol=1e-5)


def test_packing():
    """First fit in order; a text over the chunk alone in a context-length chunk; every text once."""
    assert _pack([10, 20, 30, 5, 70, 64, 1], 64, 77) == [(64, [0, 1, 2]), (64, [3]), (77, [4]), (64, [5]), (64, [6])]
    lengths = [int(n) for n in np.random.default_rng(0).integers(2, 78, 200)]
    chunks = _pack(lengths, TEXT_TOKENS, 77)
    assert sorted(i for _, part in chunks for i in part) == list(range(200))
    assert all(sum(lengths[i] for i in part) <= rows for rows, part in chunks)


def test_packing_needs_our_text_tower():
    model, _ = load_for_inference("tiny-vit", random_init=True, seed=0)
    assert packs_text(model)
    model.text.transformer.resblocks[0] = torch.nn.Identity()
    assert not packs_text(model)
    with pytest.raises(ValueError, match="packed exact encoding needs"):
        encode_texts_exact(model, ["a dog"])


def test_served_embeddings_have_the_same_bits_batched_or_alone(tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.fast import optimize_for_inference
    from clipforge.search.service import create_app
    from search.searchutil import photo_index

    model, pre = optimize_for_inference(photo_index(tmp_path)), None  # the fast towers, as served
    queries = texts(24, 5)

    def served(max_batch: int, concurrent: bool) -> list[bytes]:
        app = create_app(tmp_path / "idx", model, pre, max_batch=max_batch, batch_wait_ms=50.0, uploads=False,
                         encode_threads=1)
        out: dict[int, bytes] = {}
        with TestClient(app) as c:
            def one(i: int) -> None:
                r = c.post("/embed", json={"texts": [queries[i]], "encoding": "base64"})
                assert r.status_code == 200, r.text
                out[i] = base64.b64decode(r.json()["texts"][0])
            if concurrent:
                all_at_once(one, len(queries))
                r = c.post("/embed", json={"texts": queries, "encoding": "base64"})  # one request, one batch
                assert [base64.b64decode(v) for v in r.json()["texts"]] == [out[i] for i in range(len(queries))]
                assert app.state.batchers["text"].batches < app.state.batchers["text"].items  # batches formed
            else:
                for i in range(len(queries)):
                    one(i)
        return [out[i] for i in range(len(queries))]

    assert served(32, True) == served(1, False)


def test_knn_service_queries_ride_the_batchers(tmp_path):
    """clip-retrieval's /knn-service embeds through the same batchers (hence the same bits) as /search."""
    from fastapi.testclient import TestClient

    from clipforge.fast import optimize_for_inference
    from clipforge.search.service import create_app
    from search.searchutil import jpeg_bytes, pattern_image, photo_index

    model = optimize_for_inference(photo_index(tmp_path))
    app = create_app(tmp_path / "idx", model, None, uploads=False, encode_threads=1, query_cache=0)
    with TestClient(app) as c:
        b = app.state.batchers
        knn = c.post("/knn-service", json={"text": "a striped picture", "modality": "image", "num_images": 5,
                                           "indice_name": None})
        assert knn.status_code == 200, knn.text
        assert (b["text"].items, b["image"].items) == (1, 0)
        search = c.post("/search", json={"text": "a striped picture", "k": 5}).json()["results"]
        assert [r["id"] for r in knn.json()] == [r["id"] for r in search]
        assert [round(r["similarity"], 6) for r in knn.json()] == [r["score"] for r in search]
        img = base64.b64encode(jpeg_bytes(pattern_image(3, (50, 40)))).decode()
        knn = c.post("/knn-service", json={"image": img, "modality": "image", "num_images": 3, "indice_name": None})
        assert knn.status_code == 200, knn.text
        assert (b["text"].items, b["image"].items) == (2, 1)


# --- batched searches of an exact index --------------------------------------------------------------
def flat_index(n: int, d: int, seed: int):
    import faiss

    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.index_factory(d, "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    return index, x


def test_search_finds_what_faiss_finds_with_bits_of_its_own(monkeypatch):
    """Blocks of stored vectors merged (a small SCAN_BLOCK, N not a multiple of it), the hits of
    FAISS's own search (ids equal, scores to float32 rounding), and a query's scores and ids the
    same alone and in batches of 2, 5, 11 and 17 at the first and last position."""
    import types

    from clipforge.search import exact

    monkeypatch.setattr(exact, "SCAN_BLOCK", 1000)
    index, x = flat_index(2500, 32, 0)
    vectors = exact.flat_vectors(types.SimpleNamespace(index=index))
    assert vectors is not None and vectors.shape == (2500, 32)
    assert torch.equal(vectors, torch.from_numpy(x))
    q = torch.from_numpy(np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32))
    scores, ids = exact.search_flat_exact(vectors, q, 50)
    f_scores, f_ids = index.search(q.numpy(), 50)
    assert np.array_equal(ids.numpy(), f_ids)
    assert np.abs(scores.numpy() - f_scores).max() < 1e-5

    def one(batch: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s, i = exact.search_flat_exact(vectors, torch.stack(batch), 50)
        return list(zip(s, i))

    alone = [one([v])[0] for v in q[:3]]
    rng = np.random.default_rng(0)
    for size in (2, 5, 11, 17):
        for v, (ref_s, ref_i) in zip(q[:3], alone):
            for pos in (0, size - 1):
                comp = [q[int(j)] for j in rng.choice(np.arange(3, 20), size - 1, replace=False)]
                got_s, got_i = one(comp[:pos] + [v] + comp[pos:])[pos]
                assert torch.equal(got_s, ref_s) and torch.equal(got_i, ref_i), f"batch of {size}, position {pos}"


def test_search_skips_deleted_ids_and_lists_ties_by_id():
    import faiss

    from clipforge.search.exact import flat_vectors, search_flat_exact

    assert flat_vectors(object()) is None
    l2 = faiss.IndexFlatL2(8)
    l2.add(np.eye(8, dtype=np.float32))
    assert flat_vectors(type("L", (), {"index": l2})()) is None  # only inner products
    ip = faiss.IndexFlatIP(8)
    ip.add(np.eye(8, dtype=np.float32))
    assert torch.equal(flat_vectors(type("L", (), {"index": ip})()), torch.eye(8))
    ivf = faiss.index_factory(8, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    assert flat_vectors(type("L", (), {"index": ivf})()) is None  # approximate indexes search themselves
    assert flat_vectors(type("L", (), {"index": None})()) is None  # e.g. Milvus: no faiss index
    x = np.eye(8, dtype=np.float32)[[0, 1, 1, 2, 1, 3]]  # ids 1, 2 and 4 hold the same vector
    vectors = torch.from_numpy(x)
    q = torch.from_numpy(np.eye(8, dtype=np.float32)[[1]])
    scores, ids = search_flat_exact(vectors, q, 4)
    assert ids[0, :3].tolist() == [1, 2, 4] and scores[0, :3].tolist() == [1.0, 1.0, 1.0]
    skip = torch.zeros(6, dtype=torch.bool)
    skip[[2, 3, 5]] = True
    scores, ids = search_flat_exact(vectors, q, 6, skip)
    assert ids[0].tolist() == [1, 4, 0, -1, -1, -1]
    assert torch.isneginf(scores[0, 3:]).all()


def test_served_searches_have_the_same_hits_batched_or_alone(tmp_path):
    """/search of 16 texts sent at once to a --max-batch 32 server (search batches formed): each
    has the hits (ids and score bits) it gets alone, and the ids FAISS gives a --max-batch 1 server
    (its scores to the rounding of a different summation order); a search by item leaves the item out."""
    from fastapi.testclient import TestClient

    from clipforge.fast import optimize_for_inference
    from clipforge.search.service import create_app
    from search.searchutil import photo_index

    model = optimize_for_inference(photo_index(tmp_path))
    queries = texts(16, 9)

    def served(max_batch: int, concurrent: bool) -> list[list[tuple[int, float]]]:
        app = create_app(tmp_path / "idx", model, None, max_batch=max_batch, batch_wait_ms=50.0, uploads=False,
                         encode_threads=1)
        assert app.state.searcher._flat is not None  # an exact index: searched by search_flat_exact when batched
        out: dict[int, list[tuple[int, float]]] = {}
        with TestClient(app) as c:
            def one(i: int) -> None:
                r = c.post("/search", json={"text": queries[i], "k": 6})
                assert r.status_code == 200, r.text
                out[i] = [(h["id"], h["score"]) for h in r.json()["results"]]
            if concurrent:
                all_at_once(one, len(queries))
                b = app.state.search_batchers
                assert sum(x.batches for x in b.values()) < sum(x.items for x in b.values()) == len(queries)
                alone = dict(out)
                for i in range(len(queries)):
                    one(i)
                assert out == alone
                item = c.post("/search", json={"item_id": 3, "k": 4}).json()["results"]
                assert len(item) == 4 and 3 not in [h["id"] for h in item]
            else:
                assert app.state.search_batchers == {}
                for i in range(len(queries)):
                    one(i)
        return [out[i] for i in range(len(queries))]

    batched, faiss_alone = served(32, True), served(1, False)
    assert [[i for i, _ in r] for r in batched] == [[i for i, _ in r] for r in faiss_alone]
    assert max(abs(s - t) for r, f in zip(batched, faiss_alone) for (_, s), (_, t) in zip(r, f)) <= 2e-6


@pytest.mark.parametrize("flag, batched", [([], True), (["--no-batch-searches"], False)])
def test_serve_batch_searches_switch(tmp_path, monkeypatch, flag, batched):
    """``clipforge serve --no-batch-searches``: no search batchers (each query by FAISS in a worker);
    /health says which."""
    from fastapi.testclient import TestClient

    from clipforge.cli.main import main
    from search.searchutil import photo_index

    from clipforge.checkpoints import save_model

    ckpt = save_model(photo_index(tmp_path), tmp_path / "micro.safetensors")
    seen = {}

    def run_instead(app, *a, **k):
        class Server:
            def run(self, sockets=None):
                with TestClient(app) as c:
                    seen["search"] = c.post("/search", json={"text": "a dog", "k": 3}).status_code
                    seen["health"] = c.get("/health").json()["batching"]
        return Server()

    monkeypatch.setattr("clipforge.search.server.uvicorn_server", run_instead)
    rc = main(["serve", "--index", str(tmp_path / "idx"), "--model", str(ckpt), "--port", "0", "--no-uploads", *flag])
    assert rc == 0 and seen["search"] == 200
    assert seen["health"]["batch_searches"] is batched
    assert (seen["health"]["search"]["items"] == 1) is batched
