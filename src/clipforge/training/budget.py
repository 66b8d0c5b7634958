"""Fitting a run to a wall-time budget: time a few real training steps (data loading included),
pick the faster thread count, and derive the number of steps, so the cosine schedule completes
within the budget instead of being cut off mid-way."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
import torch

from .config import TrainConfig


def thread_candidates() -> list[int]:
    """1 and (if there are several cores) 2 threads: on a CPU shared with other jobs one thread
    can be several times faster than two; on an idle one two win."""
    return sorted({1, min(2, os.cpu_count() or 1)})


def calibrate_step_time(config: TrainConfig, threads: Sequence[int], n: int = 3, warmup: int = 2) -> dict[int, float]:
    """Seconds per optimiser step of ``config``'s model, batch and data, for each thread count
    (median of ``n`` steps after ``warmup`` steps, data waiting included: the warm-up steps use up
    the batches the workers prefetched while the model was built). No state of the real run is touched."""
    from ..data import make_pair_loader, open_pairs
    from ..preprocess import image_transform
    from .loop import TokenizeCaptions, build_model
    from .loss import ClipLoss
    from .optim import build_optimizer
    from .step import FeatureModel, TrainStep

    previous = torch.get_num_threads()
    result: dict[int, float] = {}
    with torch.random.fork_rng(devices=[]):
        model = build_model(config).train()
        source = open_pairs(config.data, split="train", seed=config.seed + 99)
        loader = make_pair_loader(source, transform=image_transform(model.config.preprocess, train=True),
                                  tokenize=TokenizeCaptions(model.context_length), batch_size=config.batch_size,
                                  seed=config.seed + 99, rank=0, world_size=1, num_workers=config.num_workers)
        step = TrainStep(model, FeatureModel(model), ClipLoss(), build_optimizer(model, 1e-5, 0.0, config.betas, config.eps),
                         precision=config.precision)
        try:
            for t in threads:
                torch.set_num_threads(t)
                times = []
                for i in range(n + warmup):
                    start = time.perf_counter()
                    step([next(loader) for _ in range(config.accum_steps)])
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
                result[t] = float(np.median(times))
        finally:
            torch.set_num_threads(previous)
            loader.close()
    return result


def plan_steps(train_seconds: float, step_seconds: float, minimum: int = 20) -> int:
    return max(minimum, int(train_seconds / step_seconds))


__all__ = ["calibrate_step_time", "plan_steps", "thread_candidates"]
