"""Graceful stop on SIGINT/SIGTERM: the training loop finishes its current step, writes a
checkpoint and returns, instead of dying mid-step with nothing saved. A second SIGINT while
stopping raises ``KeyboardInterrupt`` at once (the impatient user wins)."""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Iterator


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it only carries the
    flag). ``signum`` is the first signal received, or ``None``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread for the duration (delivered right after).

    Wrap the calls that may fork data-loading workers (the loader's ``next``): the workers inherit
    the blocked mask, so a signal sent to the whole process group (Ctrl-C, ``kill -- -PGID``,
    a scheduler) reaches only the main process, which finishes its step, checkpoints and shuts
    the workers down itself. Otherwise PyTorch's workers die on any SIGTERM not sent by their
    parent, and the main process raises from its SIGCHLD handler in the middle of a step.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover (Windows)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopRequest.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_code(signum: int | None) -> int:
    """Shell convention for a run stopped by a signal: 128 + signal number (130 SIGINT, 143 SIGTERM)."""
    return 0 if signum is None else 128 + int(signum)


__all__ = ["StopRequest", "signals_blocked", "exit_code"]
