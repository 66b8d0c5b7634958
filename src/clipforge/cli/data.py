"""``clipforge data stats|queries|balance|score|filter|dedup|split``: building training sets
the way the paper built WIT. Thin wrappers over :mod:`clipforge.curation`."""

from __future__ import annotations

import argparse
from typing import Any

from .options import (ListAction, load_model_arg, add_inference_model_options, add_progress_option, any_float, any_int, existing_dir,
                      existing_file, non_negative_int, nonempty_str, output_dir, output_file, positive_float,
                      positive_int, unit_interval)


def _pool_args(p: argparse.ArgumentParser, out_help: str = "output folder (WebDataset shards + report)") -> None:
    p.add_argument("--data", required=True, type=nonempty_str,
                   help="input pairs: shards (brace pattern, glob, folder; also http(s)://, s3://, gs:// URLs or "
                        "'pipe:CMD'), a csv/tsv/jsonl manifest, or builtin:scenes?n=...")
    p.add_argument("--out", required=True, type=output_dir, help=out_help)
    p.add_argument("--shards-to", metavar="URL", default=None,
                   help="write the output shards (img2dataset layout: .tar + .parquet + _stats.json) to this folder "
                        "or fsspec URL (s3://..., gs://...) instead of --out, which keeps the run's state "
                        "(default: --out)")
    p.add_argument("--caption-key", default=None, help="caption member extension or JSON field (default txt, then "
                                                       "json caption/text)")
    p.add_argument("--split", default=None, help="manifest split column value to read (default: train if present)")
    p.add_argument("--samples-per-shard", type=positive_int, default=10000,
                   help="manifest / builtin input: pairs per output shard")
    p.add_argument("--force", action="store_true", help="redo and overwrite a finished or different run in --out")
    p.add_argument("--merge", action="store_true", help="only merge the per-shard reports of finished ranks")
    p.add_argument("--rank", type=non_negative_int, default=None, help="this process's rank (default: $RANK, else $SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="number of processes (default: $WORLD_SIZE, else an srun step's $SLURM_STEP_NUM_TASKS, else 1)")
    p.add_argument("--wait-timeout", type=positive_float, default=6 * 3600.0,
                   help="seconds to wait for other ranks at synchronisation points")
    add_progress_option(p)


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    add_inference_model_options(p, required=required)


def register(subparsers: Any) -> None:
    dp = subparsers.add_parser("data", help="dataset curation: stats, query lists, balancing, score filtering, dedup, "
                                            "eval decontamination",
                               description="Curate image-text pairs the way CLIP's WIT was built. Every step streams "
                                           "shards in and writes shards out, resumable per shard, torchrun-aware.")
    sub = dp.add_subparsers(dest="data_command", metavar="STEP")
    dp.set_defaults(func=lambda a: (dp.print_help(), 2)[1])

    p = sub.add_parser("stats", help="counts, caption lengths, image sizes, languages, bad samples")
    _pool_args(p, "output folder for stats.json and the report")
    p.add_argument("--top", type=positive_int, default=10, help="most frequent image sizes to list")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("queries", help="build a query list: frequent words (+ high-PMI bigrams) of a corpus, or a vocab")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vocab", type=existing_file,
                     help="vocabulary file: one entry per line, optionally 'entry<TAB>count'")
    src.add_argument("--corpus", action=ListAction, item=existing_file, metavar="FILE",
                     help="text files (.txt or .gz) to count words and bigrams in (comma-separated or several words)")
    p.add_argument("--min-count", type=positive_int, default=None, help="minimum count of a word (corpus default 100)")
    p.add_argument("--min-bigram-count", type=positive_int, default=None,
                   help="minimum count of a bigram (default: --min-count)")
    p.add_argument("--min-pmi", type=any_float, default=3.0, help="minimum PMI (natural log) of a bigram")
    p.add_argument("--max-bigrams", type=non_negative_int, default=None,
                   help="keep at most this many bigrams (best PMI first; default: all)")
    p.add_argument("--no-bigrams", action="store_true", help="words only")
    p.add_argument("--drop-stopwords", action="store_true",
                   help="leave out queries made only of English stopwords (the, in, next to, ...)")
    p.add_argument("--out", required=True, type=output_file, help="queries file to write (query<TAB>count per line)")
    add_progress_option(p)
    p.set_defaults(func=_cmd_queries)

    p = sub.add_parser("balance", help="keep up to N pairs per query, charging each pair to its rarest query")
    _pool_args(p)
    p.add_argument("--queries", required=True, type=existing_file,
                   help="queries file (one per line; text after a TAB is ignored)")
    p.add_argument("--max-per-query", type=positive_int, default=20000, help="cap per query (default %(default)s)")
    p.add_argument("--order", choices=["first", "hash"], default="first",
                   help="which pairs fill a query's cap: first in pool order, or a seeded random subset")
    p.add_argument("--seed", type=any_int, default=0, help="seed for --order hash")
    p.add_argument("--top", type=positive_int, default=20, help="queries listed in the report's top-N histograms")
    p.set_defaults(func=_cmd_balance)

    p = sub.add_parser("score", help="image-text cosine similarity per pair (per-shard score files)")
    _pool_args(p, "output folder for {shard}.scores.npz (+ scores.parquet) and the report")
    _model_args(p, required=True)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("filter", help="keep pairs whose score (from `data score`) is >= --min-score")
    _pool_args(p)
    p.add_argument("--scores", required=True, type=existing_dir, help="output folder of `clipforge data score`")
    p.add_argument("--min-score", type=any_float, required=True, help="minimum image-text cosine (e.g. 0.28)")
    p.set_defaults(func=_cmd_filter)

    p = sub.add_parser("dedup", help="drop exact (pixels / caption) and near (embedding cosine) duplicates")
    _pool_args(p)
    p.add_argument("--exact", choices=["image", "pair", "caption", "none"], default="image",
                   help="exact duplicates by decoded pixels (image), pixels+normalised caption (pair), caption only, "
                        "or none (default %(default)s)")
    p.add_argument("--threshold", type=unit_interval, default=0.95, help="near-duplicate image cosine (default %(default)s)")
    p.add_argument("--embeddings", default=None, type=existing_dir, help="image embeddings folder (clipforge embed output)")
    _model_args(p, required=False)
    p.add_argument("--index", choices=["auto", "flat", "ivf", "numpy"], default="auto",
                   help="similarity search: FAISS flat (exact), IVF (approximate, large pools), numpy (no FAISS)")
    p.add_argument("--nprobe", type=positive_int, default=16, help="IVF lists probed per query (default %(default)s)")
    p.set_defaults(func=_cmd_dedup)

    p = sub.add_parser("split", help="remove training pairs whose image duplicates an evaluation image")
    _pool_args(p)
    p.add_argument("--eval-sets", action=ListAction, required=True, metavar="SPEC",
                   help="evaluation sets: image folders, manifests, shards / image tars, .npz, builtin:scenes-<task> "
                        "(comma-separated or several words; a shard list inside one set uses '::')")
    _model_args(p, required=False)
    p.add_argument("--threshold", type=unit_interval, default=0.95, help="near-duplicate image cosine (default %(default)s)")
    p.set_defaults(func=_cmd_split)


# ----------------------------------------------------------------------------- helpers
def _run(args: argparse.Namespace, step: Any) -> int:
    from ..curation import RunOptions, open_pool, run_step
    from ..utils import rank_env

    env = rank_env()
    opts = RunOptions(rank=env.rank if args.rank is None else args.rank,
                      world_size=env.world_size if args.world_size is None else args.world_size,
                      force=args.force, merge_only=args.merge, progress=args.progress,
                      wait_timeout=args.wait_timeout, shards_to=getattr(args, "shards_to", None))
    pool = open_pool(args.data, caption_key=args.caption_key, split=args.split, samples_per_unit=args.samples_per_shard)
    try:
        report = run_step(step, pool, args.out, opts)
    except TimeoutError as e:
        raise ValueError(str(e)) from None
    _print_report(report)
    return 0


def _print_report(r: dict[str, Any]) -> None:
    if not r.get("merged", True):
        print(f"rank {r['rank']}: finished its {r['units']} shard(s); rank 0 merges the report")
        return
    if r.get("reused"):
        print(f"{r['out']}: reusing the finished {r['step']} run (--force to redo)")
    print(f"{r['step']}: {r['seen']} pairs in {r['shards_in']} shard(s): kept {r['kept']}, dropped {r['dropped']}")
    for reason, n in r["dropped_by_reason"].items():
        print(f"  dropped {n:>9} {reason}")
    s = r.get("step_summary", {})
    if r["step"] == "balance":
        b, a = s["before"], s["after"]
        print(f"  queries: {s['queries']} ({b['queries_with_pairs']} matched before, {a['queries_with_pairs']} after, "
              f"{s['queries_at_cap']} at the cap of {s['max_per_query']})")
        cb, ca = s["charged_before"], s["charged_after"]
        print(f"  pairs matching a query: max {b.get('max', 0)} -> {a.get('max', 0)}; pairs charged to their rarest "
              f"query: max {cb.get('max', 0)} -> {ca.get('max', 0)}, gini {cb.get('gini', 0)} -> {ca.get('gini', 0)}")
        print("  top queries before: " + ", ".join(f"{t['query']} ({t['pairs']})" for t in s["top_before"][:8]))
    elif r["step"] == "dedup":
        for kind in ("exact", "near"):
            if kind == "near" and s.get("threshold") is None:
                continue
            print(f"  {kind}: {s[kind]['clusters']} cluster(s), {s[kind]['dropped']} dropped")
    elif r["step"] == "split":
        for name, d in s["eval_sets"].items():
            print(f"  {name}: {d['eval_images_with_duplicates']} of {d['eval_images']} eval images have a training "
                  f"duplicate ({100 * d['overlap_fraction']:.2f}%); {d['train_pairs_matching']} training pairs match")
    elif r["step"] == "score":
        sc = s["scores"]
        if sc.get("n"):
            print(f"  score mean {sc['mean']:.4f} (p5 {sc['percentiles']['p5']:.4f}, p95 {sc['percentiles']['p95']:.4f})")
    elif r["step"] == "stats":
        print(f"  captions: {s['captions']}, words per caption median {s['caption_words'].get('median')}; "
              f"image width median {s['width'].get('median')}, height median {s['height'].get('median')}")
        print("  languages: " + ", ".join(f"{k} {v['share']:.1%}" for k, v in list(s["languages"].items())[:6]))
    print(f"report: {r['files']['report']}")


def _embedder(args: argparse.Namespace):
    """A ClipEmbedder for ``--model`` (loaded like every other command's), or None without one."""
    from ..curation.embed import ClipEmbedder
    from ..loading import model_label

    if args.model is None:
        return None
    model, preprocess = load_model_arg(args)
    return ClipEmbedder(model, preprocess, name=model_label(args.model, random_init=args.random_init,
                                                           seed=args.seed_init), batch_size=args.batch_size)


# ----------------------------------------------------------------------------- commands
def _cmd_stats(args: argparse.Namespace) -> int:
    from ..curation import StatsStep

    return _run(args, StatsStep(top_n=args.top))


def _cmd_queries(args: argparse.Namespace) -> int:
    from ..curation import queries_from_corpus, queries_from_vocab
    from ..utils import atomic_write_text

    from ..curation.text import STOPWORDS

    stop = STOPWORDS if args.drop_stopwords else None
    if args.vocab:
        ql = queries_from_vocab(args.vocab, min_count=args.min_count, stopwords=stop)
    else:
        ql = queries_from_corpus(args.corpus, min_count=100 if args.min_count is None else args.min_count,
                                 min_bigram_count=args.min_bigram_count, min_pmi=args.min_pmi,
                                 max_bigrams=0 if args.no_bigrams else args.max_bigrams, stopwords=stop,
                                 progress=args.progress)
    if not ql.queries:
        raise ValueError("no query passes the thresholds (lower --min-count?)")
    atomic_write_text(args.out, "".join(line + "\n" for line in ql.lines()))
    print(f"wrote {len(ql.queries)} queries ({len(ql.words)} words, {len(ql.bigrams)} bigrams) to {args.out}")
    return 0


def _cmd_balance(args: argparse.Namespace) -> int:
    from ..curation import BalanceStep, read_queries

    step = BalanceStep(read_queries(args.queries), max_per_query=args.max_per_query, order=args.order, seed=args.seed,
                       top_n=args.top)
    return _run(args, step)


def _cmd_score(args: argparse.Namespace) -> int:
    from ..curation import ScoreStep, open_pool

    open_pool(args.data, caption_key=args.caption_key, split=args.split)  # fail on missing input before loading a model
    return _run(args, ScoreStep(_embedder(args), batch_size=args.batch_size))


def _cmd_filter(args: argparse.Namespace) -> int:
    from ..curation import FilterStep, ScoreTable

    return _run(args, FilterStep(ScoreTable(args.scores), min_score=args.min_score))


def _cmd_dedup(args: argparse.Namespace) -> int:
    from ..curation import DedupStep, open_pool

    open_pool(args.data, caption_key=args.caption_key, split=args.split)
    emb = _embedder(args)
    if emb is None and args.embeddings is None:
        print("dedup: no --model or --embeddings: exact duplicates only")
    step = DedupStep(exact=args.exact, threshold=args.threshold, embedder=emb, embeddings=args.embeddings,
                     index=args.index, nprobe=args.nprobe, embed_batch_size=args.batch_size)
    return _run(args, step)


def _cmd_split(args: argparse.Namespace) -> int:
    from ..curation import DecontamStep, open_pool
    from ..curation.decontam import check_eval_set

    open_pool(args.data, caption_key=args.caption_key, split=args.split)
    for spec in args.eval_sets:
        check_eval_set(spec)
    emb = _embedder(args)
    if emb is None:
        print("split: no --model: exact (pixel-identical) duplicates only")
    return _run(args, DecontamStep(args.eval_sets, embedder=emb, threshold=args.threshold, batch_size=args.batch_size))
