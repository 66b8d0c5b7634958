"""Replaying random draws: gradient accumulation runs each micro-batch twice (features cached
without gradients, then recomputed with them; see :mod:`.step`), so a forward that draws random
numbers (patch dropout) must draw the same ones both times or the cached features would belong to
another model. Each micro-batch's first pass records torch's generator states; its re-run starts
from them and leaves the generators where the first passes left them, so the run's random stream
(and so a resumed run) is the same as without the re-runs."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def rng_state(device: torch.device) -> tuple[torch.Tensor, Any]:
    """torch's CPU generator state and, on a CUDA device, that device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replaying(state: tuple[torch.Tensor, Any], device: torch.device) -> Iterator[None]:
    """Run the block from the generator ``state`` (from :func:`rng_state`); restore the current
    states afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


__all__ = ["rng_state", "replaying"]
