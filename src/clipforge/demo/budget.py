"""Fitting the demo to a wall-time budget: which thread counts to time, and how many steps of
the measured length fit, so the cosine schedule completes within the budget instead of being
cut off mid-way (the measuring itself is :func:`clipforge.training.measure_step_time`)."""

from __future__ import annotations

import os

OVERHEAD_S = 30.0  # kept for start-up and evaluation (measured ~10 s; calibration is counted as it happens)


def thread_candidates() -> list[int]:
    """1 and (if there are several cores) 2 threads: on a CPU shared with other jobs one thread
    can be several times faster than two; on an idle one two win."""
    return sorted({1, min(2, os.cpu_count() or 1)})


def plan_steps(train_seconds: float, step_seconds: float, minimum: int = 20) -> int:
    """Steps of ``step_seconds`` that fit in ``train_seconds`` (at least ``minimum``)."""
    return max(minimum, int(train_seconds / step_seconds))


__all__ = ["OVERHEAD_S", "thread_candidates", "plan_steps"]
