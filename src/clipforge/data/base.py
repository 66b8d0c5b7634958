"""The image-text pair source interface shared by manifests, WebDataset shards and the
built-in scenes. Training, evaluation and search only see :class:`Sample` and
:class:`PairSource`, never the storage format."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .skip import BadSample, SkipStats


@dataclass
class Sample:
    """One image with one or more captions.

    ``key`` is stable across runs (manifest image path, shard member key, scene id), so it can
    name the sample in logs, skip reports and search indexes.
    """

    key: str
    image: Image.Image
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints/strings, identical in every process and run
    (Python's ``hash`` is salted per process, so it cannot be used for worker seeding)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def stable_rng(*parts: Any) -> random.Random:
    return random.Random(stable_seed(*parts))


def split_indices(n: int, *, rank: int, world_size: int, worker_id: int, num_workers: int,
                  order: np.ndarray | None = None) -> np.ndarray:
    """The indices (in ``order``, default natural) that one (rank, worker) reads: rank r takes
    every world_size-th index, then worker w every num_workers-th of those."""
    _check_partition(rank, world_size, worker_id, num_workers)
    idx = np.arange(n) if order is None else np.asarray(order)
    return idx[rank::world_size][worker_id::num_workers]


def _check_partition(rank: int, world_size: int, worker_id: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got worker_id={worker_id}, "
                         f"num_workers={num_workers}")


class PairSource:
    """Base class of image-text pair sources.

    Map-style sources (``is_map_style``: manifests, scenes) have ``len()`` and ``get(i)``;
    streams (WebDataset shards) only iterate. ``iter_samples`` skips bad samples, counting
    them in ``stats`` (or the ``stats`` object passed in).
    """

    is_map_style: bool = False
    num_samples: int | None = None
    spec: str = ""
    name: str = ""  # short display name (manifest stem, shard folder, scenes-<split>)

    def __init__(self) -> None:
        self.stats = SkipStats()

    # -- map-style API -------------------------------------------------------------------
    def __len__(self) -> int:
        if not self.is_map_style or self.num_samples is None:
            raise TypeError(f"{type(self).__name__} is a stream and has no len(); use num_samples")
        return self.num_samples

    def get(self, i: int) -> Sample:
        """Sample ``i``; raises :class:`BadSample` for an unusable one (IndexError if out of range)."""
        raise TypeError(f"{type(self).__name__} is a stream: use iter_samples()")

    def __getitem__(self, i: int) -> Sample:
        return self.get(i)

    # -- iteration -----------------------------------------------------------------------
    def iter_samples(self, *, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                     epoch: int = 0, seed: int = 0, resampled: bool = False, shuffle: bool | None = None,
                     stats: SkipStats | None = None) -> Iterator[Sample]:
        """Good samples of this (rank, worker) partition for one epoch.

        Map-style sources yield in natural index order unless ``shuffle=True`` (a permutation
        from ``(seed, epoch)``); ``resampled=True`` draws indices with replacement forever.
        """
        if not self.is_map_style:
            raise NotImplementedError
        stats = self.stats if stats is None else stats
        n = len(self)
        if resampled:
            _check_partition(rank, world_size, worker_id, num_workers)
            rng = np.random.default_rng(stable_seed("resample", seed, rank, worker_id))
            while True:
                for i in rng.integers(0, n, size=1024):
                    s = self._get_or_count(int(i), stats)
                    if s is not None:
                        yield s
        order = np.random.default_rng(stable_seed("perm", seed, epoch)).permutation(n) if shuffle else None
        for i in split_indices(n, rank=rank, world_size=world_size, worker_id=worker_id,
                               num_workers=num_workers, order=order):
            s = self._get_or_count(int(i), stats)
            if s is not None:
                yield s

    def _get_or_count(self, i: int, stats: SkipStats) -> Sample | None:
        try:
            return self.get(i)
        except BadSample as e:
            stats.add_bad(e)
            return None

    def __repr__(self) -> str:
        n = "?" if self.num_samples is None else self.num_samples
        return f"{type(self).__name__}({self.spec!r}, num_samples={n})"
