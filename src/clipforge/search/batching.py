"""Dynamic batching across requests: items submitted by concurrent requests (texts to embed,
preprocessed images) are gathered for up to ``wait_s`` seconds or ``max_batch`` items and
encoded by one call, each caller getting exactly its own result.

- One thread per :class:`Batcher` runs the encode calls (the model is the bottleneck; requests
  only wait on a future, so a batch can hold more items than there are worker threads).
- A batch that fails is retried item by item: a failing item fails only its own request.
- An item whose future was cancelled (its client went away) before its batch started is dropped.
- At most ``max_pending`` items wait (:class:`~.http.Busy`, a 503, beyond).

Numerics are the encoder's: the service's encoders (``Searcher(exact=True)``, :mod:`.exact`)
give a row the same bits whatever batch it rode in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from .http import Busy

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("clipforge.search.batching")


class ClientGone(Exception):
    """The awaiting client went away: its item was dropped."""


@dataclass
class _Item(Generic[T]):
    value: T
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """``encode(list of items) -> sequence of results`` (same length, same order), batched."""

    def __init__(self, encode: Callable[[list[T]], Sequence[R]], *, max_batch: int = 32, wait_s: float = 0.005,
                 max_pending: int = 256, name: str = "batch",
                 on_batch: Callable[[int], None] | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not wait_s >= 0:
            raise ValueError(f"batch wait must be >= 0 seconds, got {wait_s!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.encode, self.max_batch, self.wait_s, self.max_pending = encode, max_batch, wait_s, max_pending
        self.name, self.on_batch = name, on_batch
        self._queue: deque[_Item[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.items = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name=f"clipforge-batch-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    def submit(self, value: T) -> Future:
        """Queue ``value``; its future gets the result (or the exception). Busy when full."""
        with self._cond:
            if self._closed:
                raise Busy("server is shutting down")
            if len(self._queue) >= self.max_pending:
                raise Busy(f"server busy: {len(self._queue)} {self.name} items waiting; retry later")
            item = _Item(value)
            self._queue.append(item)
            self._cond.notify()
        return item.future

    async def run(self, value: T, gone: Any = None) -> R:
        """Submit and await from the event loop; the item is cancelled if the awaiting task is,
        or (:class:`ClientGone`) when the awaitable ``gone`` (the client's disconnect) completes first."""
        fut = self.submit(value)
        waiter = asyncio.wrap_future(fut)
        if gone is None:
            try:
                return await waiter
            except asyncio.CancelledError:
                fut.cancel()
                raise
        watcher = asyncio.ensure_future(gone)
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        finally:
            if not watcher.done():
                watcher.cancel()
        if waiter in done:
            return waiter.result()
        fut.cancel()
        waiter.cancel()
        raise ClientGone(f"{self.name} item dropped: the client went away")

    def close(self) -> None:
        """Finish the items already queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(60)

    # --- the batching thread ---------------------------------------------------------------------
    def _take(self) -> list[_Item[T]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + self.wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Item[T]] = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if item.future.set_running_or_notify_cancel():
                    batch.append(item)
                else:
                    self.dropped += 1
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = list(self.encode([it.value for it in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name} encoder returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # noqa: BLE001 - isolate the failing item(s): retry one by one
                if len(batch) == 1:
                    batch[0].future.set_exception(e)
                    continue
                log.debug("%s batch of %d failed (%s): retrying item by item", self.name, len(batch), e)
                for it in batch:
                    try:
                        (r,) = self.encode([it.value])
                        it.future.set_result(r)
                    except Exception as e1:  # noqa: BLE001 - this item's own failure
                        it.future.set_exception(e1)
                continue
            for it, r in zip(batch, results):
                it.future.set_result(r)
