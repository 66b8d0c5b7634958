"""``clipforge embed | index | search | serve``: semantic search over image (or text) collections."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import (ListAction, add_inference_model_options, add_log_option, add_long_text_options,
                      add_progress_option, any_int,
                      existing_dir, existing_file, load_model_arg, non_negative_float, non_negative_int, nonempty_str,
                      output_dir,
                      positive_float, positive_int, require_nonempty, unit_interval)


def register(sub: Any) -> None:
    _add_embed(sub)
    _add_index(sub)
    _add_search(sub)
    _add_serve(sub)


def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed an image folder, manifest, shards or text file into resumable shards",
                       description="Writes img_emb/*.npy (float16) + metadata/*.parquet shards and manifest.json. "
                                   "Re-running skips finished shards; under torchrun each rank embeds its share.")
    add_inference_model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=existing_dir, help="folder of images (recursive; key = relative path)")
    src.add_argument("--manifest", type=existing_file, help="image-caption manifest (.csv, .tsv, .jsonl)")
    src.add_argument("--shards", type=nonempty_str, help="WebDataset shards (brace pattern, glob, folder or list)")
    src.add_argument("--data", type=nonempty_str, help="any data spec (folder, manifest, shards, builtin:...)")
    src.add_argument("--texts", type=nonempty_str,
                     help="text collection: .txt file (one text per line) or a manifest's captions")
    p.add_argument("--out", required=True, type=output_dir, help="output directory")
    p.add_argument("--split", default=None, help="keep only this split of a manifest (default: all rows)")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="items per output shard")
    p.add_argument("--decode-threads", dest="decode_threads", type=non_negative_int, default=2,
                   help="image decoding threads (0: decode inline)")
    p.add_argument("--workers", dest="decode_threads", type=non_negative_int, help=argparse.SUPPRESS)  # old name
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_long_text_options(p, default="truncate", what="--texts items")
    add_progress_option(p)
    p.set_defaults(func=run_embed)


def _add_index(sub: Any) -> None:
    p = sub.add_parser("index", help="build a FAISS or Milvus index over an embedding directory "
                                     "(or --add new shards, --delete ids)",
                       description="Exact (flat) for small collections; IVF-HNSW with SQ8/PQ codes above "
                                   "--exact-threshold, sized to --max-memory, nprobe tuned to --target-recall. "
                                   "--on-disk keeps the inverted lists on disk (collections larger than RAM). "
                                   "--backend milvus puts vectors and metadata in a Milvus collection instead "
                                   "(FLAT / IVF_FLAT / IVF_SQ8, same tuning); `search` and `serve` follow "
                                   "index.json to either. Needs the search extra: pip install 'clipforge[search]' "
                                   "(Milvus also 'clipforge[milvus]').")
    p.add_argument("--embeddings", type=existing_dir,
                   help="directory written by `clipforge embed` or `clip-retrieval inference` "
                        "(required unless --delete)")
    p.add_argument("--kind", choices=["image", "text"], default=None,
                   help="embeddings to index when the folder holds both img_emb/ and text_emb/ "
                        "(default: the manifest's kind, else image)")
    p.add_argument("--out", required=True, type=output_dir, help="index directory")
    p.add_argument("--add", action="store_true", help="add only the shards the index does not hold yet")
    p.add_argument("--delete", action=ListAction, item=non_negative_int, default=None, metavar="ID,ID",
                   help="delete these item ids from the index at --out (FAISS: searches skip them until the "
                        "next build; Milvus: rows deleted)")
    p.add_argument("--backend", choices=["faiss", "milvus"], default=None,
                   help="where vectors live: faiss (embedded files, the default) or milvus "
                        "(--add and --delete follow the index's own backend)")
    p.add_argument("--uri", type=nonempty_str, default=None,
                   help="Milvus: a milvus-lite database path ending in .db (default: <out>/milvus.db) or "
                        "http(s)://host:19530 for a Milvus server")
    p.add_argument("--collection", type=milvus_name, default=None,
                   help="Milvus collection name prefix (default: clipforge; generations add _gNNNNNN)")
    p.add_argument("--on-disk", action="store_true",
                   help="FAISS: IVF with inverted lists in a file memory-mapped at search time, built in "
                        "blocks within --max-memory (for collections larger than RAM)")
    p.add_argument("--max-memory", default=None, type=memory_size,
                   help="memory budget of the index, e.g. 4G, 512M (default: no limit)")
    p.add_argument("--exact-threshold", type=non_negative_int, default=100_000,
                   help="largest collection given an exact index")
    p.add_argument("--target-recall", type=unit_interval, default=0.95, help="recall@10 to tune for")
    p.add_argument("--queries", type=positive_int, default=1000, help="held-out queries for measuring recall")
    p.add_argument("--seed", type=any_int, default=0, help="seed for the training sample and held-out queries")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_progress_option(p)
    p.set_defaults(func=run_index)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="query an index with a text or an image")
    add_inference_model_options(p, batch_size=None)
    p.add_argument("--index", required=True, type=existing_dir, help="index directory")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", type=existing_file, help="image file to query with instead of text")
    p.add_argument("-k", type=positive_int, default=10, help="number of results")
    p.add_argument("--max-k", type=positive_int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-map the index (default: when over 1 GiB)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    add_long_text_options(p, default="error", what="a text query")
    p.set_defaults(func=run_search)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="HTTP search API + web page (FastAPI on uvicorn)",
                       description="Needs the search extra: pip install 'clipforge[search]'.")
    add_inference_model_options(p, batch_size=None)
    p.add_argument("--index", required=True, action="append", type=index_spec, metavar="[NAME=]PATH",
                   help="index directory, NAME=PATH, or clip-retrieval's indices_paths.json ({name: path}); repeat "
                        "for several indexes (the first is the default; requests choose with 'index')")
    _add_serve_access_options(p)
    _add_serve_compute_options(p)
    _add_serve_limit_options(p)
    p.add_argument("--index-name", default=None, type=nonempty_str,
                   help="name of a single unnamed --index (default: the index folder's name)")
    p.add_argument("--no-uploads", action="store_true",
                   help="disable image uploads (needed to start without python-multipart)")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-map the index (default: when over 1 GiB)")
    add_log_option(p, default="info")
    p.set_defaults(func=run_serve)


def _add_serve_access_options(p: argparse.ArgumentParser) -> None:
    """Who may reach the server; how its connections and query images are bounded."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (beyond loopback only with --auth-token-file or --insecure)")
    p.add_argument("--port", type=port_number, default=8080, help="TCP port (0: any free port)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without authentication (anyone who reaches it may query)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed to call the API, e.g. http://localhost:3000 (repeat; '*' for any; "
                        "default: none)")
    p.add_argument("--max-image-pixels", type=positive_int, default=40_000_000,
                   help="largest image (width x height, read from its header before decoding) accepted in a "
                        "query or thumbnailed; larger ones get 413")
    p.add_argument("--max-connections", type=positive_int, default=1000,
                   help="open connections; beyond it the oldest idle one is closed (capped by the descriptor limit)")
    p.add_argument("--header-timeout", type=positive_float, default=10.0,
                   help="seconds a connection may take to send a request head before it is closed")
    p.add_argument("--keep-alive", type=positive_int, default=5, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--auth-token-file", type=existing_file, default=None, metavar="FILE",
                   help="file holding a bearer token (>= 16 characters): every route but /health and the web page "
                        "then needs 'Authorization: Bearer <token>' (the page asks for it)")


def _add_serve_compute_options(p: argparse.ArgumentParser) -> None:
    """How queries are encoded: runtime, batching across requests, shutdown."""
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="run the towers in torch, or export them to ONNX at start and run them in ONNX Runtime "
                        "(fp32; needs the onnx extra)")
    p.add_argument("--onnx-dir", type=output_dir, default=None,
                   help="--runtime onnx: keep (or reuse) the exported towers here (default: a temporary folder)")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="text or image queries encoded together across requests (1: each alone)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0,
                   help="longest wait for a batch to fill once its first query arrived")
    p.add_argument("--exact-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="encode batched queries in fixed-shape chunks so a query's embedding has the same bits "
                        "whatever batch it rode in (default); --no-exact-batches: one model call per batch, faster, "
                        "last bits vary with the batch")
    p.add_argument("--batch-searches", action=argparse.BooleanOptionalAction, default=True,
                   help="search an exact (flat) index for batched queries together, in chunks of 4 (default: one "
                        "read of the index per chunk; a lone query costs a little more); --no-batch-searches: "
                        "each query by FAISS in a request worker")
    p.add_argument("--encode-threads", type=positive_int, default=None,
                   help="torch threads that encode the batches (default: the cores available minus one, at least "
                        "one: on a busy CPU an OpenMP thread that shares its core with the event loop stalls "
                        "every parallel region)")
    p.add_argument("--search-threads", type=positive_int, default=1,
                   help="FAISS threads of each request's search (default 1: requests already search in parallel "
                        "across --server-threads; more helps a few large queries on a many-core machine)")
    p.add_argument("--max-embed-items", type=positive_int, default=64,
                   help="texts (and images) per /embed or /rank request")
    p.add_argument("--graceful-timeout", type=positive_int, default=30,
                   help="seconds to finish in-flight requests on SIGTERM / Ctrl-C before closing")


def _add_serve_limit_options(p: argparse.ArgumentParser) -> None:
    """What one request may ask for, and how much work may wait."""
    p.add_argument("--max-k", type=positive_int, default=100, help="largest k a request may ask for")
    p.add_argument("--max-upload", default="10M", type=memory_size, help="largest accepted image upload")
    p.add_argument("--thumb-size", type=positive_int, default=256, help="thumbnail size in pixels")
    p.add_argument("--max-json", default="256K", type=memory_size, help="largest accepted JSON request body")
    p.add_argument("--server-threads", type=positive_int, default=4,
                   help="threads that parse, tokenize, embed and search (the event loop only does I/O)")
    p.add_argument("--max-pending", type=positive_int, default=256,
                   help="requests queued or running before new ones get 503")
    p.add_argument("--request-timeout", type=positive_float, default=30.0, help="seconds before a query gets 503")


def milvus_name(text: str) -> str:
    """A Milvus collection name: letters, digits and _, not starting with a digit."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits and _ (not starting with a digit), got {text!r}")
    return text


def index_spec(text: str) -> list[tuple[str | None, str]]:
    """``PATH``, ``NAME=PATH`` or an ``indices_paths.json`` ({name: path}) -> [(name or None, dir)]."""
    import re
    from pathlib import Path

    name, eq, rest = text.partition("=")
    if eq and re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name) and not Path(text).is_dir():
        return [(name, existing_dir(rest))]
    if text.endswith(".json") and Path(text).is_file():
        try:
            mapping = json.loads(Path(text).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{text}: not a JSON object of index names to paths ({e})") from None
        if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, str) for v in mapping.values()):
            raise argparse.ArgumentTypeError(f"{text}: expected a JSON object of index names to paths")
        base = Path(text).resolve().parent
        out = []
        for k, v in mapping.items():
            p = Path(v) if Path(v).is_absolute() else base / v
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: index {k!r}: {v} is not a directory")
            out.append((str(k), str(p)))
        return out
    return [(None, existing_dir(text))]


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace ignored), at least 16 characters."""
    from pathlib import Path

    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"--auth-token-file {path}: not UTF-8 text") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"--auth-token-file {path}: the token must be one word of at least 16 characters")
    return token


def port_number(text: str) -> int:
    """A TCP port, 0..65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port between 0 and 65535, got {text!r}")
    return value


def memory_size(text: str) -> str:
    """A size such as 512M, 4G, 1.5GB or 1048576: checked at parse time with the syntax of
    ``search.index.parse_memory`` (which needs FAISS, so it is not imported here)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size > 0 such as 512M, 4G or 1.5GB, got {text!r}")
    return text


def run_embed(args: argparse.Namespace) -> int:
    from clipforge.search.embed import embed_collection
    from clipforge.search.sources import open_source

    data = args.manifest or args.shards or args.data
    source = open_source(images=args.images, data=data, texts=args.texts, split=args.split)
    _require_items(args, source)
    model, preprocess = load_model_arg(args)
    s = embed_collection(model, source, args.out, preprocess=preprocess, shard_size=args.shard_size,
                         batch_size=args.batch_size, workers=args.decode_threads, progress=args.progress,
                         long_text=args.long_text, long_text_overlap=args.long_text_overlap)
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


def _require_items(args: argparse.Namespace, source: Any) -> None:
    """An input that holds nothing is an error, not a run that writes '0 items'."""
    try:
        n = len(source)
    except TypeError:  # a stream: counted only while reading
        return
    option, value = next((f"--{k}", v) for k in ("images", "manifest", "shards", "data", "texts")
                         if (v := getattr(args, k, None)))
    require_nonempty(n, option, value, "texts" if source.kind == "text" else "images")


def run_index(args: argparse.Namespace) -> int:
    from clipforge.search.index import add_to_index, build_index, delete_from_index, human_bytes

    build_only = [o for o, v in (("--backend", args.backend), ("--uri", args.uri), ("--collection", args.collection),
                                 ("--on-disk", args.on_disk)) if v]
    if args.delete is not None:
        if args.add or args.embeddings or build_only:
            raise ValueError("--delete takes only --out (and --json): it changes an existing index")
        d = delete_from_index(args.out, args.delete)
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            print(f"index {args.out}: deleted {len(d['deleted'])} item(s)"
                  + (f", {len(d['not_found'])} already gone ({d['not_found'][:5]})" if d["not_found"] else "")
                  + f"; {d['count']} items remain")
        return 0
    if not args.embeddings:
        raise ValueError("--embeddings is required (except with --delete)")
    backend = args.backend or "faiss"
    if args.add and build_only:
        raise ValueError(f"{', '.join(build_only)}: not with --add (it follows the index's own backend and layout)")
    if backend == "faiss" and (args.uri or args.collection):
        raise ValueError("--uri and --collection are for --backend milvus")
    if backend == "milvus" and args.on_disk:
        raise ValueError("--on-disk is for the FAISS backend (Milvus manages its own storage)")
    if args.add:
        r = add_to_index(args.embeddings, args.out, target_recall=args.target_recall, n_queries=args.queries,
                         seed=args.seed, progress=args.progress)
    elif backend == "milvus":
        from clipforge.search.milvus import build_milvus_index

        r = build_milvus_index(args.embeddings, args.out, uri=args.uri, collection=args.collection or "clipforge",
                               max_memory=args.max_memory, exact_threshold=args.exact_threshold,
                               target_recall=args.target_recall, n_queries=args.queries, seed=args.seed,
                               progress=args.progress, kind=args.kind)
    else:
        r = build_index(args.embeddings, args.out, max_memory=args.max_memory, exact_threshold=args.exact_threshold,
                        target_recall=args.target_recall, n_queries=args.queries, seed=args.seed,
                        progress=args.progress, kind=args.kind, on_disk=args.on_disk)
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
    model, preprocess = load_model_arg(args)
    index = load_index(args.index, mmap=args.mmap)
    try:
        searcher = Searcher(index, model, preprocess, max_k=max(args.max_k, args.k), long_text=args.long_text,
                            long_text_overlap=args.long_text_overlap)
        if args.image:
            hits = searcher.search_image(load_image(args.image), args.k)
            query = {"type": "image", "path": args.image}
        else:
            hits = searcher.search_text(args.query, args.k)
            query = {"type": "text", "text": args.query}
    finally:
        index.close()
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

    from clipforge.search.http import multipart_available
    from clipforge.search.index import load_index, parse_memory
    from clipforge.search.server import ServerLimits, bind_socket, connection_budget, is_loopback, uvicorn_server
    from clipforge.search.service import create_app, default_encode_threads

    token = read_token(args.auth_token_file) if args.auth_token_file else None
    if not is_loopback(args.host) and not args.insecure and token is None:
        raise ValueError(f"--host {args.host} is reachable beyond this machine and the server has no authentication: "
                         "give --auth-token-file FILE, or --insecure to serve it open on purpose")
    if not args.no_uploads and not multipart_available():
        raise ValueError("image uploads need python-multipart, which is not installed: "
                         "pip install 'clipforge[search]' (or start with --no-uploads)")
    limits = connection_budget(ServerLimits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                                            keep_alive=args.keep_alive, graceful_timeout=args.graceful_timeout))
    sock = bind_socket(args.host, args.port)  # a bad host or a busy port: one line, before any banner
    try:
        specs = [x for group in args.index for x in group]
        if len(specs) > 1 and any(n is None for n, _ in specs):
            raise ValueError("several --index: name each one (NAME=PATH or an indices_paths.json)")
        if len(specs) > 1 and args.index_name:
            raise ValueError("--index-name names a single --index; use NAME=PATH for several")
        dup = sorted({n for n, _ in specs if n is not None and [m for m, _ in specs].count(n) > 1})
        if dup:
            raise ValueError(f"--index: the name {dup[0]!r} is given twice")
        if args.runtime == "onnx" and args.precision not in ("fp32", None):
            raise ValueError("--runtime onnx serves the fp32 towers: use --precision fp32 with it")
        if args.onnx_dir and args.runtime != "onnx":
            raise ValueError("--onnx-dir is for --runtime onnx")
        model, preprocess = load_model_arg(args)
        if args.runtime == "onnx":
            from clipforge.search.onnx_runtime import onnx_model

            model = onnx_model(model, args.onnx_dir, threads=args.server_threads)
        indexes: dict[Any, Any] = {}
        try:
            for n, path in specs:
                indexes[n] = load_index(path, mmap=args.mmap)
            index = next(iter(indexes.values()))
            app = create_app(indexes if len(indexes) > 1 else index, model, preprocess, max_k=args.max_k, max_upload_bytes=parse_memory(args.max_upload),
                             max_json_bytes=parse_memory(args.max_json), workers=args.server_threads,
                             max_pending=args.max_pending, request_timeout=args.request_timeout,
                             index_name=args.index_name, uploads=not args.no_uploads, thumb_size=args.thumb_size,
                             max_image_pixels=args.max_image_pixels, cors_origins=tuple(args.cors_origin),
                             max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                             max_embed_items=args.max_embed_items, auth_token=token,
                             exact_batches=args.exact_batches, batch_searches=args.batch_searches,
                             encode_threads=args.encode_threads or default_encode_threads(),
                             search_threads=args.search_threads)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            open_note = " (bearer token required)" if token else "" if is_loopback(args.host) else \
                " WITHOUT authentication (--insecure)"
            what = ", ".join(f"{n}: {sv.searcher.index.count()} items" for n, sv in app.state.served.items()) \
                if len(indexes) > 1 else f"{index.count()} items from {specs[0][1]}"
            print(f"serving {what} on http://{shown}:{port}/{open_note} (API docs at /docs)", flush=True)
            uvicorn_server(app, limits, log_level=args.log_level).run(sockets=[sock])
        finally:
            for ix in indexes.values():
                ix.close()
    finally:
        sock.close()
    return 0
