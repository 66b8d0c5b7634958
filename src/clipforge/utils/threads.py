"""torch's intra-op thread count for the length of a block, restored afterwards (a run or a fit
may be called in a process that does other things)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads; ``None`` or ``0`` leaves the count alone.

    Why it matters here: on a CPU shared with other jobs each OpenMP parallel region waits for a
    descheduled sibling thread, so small work (a 500 x 256 logistic fit, a tiny model's step) ran
    up to 10x faster on 1 thread than on 2 (measured: 7.3 s vs 0.7 s for the fit).
    """
    old = torch.get_num_threads()
    if not n or n == old:
        yield
        return
    if n < 0:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


__all__ = ["torch_threads"]
