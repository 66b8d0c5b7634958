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
                ths = [threading.Thread(target=one, args=(i,)) for i in range(len(queries))]
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()
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
