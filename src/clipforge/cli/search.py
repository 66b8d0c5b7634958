"""``clipforge embed | index | search | serve``: semantic search over image (or text) collections."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint path (or a zoo name with --random-init)")
    p.add_argument("--random-init", action="store_true",
                   help="--model is a zoo name; use untrained weights (smoke tests, demos)")
    p.add_argument("--seed-init", type=int, default=0, help="seed for --random-init weights")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                   help="inference precision: fp32 (default, exact to 1e-4), bf16/fp16, or auto (a reduced "
                        "precision only where a measured matmul probe finds it >= 1.3x faster on this CPU)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def register(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed an image folder, manifest, shards or text file into resumable shards",
                       description="Writes img_emb/*.npy (float16) + metadata/*.parquet shards and manifest.json. "
                                   "Re-running skips finished shards; under torchrun each rank embeds its share.")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive; key = relative path)")
    src.add_argument("--manifest", help="image-caption manifest (.csv, .tsv, .jsonl)")
    src.add_argument("--shards", help="WebDataset shards (brace pattern, glob, folder or list)")
    src.add_argument("--data", help="any data spec (folder, manifest, shards, builtin:...)")
    src.add_argument("--texts", help="text collection: .txt file (one text per line) or a manifest's captions")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default=None, help="keep only this split of a manifest (default: all rows)")
    p.add_argument("--shard-size", type=int, default=10_000, help="items per output shard (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (0: decode inline)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_embed)

    p = sub.add_parser("index", help="build a FAISS index over an embedding directory (or --add new shards)",
                       description="Exact (flat) for small collections; IVF-HNSW with SQ8/PQ codes above "
                                   "--exact-threshold, sized to --max-memory, nprobe tuned to --target-recall.")
    p.add_argument("--embeddings", required=True, help="directory written by `clipforge embed`")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--add", action="store_true", help="add only the shards the index does not hold yet")
    p.add_argument("--max-memory", default=None, help="memory budget of the index, e.g. 4G, 512M")
    p.add_argument("--exact-threshold", type=int, default=100_000,
                   help="largest collection given an exact index (default: %(default)s)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune for (default: %(default)s)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for measuring recall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=run_index)

    p = sub.add_parser("search", help="query an index with a text or an image")
    _model_args(p)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="image file to query with instead of text")
    p.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-map the index (default: when over 1 GiB)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run_search)

    p = sub.add_parser("serve", help="HTTP search API + web page (FastAPI on uvicorn)")
    _model_args(p)
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    p.add_argument("--max-upload", default="10M", help="largest accepted image upload (default: %(default)s)")
    p.add_argument("--thumb-size", type=int, default=256, help="thumbnail size in pixels")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-map the index (default: when over 1 GiB)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve)


def load_model_arg(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, preprocess) from ``--model`` (checkpoint) or ``--model NAME --random-init``."""
    import clipforge
    from clipforge.inference import optimize_for_inference
    from clipforge.preprocess import image_transform

    if args.random_init:
        model = optimize_for_inference(clipforge.create_model(args.model, seed=args.seed_init),
                                       precision=args.precision)
        print(f"note: {args.model} with random weights (seed {args.seed_init}): results are meaningless",
              file=sys.stderr)
        return model, image_transform(model.config.preprocess)
    model, preprocess = clipforge.load(args.model)
    return optimize_for_inference(model, precision=args.precision), preprocess


def run_embed(args: argparse.Namespace) -> int:
    from clipforge.search.embed import embed_collection
    from clipforge.search.sources import open_source

    data = args.manifest or args.shards or args.data
    source = open_source(images=args.images, data=data, texts=args.texts, split=args.split)
    model, preprocess = load_model_arg(args)
    s = embed_collection(model, source, args.out, preprocess=preprocess, shard_size=args.shard_size,
                         batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
    if args.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    state = "complete" if s.complete else (
        f"rank {s.rank}/{s.world_size} done; other ranks still writing" if s.world_size > 1 else "INCOMPLETE")
    print(f"{s.kind} embeddings in {s.out_dir}: {s.total} items in {s.num_shards} shards ({state})")
    print(f"  this run: {len(s.written)} shards written ({s.embedded} items, {s.skipped} skipped), "
          f"{len(s.already_done)} already finished, {s.other_ranks} left to other ranks, {s.seconds:.1f} s")
    if s.total_skipped:
        print(f"  {s.total_skipped} unreadable items skipped: see {s.out_dir}/errors.jsonl")
    if s.data_skips:
        print(f"  skipped by the data source: {s.data_skips}")
    return 0


def run_index(args: argparse.Namespace) -> int:
    from clipforge.search.index import add_to_index, build_index, human_bytes

    if args.add:
        r = add_to_index(args.embeddings, args.out, target_recall=args.target_recall, n_queries=args.queries,
                         seed=args.seed, progress=not args.no_progress)
    else:
        r = build_index(args.embeddings, args.out, max_memory=args.max_memory, exact_threshold=args.exact_threshold,
                        target_recall=args.target_recall, n_queries=args.queries, seed=args.seed,
                        progress=not args.no_progress)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    plan = r.plan
    print(f"index {r.out_dir}: {plan.get('factory')} with {r.ntotal} vectors ({r.added} added), "
          f"{human_bytes(r.index_bytes)} on disk, {r.seconds:.1f} s")
    if plan.get("reason"):
        print(f"  why: {plan['reason']}")
    if r.recall_at_10 is not None:
        extra = f" at nprobe={r.nprobe}" if r.nprobe else " (exact)"
        print(f"  recall@10 vs exact search: {r.recall_at_10:.3f}{extra}")
    for row in r.tuning:
        print(f"    nprobe {int(row['nprobe']):>5}: recall@10 {row['recall_at_10']:.3f}, "
              f"{row['ms_per_query_batched']:.3f} ms/query (batched)")
    for note in r.notes:
        print(f"  note: {note}")
    return 0


def _shorten(text: str | None, n: int = 70) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def run_search(args: argparse.Namespace) -> int:
    from clipforge.preprocess import load_image
    from clipforge.search.index import load_index
    from clipforge.search.searcher import Searcher

    if bool(args.query) == bool(args.image):
        raise ValueError("give a text query or --image FILE (exactly one)")
    index = load_index(args.index, mmap=args.mmap)
    model, preprocess = load_model_arg(args)
    searcher = Searcher(index, model, preprocess, max_k=max(args.max_k, args.k))
    if args.image:
        hits = searcher.search_image(load_image(args.image), args.k)
        query = {"type": "image", "path": args.image}
    else:
        hits = searcher.search_text(args.query, args.k)
        query = {"type": "text", "text": args.query}
    if args.json:
        print(json.dumps({"query": query, "k": args.k, "results": [h.to_dict() for h in hits]}, indent=2))
        return 0
    print(f"{'rank':>4} {'score':>7} {'id':>8}  key / caption")
    for rank, h in enumerate(hits, 1):
        cap = f"  {_shorten(h.row.get('caption'))}" if h.row.get("caption") else ""
        print(f"{rank:>4} {h.score:7.4f} {h.id:>8}  {h.row.get('key')}{cap}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from clipforge.search.index import load_index, parse_memory
    from clipforge.search.service import create_app

    index = load_index(args.index, mmap=args.mmap)
    model, preprocess = load_model_arg(args)
    app = create_app(index, model, preprocess, max_k=args.max_k, max_upload_bytes=parse_memory(args.max_upload),
                     thumb_size=args.thumb_size)
    print(f"serving {index.ntotal} items from {args.index} on http://{args.host}:{args.port}/ "
          f"(API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
