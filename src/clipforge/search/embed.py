"""Embed a whole collection into resumable shards (see :mod:`clipforge.embeddings` for the layout).

Shard ``i`` holds items ``[i*shard_size, (i+1)*shard_size)`` of the source's fixed order; under
torchrun or SLURM (:func:`clipforge.utils.rank_env`) rank ``r`` embeds the shards with ``i % world_size == r``.
Unreadable items are skipped, recorded in the shard's done-marker and in ``errors.jsonl``.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..inference import embed_images, embed_texts
from ..longtext import encode_text_long
from ..preprocess import ImageLoadError, image_transform
from ..families import tokenizer_for
from ..tokenizer import DEFAULT_OVERLAP, LongTextWarning
from ..utils import rank_env, read_json, write_json
from .sources import Item, Source
from ..embeddings import EMB_DIRS, FORMAT, IMAGE_COLUMN, ShardPaths, model_info, rebuild_summary, write_shard


@dataclass
class EmbedSummary:
    out_dir: str
    kind: str
    num_shards: int
    written: list[int]           # shards embedded by this call
    already_done: list[int]      # shards found finished and skipped
    other_ranks: int             # shards left to other ranks
    embedded: int                # items embedded by this call
    skipped: int                 # items skipped by this call (unreadable)
    total: int                   # items in finished shards on disk (all ranks)
    total_skipped: int
    complete: bool
    seconds: float
    rank: int = 0
    world_size: int = 1
    data_skips: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _ordered_map(fn: Callable[[Item], Any], items: Iterable[Item], pool: ThreadPoolExecutor | None,
                 window: int) -> Iterator[tuple[Item, Any]]:
    """``(item, fn(item))`` in order, at most ``window`` in flight; exceptions are returned, not raised."""
    def safe(it: Item) -> Any:
        try:
            return fn(it)
        except Exception as e:  # noqa: BLE001 - a bad item must never stop the collection
            return e

    if pool is None:
        for it in items:
            yield it, safe(it)
        return
    q: deque[tuple[Item, Future]] = deque()
    for it in items:
        q.append((it, pool.submit(safe, it)))
        if len(q) >= window:
            head, fut = q.popleft()
            yield head, fut.result()
    while q:
        head, fut = q.popleft()
        yield head, fut.result()


def _reason(e: BaseException) -> str:
    if isinstance(e, ImageLoadError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _check_resume(out: Path, base: dict[str, Any]) -> None:
    """A re-run must continue the *same* job: same model weights, kind, shard size and input."""
    man_path = out / "manifest.json"
    if not man_path.is_file():
        return
    old = read_json(man_path)
    checks = [("format", old.get("format"), base["format"]),
              ("kind", old.get("kind"), base["kind"]),
              ("model weights", (old.get("model") or {}).get("weights_sha256"), base["model"]["weights_sha256"]),
              ("shard_size", old.get("shard_size"), base["shard_size"]),
              ("source", old.get("source"), base["source"]),
              # text collections embedded before --long-text existed were truncated
              ("long_text", old.get("long_text", "truncate" if old.get("kind") == "text" else None),
               base.get("long_text"))]
    for what, was, now in checks:
        if was != now:
            raise ValueError(f"{out} already holds embeddings with a different {what} ({was!r} vs now {now!r}); "
                             "use a new --out directory")


def embed_collection(model: torch.nn.Module, source: Source, out_dir: str | Path, *,
                     preprocess: Callable | None = None, shard_size: int = 10_000, batch_size: int = 64,
                     workers: int = 2, rank: int | None = None, world_size: int | None = None,
                     progress: bool = True, long_text: str = "truncate",
                     long_text_overlap: int = DEFAULT_OVERLAP) -> EmbedSummary:
    """Embed ``source`` with ``model`` into ``out_dir``; finished shards are kept, partial ones redone.
    ``long_text``: texts longer than the context, see :func:`clipforge.longtext.encode_text_long`
    (recorded in a text collection's manifest; a re-run must use the same)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if rank is None or world_size is None:
        env = rank_env()
        rank, world_size = env.rank, env.world_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = source.kind
    try:
        n_items: int | None = len(source)
    except TypeError:
        n_items = None
    num_shards = None if n_items is None else -(-n_items // shard_size)
    base = {"format": FORMAT, "kind": kind, "embedding_dir": EMB_DIRS[kind], "dtype": "float16",
            "dim": int(model.config.embed_dim), "model": model_info(model), "shard_size": shard_size,
            "source": source.describe(), "num_shards": num_shards}
    if kind == "text":
        base["long_text"] = long_text
        if long_text == "chunks":
            base["long_text_overlap"] = long_text_overlap
    _check_resume(out, base)
    if not (out / "manifest.json").is_file():
        write_json(out / "manifest.json", {**base, "shards": [], "total": 0, "skipped": 0, "complete": False})

    pre = preprocess or image_transform(model.config.preprocess)
    t0 = time.time()
    written: list[int] = []
    done_before: list[int] = []
    other = embedded = skipped = 0
    bar = tqdm(total=n_items, desc=f"embed {kind}s" + (f" [rank {rank}/{world_size}]" if world_size > 1 else ""),
               unit="img" if kind == "image" else "text", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers) if (workers > 0 and kind == "image") else None
    it = iter(source)
    index = 0
    try:
        while True:
            first = next(it, None)
            if first is None:
                break
            # a shard's items as a stream: records of tar shards hold bytes, never keep them all
            chunk = itertools.chain([first], itertools.islice(it, shard_size - 1))
            sp = ShardPaths(out, kind, index)
            index += 1
            if sp.index % world_size != rank:
                other += 1
                for _ in chunk:
                    pass
                continue
            if sp.is_finished():
                done_before.append(sp.index)
                bar.update(sum(1 for _ in chunk))
                continue
            if kind == "image":
                emb, rows, bad = _embed_image_chunk(model, chunk, pre, batch_size, pool, bar)
            else:
                emb, rows, bad = _embed_text_chunk(model, list(chunk), batch_size, bar, long_text,
                                                   long_text_overlap)
            write_shard(sp, emb, rows, bad)
            written.append(sp.index)
            embedded += len(rows)
            skipped += len(bad)
            bar.set_postfix(shard=sp.name, skipped=skipped)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    man = rebuild_summary(out, kind, base, expected_shards=index)
    data_skips = source.skip_stats() if hasattr(source, "skip_stats") else None
    return EmbedSummary(out_dir=str(out), kind=kind, num_shards=index, written=written, already_done=done_before,
                        other_ranks=other, embedded=embedded, skipped=skipped, total=man["total"],
                        total_skipped=man["skipped"], complete=man["complete"], seconds=time.time() - t0,
                        rank=rank, world_size=world_size, data_skips=data_skips)


def _embed_image_chunk(model: torch.nn.Module, chunk: Iterable[Item], pre: Callable, batch_size: int,
                       pool: ThreadPoolExecutor | None, bar: tqdm) -> tuple[np.ndarray, list[dict], list[dict]]:
    def load(item: Item) -> tuple[torch.Tensor, int, int]:
        img = item.load()
        w, h = img.size
        return pre(img), w, h

    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    outs: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            outs.append(embed_images(model, batch, batch_size=len(batch)).numpy())
            batch.clear()

    for item, res in _ordered_map(load, chunk, pool, window=max(2 * batch_size, 8)):
        bar.update(1)
        if isinstance(res, BaseException):
            bad.append({"key": item.key, "reason": _reason(res)})
            continue
        x, w, h = res
        batch.append(x)
        rows.append({"key": item.key, IMAGE_COLUMN: item.path, "member": item.member, "caption": item.caption,
                     "width": w, "height": h})
        if len(batch) == batch_size:
            flush()
    flush()
    dim = int(model.config.embed_dim)
    emb = np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)
    return emb, rows, bad


def _embed_text_chunk(model: torch.nn.Module, chunk: list[Item], batch_size: int, bar: tqdm,
                      long_text: str = "truncate",
                      overlap: int = DEFAULT_OVERLAP) -> tuple[np.ndarray, list[dict], list[dict]]:
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    texts: list[str] = []
    for item in chunk:
        text = (item.caption or "").strip()
        if not text:
            bad.append({"key": item.key, "reason": "empty text"})
            continue
        texts.append(text)
        rows.append({"key": item.key, IMAGE_COLUMN: item.path, "member": item.member, "caption": text,
                     "width": None, "height": None})
    outs = []
    ctx = int(model.context_length)
    counts = tokenizer_for(model).token_counts(texts) if long_text != "chunks" else []
    cut = [(rows[i]["key"], n) for i, n in enumerate(counts) if n > ctx]
    if cut and long_text == "error":
        key, n = cut[0]
        raise ValueError(f"text {key!r} has {n} tokens (with start/end), more than the model's context length "
                         f"{ctx} ({len(cut)} such texts in this shard): use long_text 'truncate' or 'chunks'")
    if cut:
        shown = ", ".join(f"{k!r}: {n} tokens" for k, n in cut[:3]) + (", ..." if len(cut) > 3 else "")
        warnings.warn(LongTextWarning(f"{len(cut)} of {len(texts)} texts of this shard are longer than the context "
                                      f"length {ctx} and were cut to it ({sum(n - ctx for _, n in cut)} tokens "
                                      f"dropped; {shown})", {i: n for i, n in enumerate(counts) if n > ctx}, ctx),
                      stacklevel=2)
    if long_text != "chunks":  # every text fits or is cut: progress per batch
        for start in range(0, len(texts), batch_size):
            part = texts[start:start + batch_size]
            outs.append(embed_texts(model, part, batch_size=batch_size).numpy())
            bar.update(len(part))
    elif texts:
        outs.append(encode_text_long(model, texts, long_text=long_text, overlap=overlap,
                                     batch_size=batch_size).numpy())
        bar.update(len(texts))
    bar.update(len(bad))
    dim = int(model.config.embed_dim)
    emb = np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)
    return emb, rows, bad
