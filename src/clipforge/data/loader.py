"""The training loader: endless, deterministic, exactly resumable batches of (images, token ids).

Determinism: which samples form batch k, which caption each image gets and the random
augmentation of each image are pure functions of (seed, epoch, sample index / stream position),
never of global RNG state, worker timing or process count (for map-style sources).

Map-style sources (manifests, scenes): epoch e is a permutation from (seed, e), truncated to a
multiple of world_size; rank r takes every world_size-th index; batch b of the epoch is the
positions [b*B, (b+1)*B) of that list. The position is the global batch counter, so resuming
jumps directly there. A bad sample is replaced by a deterministic substitute from elsewhere in
the epoch so batches stay full (all_gather in the contrastive loss needs equal sizes).
Worker w of W produces global batches w, w+W, ... and DataLoader's round robin restores
the order, so the batches do not depend on num_workers at all.

Shard streams: each logical worker (num_workers of them, 1 in-process) reads its own shard
subset and chains its epochs by itself; the loader records, per logical worker, (epoch,
records consumed in the epoch). Resuming re-reads that many records of the deterministic stream
without decoding them (cheap but not free: it re-reads up to one epoch of that worker's shards).
Bad samples are skipped, so stream batches are always full (the tail of an epoch that does not
fill a batch is dropped with ``drop_last``).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .base import PairSource, Sample, stable_rng, stable_seed
from .mirror import Companion, MirroredText
from .skip import BadSample, SkipStats

logger = logging.getLogger("clipforge.data")

STATE_VERSION = 1
_MAX_SUBSTITUTE_TRIES = 200


def _accepts_rng(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return any(p.name == "rng" or p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _identity(x: Any) -> Any:
    return x


class _Producer(torch.utils.data.IterableDataset):
    """Makes batches from a start state; runs in-process or once per DataLoader worker."""

    def __init__(self, source: PairSource, cfg: dict[str, Any], start: dict[str, Any],
                 transform: Callable, tokenize: Callable, companion: Callable | None = None) -> None:
        super().__init__()
        self.source, self.cfg, self.start = source, cfg, start
        self.transform, self.tokenize, self.companion = transform, tokenize, companion
        self.rng_transform = _accepts_rng(transform)
        self._log = SkipStats()  # per process: logs the first few skips
        self._orders: dict[int, np.ndarray] = {}

    # -- common ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        j = 0 if info is None else info.id
        n_logical = self.cfg["n_logical"]
        if self.cfg["map_style"]:
            g = self.start["next_batch"] + j
            while True:
                yield self._map_batch(g)
                g += n_logical
        else:
            lw = (self.start["next_worker"] + j) % n_logical
            yield from self._stream_batches(lw, dict(self.start["workers"][lw]))

    def _skip(self, stats: SkipStats, reason: str, key: str, detail: str = "") -> None:
        stats.add(reason, key, detail)
        self._log.add(reason, key, detail)

    def _apply_transform(self, image: Image.Image, tag: tuple) -> torch.Tensor:
        if self.rng_transform:  # a companion gets its sample's draw: the same crop of the other arrangement
            return self.transform(image, rng=stable_rng("augment", self.cfg["seed"], *tag))
        return self.transform(image)

    def _prepare(self, image: Image.Image, captions: list[str], key: str, tag: tuple,
                 stats: SkipStats, sample: Sample | None = None) -> tuple[torch.Tensor, str, Any] | None:
        seed = self.cfg["seed"]
        caption = captions[0] if len(captions) == 1 else \
            captions[stable_rng("caption", seed, *tag).randrange(len(captions))]
        extra = None
        try:
            if self.companion is not None and sample is not None:
                found = self.companion(self.source, sample, caption, stable_rng("companion", seed, *tag))
                if found == "flip":
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                elif isinstance(found, Companion):
                    extra = (self._apply_transform(found.image, tag), found.caption)
            x = self._apply_transform(image, tag)
        except Exception as e:  # one odd image must not kill a long run; systematic failure still surfaces
            self._skip(stats, "transform_error", key, f"{type(e).__name__}: {e}")
            return None
        return x, caption, extra

    def _collate(self, items: list[tuple[torch.Tensor, str, Any]], info: dict[str, Any]):
        images = torch.stack([x for x, _, _ in items])
        captions = [c for _, c, _ in items]
        if self.companion is None:
            return images, self.tokenize(captions), info
        # companions: rows B..2B-1, one per sample (a zero image and "" where it has none)
        extra = torch.stack([e[0] if e is not None else torch.zeros_like(x) for x, _, e in items])
        present = torch.tensor([True] * len(items) + [e is not None for _, _, e in items])
        text = self.tokenize(captions + [e[1] if e is not None else "" for _, _, e in items])
        return torch.cat([images, extra]), MirroredText(text, present), info

    # -- map-style --------------------------------------------------------------------------
    def _rank_order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            c = self.cfg
            perm = np.random.default_rng(stable_seed("perm", c["seed"], epoch)).permutation(c["num_samples"])
            order = perm[: c["per_rank"] * c["world_size"]][c["rank"]::c["world_size"]]
            self._orders = {epoch: order}  # keep one epoch
        return order

    def _load_index(self, idx: int, epoch: int, stats: SkipStats) -> tuple[torch.Tensor, str] | None:
        try:
            s = self.source.get(idx)
        except BadSample as e:
            self._skip(stats, e.reason, e.key, e.detail)
            return None
        return self._prepare(s.image, s.captions, s.key, (epoch, idx), stats, s)

    def _map_batch(self, g: int):
        c = self.cfg
        epoch, b = divmod(g, c["steps_per_epoch"])
        order = self._rank_order(epoch)
        lo, hi = b * c["batch_size"], min((b + 1) * c["batch_size"], len(order))
        stats = SkipStats(log_first=0)
        used = {int(i) for i in order[lo:hi]}
        items = []
        for p in range(lo, hi):
            item = self._load_index(int(order[p]), epoch, stats)
            if item is None:
                item = self._substitute(order, p, lo, hi, epoch, stats, used)
            items.append(item)
        return self._collate(items, {"g": g, "epoch": epoch, "stats": stats.to_dict()})

    def _substitute(self, order: np.ndarray, p: int, lo: int, hi: int, epoch: int, stats: SkipStats,
                    used: set[int]) -> tuple[torch.Tensor, str, Any]:
        """A deterministic replacement for the bad sample at position p: another sample of the
        epoch, outside this batch when possible (a duplicate in a batch is a false negative)."""
        rng = stable_rng("substitute", self.cfg["seed"], epoch, self.cfg["rank"], p)
        outside = len(order) > hi - lo
        for _ in range(_MAX_SUBSTITUTE_TRIES):
            q = rng.randrange(len(order))
            idx = int(order[q])
            if outside and (lo <= q < hi or idx in used):
                continue
            item = self._load_index(idx, epoch, stats)
            if item is not None:
                used.add(idx)
                return item
        raise RuntimeError(f"no usable sample found in {_MAX_SUBSTITUTE_TRIES} tries to replace a bad one in "
                           f"{self.source.spec!r}; skipped so far: {self._log.to_dict()}")

    # -- streams ----------------------------------------------------------------------------
    def _stream_batches(self, lw: int, state: dict[str, int]):
        c = self.cfg
        epoch, skip = int(state["epoch"]), int(state["consumed"])
        B = c["batch_size"]
        max_fails = max(1000, 10 * B)
        fails = 0
        stats = SkipStats(log_first=0)
        while True:
            items: list[tuple[torch.Tensor, str, Any]] = []
            pos = 0
            for rec in self.source.epoch_records(rank=c["rank"], world_size=c["world_size"], worker_id=lw,
                                                 num_workers=c["n_logical"], epoch=epoch, seed=c["seed"],
                                                 resampled=c["resampled"], buffer=c["shuffle_buffer"], warn=False):
                pos += 1
                if pos <= skip:
                    continue  # resuming: already consumed before the checkpoint
                item = None
                try:
                    s = self.source.decode(rec)
                except BadSample as e:
                    self._skip(stats, e.reason, e.key, e.detail)
                else:
                    item = self._prepare(s.image, s.captions, s.key, (epoch, c["rank"], lw, pos), stats, s)
                if item is None:
                    fails += 1
                    if fails > max_fails:
                        raise RuntimeError(f"{fails} consecutive unusable samples in {self.source.spec!r}: "
                                           f"{self._log.to_dict()}")
                    continue
                fails = 0
                items.append(item)
                if len(items) == B:
                    yield self._collate(items, {"lw": lw, "epoch": epoch, "consumed": pos, "stats": stats.to_dict()})
                    items, stats = [], SkipStats(log_first=0)
            if items and not c["drop_last"]:
                yield self._collate(items, {"lw": lw, "epoch": epoch, "consumed": pos, "stats": stats.to_dict()})
                stats = SkipStats(log_first=0)
            epoch, skip = epoch + 1, 0


class PairLoader:
    """Endless iterator of ``(images [B,3,S,S], ids [B,ctx])`` with exact resume.

    ``state_dict()`` describes the batches handed out so far; a loader given it with
    ``load_state_dict`` continues with exactly the batches the original would have produced
    next. Iterating (``for`` or ``next``) always continues from the current state.
    """

    def __init__(self, source: PairSource, *, transform: Callable[..., torch.Tensor],
                 tokenize: Callable[[list[str]], torch.Tensor], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, resampled: bool = False, drop_last: bool = True,
                 shuffle_buffer: int = 1000, prefetch_factor: int = 2, companion: Callable | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source, self.transform, self.tokenize, self.companion = source, transform, tokenize, companion
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.num_workers, self.resampled, self.drop_last = int(num_workers), bool(resampled), bool(drop_last)
        self.shuffle_buffer, self.prefetch_factor = int(shuffle_buffer), int(prefetch_factor)
        self.map_style = bool(source.is_map_style)
        self.stats = SkipStats()
        self._it: Iterator | None = None
        n_logical = max(1, self.num_workers)
        self._cfg: dict[str, Any] = dict(map_style=self.map_style, seed=self.seed, rank=self.rank,
                                         world_size=self.world_size, batch_size=self.batch_size,
                                         drop_last=self.drop_last, resampled=self.resampled,
                                         n_logical=n_logical, shuffle_buffer=self.shuffle_buffer)
        if self.map_style:
            n = len(source)
            per_rank = n // self.world_size
            if per_rank == 0:
                raise ValueError(f"{source.spec!r} has {n} samples, fewer than world_size={world_size}")
            steps = per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
            if steps == 0:
                raise ValueError(f"batch_size={batch_size} is larger than the {per_rank} samples per rank of "
                                 f"{source.spec!r} (drop_last=True would yield nothing)")
            self._cfg.update(num_samples=n, per_rank=per_rank, steps_per_epoch=steps)
            self.steps_per_epoch: int | None = steps
            self._next_batch = 0
        else:
            if not hasattr(source, "epoch_records"):
                raise TypeError(f"{type(source).__name__} is neither map-style nor a record stream")
            self._workers = [{"epoch": 0, "consumed": 0} for _ in range(n_logical)]
            self._next_worker = 0
            total = source.num_samples
            self.steps_per_epoch = total // (self.world_size * self.batch_size) if total else None
            if not self.resampled:
                for lw in range(n_logical):
                    source.warn_if_starved(rank=self.rank, world_size=self.world_size, worker_id=lw,
                                           num_workers=n_logical)

    # -- iteration --------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next batch (for streams: of the next worker to deliver one)."""
        if self.map_style:
            return self._next_batch // self._cfg["steps_per_epoch"]
        return int(self._workers[self._next_worker]["epoch"])

    @property
    def batches_consumed(self) -> int | None:
        """Batches handed out since the start of training (map-style only)."""
        return self._next_batch if self.map_style else None

    def __iter__(self) -> "PairLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._batches()
        return next(self._it)

    def _start_state(self) -> dict[str, Any]:
        if self.map_style:
            return {"next_batch": self._next_batch}
        return {"workers": [dict(w) for w in self._workers], "next_worker": self._next_worker}

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        producer = _Producer(self.source, dict(self._cfg), self._start_state(), self.transform, self.tokenize,
                             self.companion)
        if self.num_workers == 0:
            it: Iterator = iter(producer)
        else:
            dl = torch.utils.data.DataLoader(producer, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, prefetch_factor=self.prefetch_factor)
            it = iter(dl)
        try:
            for images, ids, info in it:
                self._advance(info)
                yield images, ids
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _advance(self, info: dict[str, Any]) -> None:
        self.stats.merge(info["stats"])
        if self.map_style:
            if info["g"] != self._next_batch:  # would mean the worker round robin broke
                raise RuntimeError(f"loader order broken: got batch {info['g']}, expected {self._next_batch}")
            self._next_batch += 1
        else:
            lw = info["lw"]
            if lw != self._next_worker:
                raise RuntimeError(f"loader order broken: got worker {lw}, expected {self._next_worker}")
            self._workers[lw] = {"epoch": int(info["epoch"]), "consumed": int(info["consumed"])}
            self._next_worker = (lw + 1) % len(self._workers)

    def close(self) -> None:
        """Stop worker processes (iteration can continue later from the current state)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the loader (plus skip counts so far)."""
        d: dict[str, Any] = {"version": STATE_VERSION, "kind": "map" if self.map_style else "stream",
                             "spec": self.source.spec, "seed": self.seed, "batch_size": self.batch_size,
                             "world_size": self.world_size, "rank": self.rank, "drop_last": self.drop_last,
                             "epoch": self.epoch, "stats": self.stats.to_dict()}
        if self.map_style:
            d.update(num_samples=self._cfg["num_samples"], next_batch=self._next_batch)
        else:
            d.update(resampled=self.resampled, shuffle_buffer=self.shuffle_buffer, num_workers=len(self._workers),
                     workers=[dict(w) for w in self._workers], next_worker=self._next_worker)
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a saved position. Map-style states are rank independent and work with
        any num_workers; a stream state belongs to one rank and one num_workers."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {d.get('version')!r} not supported (expected {STATE_VERSION})")
        kind = "map" if self.map_style else "stream"
        if d.get("kind") != kind:
            raise ValueError(f"loader state is for a {d.get('kind')!r} source, this loader reads a {kind} source")
        keys = ["seed", "batch_size", "world_size", "drop_last"]
        keys += ["num_samples"] if self.map_style else ["rank", "resampled", "shuffle_buffer", "num_workers"]
        mine = self.state_dict()
        bad = [f"{k}: saved {d.get(k)!r}, loader has {mine[k]!r}" for k in keys if d.get(k) != mine[k]]
        if bad:
            raise ValueError("cannot resume exactly, loader state does not match: " + "; ".join(bad))
        self.close()
        if self.map_style:
            self._next_batch = int(d["next_batch"])
        else:
            self._workers = [{"epoch": int(w["epoch"]), "consumed": int(w["consumed"])} for w in d["workers"]]
            self._next_worker = int(d["next_worker"])
        self.stats = SkipStats.from_dict(d.get("stats", {}))

    def __repr__(self) -> str:
        return (f"PairLoader({self.source!r}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"num_workers={self.num_workers}, epoch={self.epoch})")


def make_pair_loader(source: PairSource, *, transform: Callable[..., torch.Tensor],
                     tokenize: Callable[[list[str]], torch.Tensor], batch_size: int, seed: int = 0, rank: int = 0,
                     world_size: int = 1, num_workers: int = 0, resampled: bool = False, drop_last: bool = True,
                     shuffle_buffer: int = 1000, prefetch_factor: int = 2, companion: Callable | None = None
                     ) -> PairLoader:
    """The training loader for any :class:`PairSource` (see :class:`PairLoader`).

    ``transform`` may take ``rng=`` (as :class:`clipforge.preprocess.Preprocess` does): it gets
    a per-sample seeded ``random.Random`` so augmentation is reproducible. ``shuffle_buffer``
    (streams only) shuffles records within a worker's stream; ``resampled`` (streams only)
    draws shards with replacement. ``companion`` (``--hard-negatives mirror``,
    :class:`clipforge.data.mirror.MirrorCompanions`): each batch becomes ``2B`` rows, the samples
    then their companions, with text :class:`~clipforge.data.mirror.MirroredText` (``present`` marks
    the real rows).
    """
    return PairLoader(source, transform=transform, tokenize=tokenize, batch_size=batch_size, seed=seed, rank=rank,
                      world_size=world_size, num_workers=num_workers, resampled=resampled, drop_last=drop_last,
                      shuffle_buffer=shuffle_buffer, prefetch_factor=prefetch_factor, companion=companion)
