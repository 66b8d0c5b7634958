"""Tokenizer speed: clipforge vs OpenAI's SimpleTokenizer vs HF's fast CLIP tokenizer.

Texts/s on Flickr8k captions, cold (a fresh tokenizer instance, so no cached words or texts;
construction time reported apart) and warm (the same texts again on that instance), median of
``--reps`` repetitions. clipforge's ids must equal OpenAI's exactly (the script fails otherwise);
HF's are counted, not asserted (it skips ftfy/HTML unescaping, so it is not a reference).

    python benchmarks/tokenizer.py [--data ../shared/data] [--n 10000] [--reps 5]

Writes benchmarks/results/tokenizer.json.
"""

from __future__ import annotations

import argparse
import gzip
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import openai_reference_module  # noqa: E402


def load_captions(data: Path, n: int) -> list[str]:
    path = data / "flickr8k" / "captions.tsv"
    with open(path, encoding="utf-8") as f:
        col = f.readline().rstrip("\n").split("\t").index("caption")
        caps = [line.rstrip("\n").split("\t")[col] for line in f]
    return caps[:n]


def load_openai() -> Any | None:
    """OpenAI's clip/simple_tokenizer.py by file path (``import clip`` needs torchvision)."""
    return openai_reference_module("simple_tokenizer")


def build_hf(encoder: dict[str, int]) -> tuple[Any | None, str]:
    """HF's fast CLIP tokenizer from clipforge's shipped vocabulary and merges (offline)."""
    try:
        from transformers import CLIPTokenizerFast
    except Exception as e:  # noqa: BLE001 - any import failure means "skip"
        return None, f"transformers not importable: {e}"
    raw = gzip.decompress((resources.files("clipforge") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes())
    merges = [tuple(m.split()) for m in raw.decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
    try:
        tok = CLIPTokenizerFast(vocab=dict(encoder), merges=merges)
    except TypeError:  # transformers < 5 takes files only
        import json
        import tempfile

        d = Path(tempfile.mkdtemp())
        (d / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizerFast(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"))
    probe = tok("a photo of a dog", add_special_tokens=False)["input_ids"]
    if probe != [320, 1125, 539, 320, 1929]:
        return None, f"HF tokenizer built from our vocab gives unexpected ids {probe}"
    return tok, ""


def bench(name: str, make: Callable[[], Any], encode_all: Callable[[Any, list[str]], list[list[int]]],
          texts: list[str], reps: int) -> tuple[dict[str, Any], list[list[int]]]:
    init, cold, warm = [], [], []
    ids: list[list[int]] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tok = make()
        t1 = time.perf_counter()
        ids = encode_all(tok, texts)
        t2 = time.perf_counter()
        encode_all(tok, texts)
        t3 = time.perf_counter()
        init.append(t1 - t0), cold.append(t2 - t1), warm.append(t3 - t2)
    n = len(texts)
    row = {
        "tokenizer": name,
        "init_s": statistics.median(init),
        "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "cold_texts_per_s": n / statistics.median(cold),
        "warm_texts_per_s": n / statistics.median(warm),
    }
    return row, [list(x) for x in ids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tokenizer.json")
    args = ap.parse_args(argv)

    from clipforge.tokenizer import Tokenizer
    from clipforge.utils import write_json

    texts = load_captions(args.data, args.n)
    rows, notes = [], []
    ours_row, ours_ids = bench("clipforge", Tokenizer, lambda t, xs: [t.encode(x) for x in xs], texts, args.reps)
    rows.append(ours_row)

    oai_mod = load_openai()
    if oai_mod is None:
        notes.append("OpenAI SimpleTokenizer skipped: clip-anytorch not installed")
        oai_row = None
    else:
        oai_row, oai_ids = bench("openai SimpleTokenizer", oai_mod.SimpleTokenizer,
                                 lambda t, xs: [t.encode(x) for x in xs], texts, args.reps)
        mism = sum(a != b for a, b in zip(ours_ids, oai_ids))
        if mism:
            print(f"FAIL: {mism}/{len(texts)} texts give different ids than OpenAI's tokenizer", file=sys.stderr)
            return 1
        oai_row["mismatches_vs_openai"] = 0
        ours_row["mismatches_vs_openai"] = 0
        rows.append(oai_row)

    probe_tok = Tokenizer()
    hf, why = build_hf(probe_tok.encoder)
    if hf is None:
        notes.append(f"HF CLIPTokenizerFast skipped: {why}")
    else:
        hf_row, hf_ids = bench(
            "HF CLIPTokenizerFast (batch, Rust threads)",
            lambda: build_hf(probe_tok.encoder)[0],
            lambda t, xs: t(xs, add_special_tokens=False)["input_ids"], texts, args.reps)
        hf_row["mismatches_vs_openai"] = sum(a != b for a, b in zip(hf_ids, ours_ids))
        rows.append(hf_row)
        raw_row, raw_ids = bench(
            "HF tokenizers backend encode_batch (Rust)",
            lambda: build_hf(probe_tok.encoder)[0].backend_tokenizer,
            lambda t, xs: [e.ids for e in t.encode_batch(xs, add_special_tokens=False)], texts, args.reps)
        raw_row["mismatches_vs_openai"] = sum(a != b for a, b in zip(raw_ids, ours_ids))
        rows.append(raw_row)

    if oai_row is not None:
        for r in rows:
            r["cold_speedup_vs_openai"] = r["cold_texts_per_s"] / oai_row["cold_texts_per_s"]
            r["warm_speedup_vs_openai"] = r["warm_texts_per_s"] / oai_row["warm_texts_per_s"]

    header = f"{'tokenizer':44s} {'init s':>7s} {'cold texts/s':>13s} {'warm texts/s':>13s} {'cold x':>7s} {'warm x':>7s} {'id mism.':>8s}"
    print(f"{len(texts)} Flickr8k captions, median of {args.reps} reps")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['tokenizer']:44s} {r['init_s']:7.3f} {r['cold_texts_per_s']:13,.0f} {r['warm_texts_per_s']:13,.0f} "
              f"{r.get('cold_speedup_vs_openai', float('nan')):7.2f} {r.get('warm_speedup_vs_openai', float('nan')):7.2f} "
              f"{r.get('mismatches_vs_openai', '-')!s:>8s}")
    for n in notes:
        print(n)
    write_json(args.out, {
        "benchmark": "tokenizer",
        "dataset": "flickr8k captions.tsv (first N rows)",
        "n_texts": len(texts),
        "reps": args.reps,
        "statistic": "median",
        "notes": notes + ["cold = fresh instance (construction time excluded, see init_s); warm = same texts again",
                          "clipforge warm is served from its per-text cache"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": rows,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
