"""Text past 77 tokens: what ``truncate`` and ``chunks`` keep, and what ``chunks`` costs.

Gallery: N long scene descriptions, a filler paragraph longer than the context followed by one
distinguishing builtin-scenes caption (so the deciding detail starts after token 77). Text only,
no training: a random-init text tower (the strategies' *information* argument does not depend on
the weights; retrieval quality does, so R@1 here only shows what can still be told apart).

Reports: distinct gallery embeddings under each strategy; caption -> paragraph R@1 (ties counted
against the query); windows per text; time of ``chunks`` relative to ``truncate`` on the same texts.

    python benchmarks/longtext.py               # 200 texts, tiny-vit text tower (a few seconds)
    python benchmarks/longtext.py --model ViT-B-32 --n 200
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch

import clipforge
from clipforge.data.scenes import make_scene, retrieval_captions
from clipforge.tokenizer import LongTextWarning, get_tokenizer

FILLER = ("This is one of the drawings in the collection. It was made for a test of long captions, "
          "and the sentences before the last one say nothing about what is drawn. The background is "
          "textured, the light is even, and nothing else is in the frame. The shapes were drawn by a "
          "program with flat colours and sharp edges, at one of two sizes. Read on to the end, where "
          "the one sentence that matters describes the picture: ")


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        c = retrieval_captions(make_scene(rng))[0]
        if c not in out:
            out.append(c)
    return out


def recall_at_1(queries: torch.Tensor, gallery: torch.Tensor) -> float:
    """Query i's match is gallery i; an equal score elsewhere counts as a miss (pessimistic ties)."""
    s = queries @ gallery.T
    own = s.diag()
    beaten = (s >= own[:, None]).sum(dim=1) - 1
    return float((beaten == 0).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = clipforge.create_model(a.model, seed=0).eval()
    caps = captions(a.n)
    paras = [FILLER + c + "." for c in caps]
    tok = get_tokenizer(model.context_length)
    counts = tok.token_counts(paras)
    win = tok.windows(paras, model.context_length, overlap=a.overlap)
    per = win.windows_per_text.float()
    print(f"{a.model}, {a.n} paragraphs: {min(counts)}-{max(counts)} tokens (mean {sum(counts) / len(counts):.0f}); "
          f"filler alone {len(tok.encode(FILLER)) + 2}")
    print(f"chunks (overlap {a.overlap}): {per.mean():.2f} windows per text ({int(per.min())}-{int(per.max())}), "
          f"{int(win.lengths.sum())} window tokens for {sum(c - 2 for c in counts)} text tokens")
    q = clipforge.embed_texts(model, caps)
    clipforge.encode_text_long(model, paras[:8], long_text="chunks")  # warm-up
    times: dict[str, float] = {}
    emb: dict[str, torch.Tensor] = {}
    for mode in ("truncate", "chunks", "truncate", "chunks"):  # alternate; keep the faster of two runs
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LongTextWarning)
            emb[mode] = clipforge.encode_text_long(model, paras, long_text=mode, overlap=a.overlap)
        dt = time.perf_counter() - t0
        times[mode] = min(times.get(mode, float("inf")), dt)
    for mode in ("truncate", "chunks"):
        distinct = len({tuple(r.tolist()) for r in emb[mode]})
        print(f"{mode:9s} distinct gallery embeddings {distinct:4d}/{a.n}   caption->paragraph R@1 "
              f"{recall_at_1(q, emb[mode]):.3f}   {times[mode] * 1000:.0f} ms")
    print(f"chunks / truncate time: {times['chunks'] / times['truncate']:.2f}x")


if __name__ == "__main__":
    main()
