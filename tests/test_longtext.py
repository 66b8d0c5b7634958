"""Text past the 77-token context: ``tokenize(long_text=...)`` and ``encode_text_long``.

Long texts here are synthetic scene descriptions whose deciding caption comes after a filler
paragraph longer than the context, so a strategy that keeps only the start cannot see it."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.data.scenes import make_scene, retrieval_captions
from clipforge.inference import embed_texts
from clipforge.longtext import encode_text_long, pool_windows
from clipforge.tokenizer import (
    LongTextWarning,
    TextWindows,
    clean_text,
    get_tokenizer,
    plan_windows,
    tokenize,
)

FILLER = ("This is one of the drawings in the collection. It was made for a test of long captions, "
          "and the sentences before the last one say nothing about what is drawn. The background is "
          "textured, the light is even, and nothing else is in the frame. The shapes were drawn by a "
          "program with flat colours and sharp edges, at one of two sizes. Read on to the end, where "
          "the one sentence that matters describes the picture: ")
SHORT = ["a red circle", "two blue squares above a star", "", "a photo of a dog."]


def _scene_paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    caps: list[str] = []
    while len(caps) < n:
        cap = retrieval_captions(make_scene(rng))[0]
        if cap not in caps:
            caps.append(cap)
    return [FILLER + c + "." for c in caps]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(77)


@pytest.fixture(scope="module")
def model():
    from conftest import micro_config

    return clipforge.create_model(micro_config("vit"), seed=0).eval()


def test_filler_alone_exceeds_the_context(tok):
    assert len(tok.encode(FILLER)) + 2 > 77  # the deciding caption is entirely past token 77


# --- <= 77 tokens: exactly the plain encoding ------------------------------------------------------

def test_short_texts_tokenize_as_plain_rows(tok):
    win = tok.tokenize(SHORT, long_text="chunks")
    assert isinstance(win, TextWindows)
    assert win.texts == SHORT and win.windows_per_text.tolist() == [1] * len(SHORT)
    assert torch.equal(win.ids, tokenize(SHORT))


def test_short_texts_encode_bitwise_as_plain(model):
    assert torch.equal(encode_text_long(model, SHORT, long_text="chunks"), embed_texts(model, SHORT))


def test_short_texts_next_to_long_ones_within_1e6(model):
    texts = _scene_paragraphs(3) + SHORT
    got = encode_text_long(model, texts, long_text="chunks")
    plain = embed_texts(model, SHORT)
    assert (got[3:] - plain).abs().max().item() <= 1e-6  # same text, other batch shapes
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)


def test_exactly_77_tokens_is_one_window(tok, model):
    words = ["dog"] * 75  # "dog" is one BPE token: 75 + start + end = 77
    text = " ".join(words)
    assert len(tok.encode(text)) == 75
    assert tok.windows([text]).windows_per_text.tolist() == [1]
    assert torch.equal(encode_text_long(model, [text]), embed_texts(model, [text]))
    assert tok.windows([text + " dog"]).windows_per_text.tolist() == [2]


# --- windows: whole words, within the context, covering the text ------------------------------------

LONG_TEXTS = [
    FILLER + "a small red circle to the left of a large blue square.",
    " ".join(f"word{i}!~" for i in range(120)),  # "!" before "~" is token id 0, the padding id
    " ".join(f"Crème brûlée nº{i}, naïve café — déjà vu!" for i in range(12)),
    ("see https://example.com/" + "a1b2c3d4" * 40 + " for details. ") * 2,  # one word longer than a window
]


def test_word_ids_concatenate_to_encode(tok):
    for text in LONG_TEXTS + SHORT:
        assert [i for _, ids in tok.word_ids(text) for i in ids] == tok.encode(text)


@pytest.mark.parametrize("overlap", [0, 16, 37])
def test_windows_are_whole_words_within_the_context(tok, overlap):
    win = tok.windows(LONG_TEXTS, 77, overlap=overlap)
    assert win.ids.shape[1] == 77
    assert win.text_index.tolist() == sorted(win.text_index.tolist())
    for i, text in enumerate(LONG_TEXTS):
        rows = (win.text_index == i).nonzero().flatten().tolist()
        assert len(rows) >= 2
        words = clean_text(text).split(" ")
        starts, ends = [], []
        for r in rows:
            n = int(win.ids[r].argmax()) + 1
            assert n <= 77 and win.ids[r, 0] == tok.sot_token and win.ids[r, n - 1] == tok.eot_token
            assert not win.ids[r, n:].any()
            assert int(win.lengths[r]) == n - 2
            if i == 3:
                continue  # the over-long word is cut inside; checked below
            w = win.texts[r].split(" ")
            # a contiguous run of whole words of the cleaned text
            s = next(j for j in range(starts[-1] + 1 if starts else 0, len(words)) if words[j:j + len(w)] == w)
            starts.append(s)
            ends.append(s + len(w))
            assert int(win.lengths[r]) == sum(len(tok.encode(x)) for x in w)
        if i == 3:
            continue
        assert starts[0] == 0 and ends[-1] == len(words)
        for k in range(1, len(starts)):
            assert starts[k - 1] < starts[k] <= ends[k - 1]  # advances, no gap
            shared = words[starts[k]:ends[k - 1]]
            assert sum(len(tok.encode(x)) for x in shared) <= overlap


def test_a_word_longer_than_a_window_is_cut_inside(tok):
    text = LONG_TEXTS[3]
    win = tok.windows([text])
    assert win.windows_per_text.tolist()[0] >= 4
    assert all(int(row.argmax()) < 77 for row in win.ids) and (win.lengths <= 75).all()
    joined = "".join(win.texts).replace(" ", "")
    assert "a1b2c3d4" * 5 in joined and "details" in joined


def test_plan_windows_by_hand():
    assert plan_windows([3, 3, 3, 3], 7, 3) == [(0, 2), (1, 3), (2, 4)]
    assert plan_windows([3, 3, 3, 3], 7, 0) == [(0, 2), (2, 4)]
    assert plan_windows([5, 1, 1, 5], 7, 2) == [(0, 3), (1, 4)]
    assert plan_windows([], 75, 16) == [(0, 0)]


# --- weights ------------------------------------------------------------------------------------------

def test_pool_weights_by_window_length_after_normalising():
    win = TextWindows(texts=["a", "b", "c", "d"], ids=torch.zeros(4, 77, dtype=torch.long),
                      text_index=torch.tensor([0, 0, 1, 2]), lengths=torch.tensor([3, 1, 5, 2]), num_texts=3)
    emb = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.6, 0.8], [0.3, 0.4]])  # rows 0, 1, 3 not unit
    out = pool_windows(emb, win)
    expected0 = torch.tensor([3.0, 1.0]) / 10 ** 0.5
    assert torch.allclose(out[0], expected0, atol=1e-7)
    assert torch.equal(out[1], emb[2]) and torch.equal(out[2], emb[3])  # single windows pass through as given


def test_chunks_average_of_window_embeddings(tok, model):
    texts = _scene_paragraphs(2)
    win = tok.windows(texts)
    w_emb = embed_texts(model, win.texts)
    got = encode_text_long(model, texts, long_text="chunks")
    for i in range(2):
        rows = win.text_index == i
        ref = F.normalize((w_emb[rows] * win.lengths[rows, None].float()).sum(0), dim=0)
        assert torch.allclose(got[i], ref, atol=1e-6)


# --- truncate: keeps the start and says how much was cut -------------------------------------------

def test_tokenize_truncate_warns_with_counts(tok):
    texts = SHORT[:2] + LONG_TEXTS[:2]
    counts = [len(tok.encode(t)) + 2 for t in texts]
    with pytest.warns(LongTextWarning) as rec:
        got = tokenize(texts, long_text="truncate")
    w = rec[0].message
    assert w.cut == {2: counts[2], 3: counts[3]} and w.context_length == 77
    assert "2 of 4 texts" in str(w) and f"text 2: {counts[2]} tokens, {counts[2] - 77} cut" in str(w)
    assert torch.equal(got, tokenize(texts, truncate=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(texts, truncate=True)  # OpenAI's spelling stays silent
        tokenize(SHORT, long_text="truncate")  # nothing cut, nothing said


def test_truncate_loses_the_detail_chunks_keeps_it(model):
    texts = _scene_paragraphs(4)
    with pytest.warns(LongTextWarning, match="4 of 4 texts"):
        cut = encode_text_long(model, texts, long_text="truncate")
    assert torch.equal(cut, embed_texts(model, texts, truncate=True))
    assert all(torch.equal(cut[0], cut[i]) for i in range(1, 4))  # the captions are past the cut
    kept = encode_text_long(model, texts, long_text="chunks")
    sims = kept @ kept.T
    assert (sims - torch.eye(4)).abs().max() < 1 and sims[~torch.eye(4, dtype=torch.bool)].max() < 1 - 1e-4


# --- error: OpenAI's behaviour, the default ----------------------------------------------------------

def test_error_names_index_and_length(tok, model):
    texts = SHORT[:2] + LONG_TEXTS[1:2]
    n = len(tok.encode(LONG_TEXTS[1])) + 2
    for call in (lambda: tokenize(texts), lambda: tokenize(texts, long_text="error"),
                 lambda: encode_text_long(model, texts, long_text="error")):
        with pytest.raises(ValueError, match=f"text at index 2 has {n} tokens .*context length 77"):
            call()


def test_bad_options_refused(tok):
    with pytest.raises(ValueError, match="long_text must be one of error, truncate, chunks"):
        tokenize("a dog", long_text="wrap")
    with pytest.raises(ValueError, match="truncate=True contradicts long_text='chunks'"):
        tokenize("a dog", truncate=True, long_text="chunks")
    with pytest.raises(ValueError, match=r"overlap must be an integer in 0\.\.37"):
        tokenize("a dog", long_text="chunks", overlap=38)
    with pytest.raises(TypeError, match="text at index 1 is int"):
        tok.windows(["a", 3])  # type: ignore[list-item]


# --- pass-through: eval, search, embed CLI ------------------------------------------------------------

def test_eval_zeroshot_head_with_long_prompts(model, tmp_path):
    from clipforge.eval import ZeroShotClassifier

    names = ["circle", "square"]
    tmpl = [FILLER + "a drawing of a {}."]
    chunked = ZeroShotClassifier(model, names, tmpl, cache_dir=tmp_path, long_text="chunks")
    with pytest.warns(LongTextWarning, match="2 of 2 texts"):
        cut = ZeroShotClassifier(model, names, tmpl, cache_dir=tmp_path, long_text="truncate")
    assert chunked.cache_key != cut.cache_key
    assert torch.equal(cut.weights[0], cut.weights[1])  # the class name is past the cut
    assert not torch.allclose(chunked.weights[0], chunked.weights[1], atol=1e-4)
    prompts = [tmpl[0].format(n) for n in names]
    assert torch.allclose(chunked.weights, encode_text_long(model, prompts), atol=1e-6)


def test_eval_retrieval_features_with_long_captions(model):
    from clipforge.eval.retrieval import embed_pairs

    caps = _scene_paragraphs(3)
    from PIL import Image

    imgs = [Image.new("RGB", (32, 32), (80 * i, 40, 200)) for i in range(3)]
    pf = embed_pairs(model, list(zip(imgs, [[c] for c in caps])), long_text="chunks")
    assert pf.skipped == 0
    assert torch.allclose(pf.text_features, encode_text_long(model, caps), atol=1e-6)


@pytest.fixture(scope="module")
def text_collection(tmp_path_factory, model):
    pytest.importorskip("faiss")
    pytest.importorskip("pyarrow")
    from clipforge.checkpoints import save_model
    from clipforge.cli.main import main

    d = tmp_path_factory.mktemp("longtext_cli")
    ckpt = save_model(model, d / "micro.safetensors")
    texts = _scene_paragraphs(4) + SHORT[:2] + SHORT[3:]
    (d / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert main(["embed", "--model", str(ckpt), "--texts", str(d / "texts.txt"), "--out", str(d / "emb"),
                 "--long-text", "chunks", "--long-text-overlap", "8", "--no-progress"]) == 0
    assert main(["index", "--embeddings", str(d / "emb"), "--out", str(d / "idx"), "--no-progress"]) == 0
    return d, ckpt, texts


def test_cli_embed_texts_chunks(text_collection, model):
    d, _, texts = text_collection
    man = json.loads((d / "emb" / "manifest.json").read_text())
    assert man["long_text"] == "chunks" and man["long_text_overlap"] == 8
    emb = np.concatenate([np.load(p) for p in sorted((d / "emb" / "text_emb").glob("*.npy"))]).astype(np.float32)
    ref = encode_text_long(model, texts, long_text="chunks", overlap=8).numpy()
    assert emb.shape == ref.shape and np.abs(emb - ref).max() < 2e-3  # stored as float16


def test_cli_embed_refuses_a_resume_with_another_mode(text_collection, capsys):
    d, ckpt, _ = text_collection
    from clipforge.cli.main import main

    capsys.readouterr()
    assert main(["embed", "--model", str(ckpt), "--texts", str(d / "texts.txt"), "--out", str(d / "emb"),
                 "--long-text", "truncate", "--no-progress"]) == 1
    assert "different long_text ('chunks' vs now 'truncate')" in capsys.readouterr().err


def test_cli_embed_texts_error_names_the_key(text_collection, tmp_path, capsys):
    d, ckpt, _ = text_collection
    from clipforge.cli.main import main

    capsys.readouterr()
    assert main(["embed", "--model", str(ckpt), "--texts", str(d / "texts.txt"), "--out", str(tmp_path / "e"),
                 "--long-text", "error", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the model's context length 77 (4 such texts" in err[0]


def test_cli_search_long_query(text_collection, capsys):
    d, ckpt, texts = text_collection
    from clipforge.cli.main import main

    base = ["search", "--index", str(d / "idx"), "--model", str(ckpt), "-k", "2", "--json"]
    capsys.readouterr()
    assert main(base + [texts[2]]) == 1  # default: error, as before
    assert "tokens (with start/end)" in capsys.readouterr().err
    assert main(base + ["--long-text", "chunks", "--long-text-overlap", "8", texts[2]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["caption"] == texts[2] and out["results"][0]["score"] > 0.999


def test_cli_eval_passes_the_option(monkeypatch, tmp_path, model):
    from clipforge.checkpoints import save_model
    from clipforge.cli.main import main
    from clipforge.eval import tasks

    seen = {}

    def fake(ctx, dataset, **kw):
        seen.update(long_text=ctx.long_text, overlap=ctx.long_text_overlap)
        return ctx.record("fake", "zeroshot_retrieval", {"image_retrieval_recall@1": 0.0})

    monkeypatch.setattr(tasks, "run_retrieval", fake)
    ckpt = save_model(model, tmp_path / "m.safetensors")
    assert main(["eval", "retrieval", "--model", str(ckpt), "--dataset", "builtin:scenes", "--out",
                 str(tmp_path / "out"), "--long-text", "chunks", "--long-text-overlap", "4", "--no-progress"]) == 0
    assert seen == {"long_text": "chunks", "overlap": 4}
    rec = json.loads(next((tmp_path / "out").rglob("*.json")).read_text())
    assert rec["long_text"] == {"mode": "chunks", "overlap": 4}
