"""How long one optimiser step of a training config takes on this machine: a few real steps,
data loading included, with each candidate torch thread count. Used to fit a run to a wall-time
budget (``clipforge demo``) and to choose the thread count on a shared CPU."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..data import make_pair_loader, open_pairs
from ..precision import cast_weights
from ..utils import torch_threads
from .config import TrainConfig
from .. import fast
from .loop import build_model, caption_tokenizer, run_precision
from .token_losses import freeze_unused
from .optim import build_optimizer
from .recipes import apply_recipes, train_transform
from .step import make_train_step, objective_module


def measure_step_time(config: TrainConfig, threads: Sequence[int], n: int = 3, warmup: int = 2) -> dict[int, float]:
    """Seconds per optimiser step of ``config``'s model, batch and data, for each thread count
    (median of ``n`` steps after ``warmup`` steps, data waiting included: the warm-up steps use up
    the batches the workers prefetched while the model was built). No state of a real run is
    touched: the model, data stream (seed + 99) and RNG are private to the measurement."""
    result: dict[int, float] = {}
    precision = run_precision(config, torch.device("cpu"))[0]  # the precision the run would take
    with torch.random.fork_rng(devices=[]):
        model = cast_weights(build_model(config), precision).train()
        if config.fast_paths:  # time the step the run will take
            fast.enable(model)
        source = open_pairs(config.data, split="train", seed=config.seed + 99, **config.data_options())
        loader = make_pair_loader(source, transform=train_transform(model.config.preprocess, config),
                                  tokenize=caption_tokenizer(config, model), batch_size=config.batch_size,
                                  seed=config.seed + 99, rank=0, world_size=1, num_workers=config.num_workers)
        apply_recipes(model, config)  # patch dropout, locking: they change the step's cost
        freeze_unused(model)
        step = make_train_step(model, objective_module(model), build_optimizer(model, 1e-5, 0.0, config.betas, config.eps),
                               precision=precision, loss=config.loss)
        try:
            for t in threads:
                with torch_threads(t):
                    times = []
                    for i in range(n + warmup):
                        start = time.perf_counter()
                        step([next(loader) for _ in range(config.accum_steps)])
                        if i >= warmup:
                            times.append(time.perf_counter() - start)
                result[t] = float(np.median(times))
        finally:
            loader.close()
    return result


__all__ = ["measure_step_time"]
