"""The cross-request batcher: each caller gets exactly its own result, a failing item fails only
its request, a cancelled item is dropped, a full queue is Busy. Deterministic: the encoder is
held on an event while the next batch is queued, so batch contents never depend on timing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clipforge.search.batching import Batcher, ClientGone
from clipforge.search.http import Busy


class Gate:
    """An encoder that records its batches and holds its first call until released."""

    def __init__(self, fail_on=()) -> None:
        self.batches: list[list[int]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_on = set(fail_on)

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(10)
        bad = self.fail_on & set(items)
        if bad:
            raise ValueError(f"cannot encode {sorted(bad)}")
        return [10 * x for x in items]


def test_interleaved_requests_get_their_own_results():
    gate = Gate()
    b = Batcher(gate, max_batch=5, wait_s=0.0)
    first = b.submit(0)
    assert gate.entered.wait(10)
    b.wait_s = 30.0  # from now on only full batches leave (at once): the wait never expires here
    # three "requests" of sizes 3, 1, 4 interleaved while the first batch is held
    reqs = {"a": [1, 2, 3], "b": [4], "c": [5, 6, 7, 8]}
    order = [("a", 1), ("c", 5), ("b", 4), ("a", 2), ("c", 6), ("a", 3), ("c", 7), ("c", 8), ("x", 9), ("x", 11)]
    futs: dict[str, list] = {k: [] for k in ("a", "b", "c", "x")}
    for req, v in order:
        futs[req].append(b.submit(v))
    gate.release.set()
    assert first.result(10) == 0
    for req, values in reqs.items():
        assert [f.result(10) for f in futs[req]] == [10 * v for v in values]
    assert [f.result(10) for f in futs["x"]] == [90, 110]
    assert gate.batches == [[0], [1, 5, 4, 2, 6], [3, 7, 8, 9, 11]]
    b.close()


def test_a_failing_item_fails_only_its_request():
    gate = Gate(fail_on={7})
    b = Batcher(gate, max_batch=8, wait_s=0.0)
    b.submit(0)
    assert gate.entered.wait(10)
    b.wait_s = 30.0
    futs = [b.submit(v) for v in (5, 6, 7, 8, 9, 1, 2, 3)]
    gate.release.set()
    results = []
    for f in futs:
        e = f.exception(10)
        results.append(str(e) if e else f.result())
    assert results == [50, 60, "cannot encode [7]", 80, 90, 10, 20, 30]
    assert gate.batches[1] == [5, 6, 7, 8, 9, 1, 2, 3]  # the batch, then one by one
    assert gate.batches[2:] == [[5], [6], [7], [8], [9], [1], [2], [3]]
    b.close()


def test_cancelled_items_are_dropped():
    gate = Gate()
    b = Batcher(gate, max_batch=4, wait_s=0.0)
    b.submit(0)
    assert gate.entered.wait(10)
    f1, f2, f3 = b.submit(1), b.submit(2), b.submit(3)
    assert f2.cancel()  # the client of item 2 went away while it waited
    gate.release.set()
    assert (f1.result(10), f3.result(10)) == (10, 30)
    b.close()
    assert gate.batches == [[0], [1, 3]] and b.dropped == 1


def test_full_queue_is_busy_and_closing_finishes_the_queue():
    gate = Gate()
    b = Batcher(gate, max_batch=2, wait_s=0.0, max_pending=3)
    b.submit(0)
    assert gate.entered.wait(10)
    futs = [b.submit(v) for v in (1, 2, 3)]
    with pytest.raises(Busy, match="3 batch items waiting"):
        b.submit(4)
    gate.release.set()
    b.close()
    assert [f.result(0) for f in futs] == [10, 20, 30]
    with pytest.raises(Busy, match="shutting down"):
        b.submit(5)


def test_async_run_and_disconnect_watch():
    gate = Gate()
    b = Batcher(gate, max_batch=4, wait_s=0.0)

    async def main():
        held = asyncio.ensure_future(b.run(0))
        while not gate.entered.is_set():
            await asyncio.sleep(0.01)
        gone = asyncio.Event()
        lost = asyncio.ensure_future(b.run(1, gone.wait()))
        kept = asyncio.ensure_future(b.run(2, asyncio.Event().wait()))
        await asyncio.sleep(0)
        while b.depth < 2:
            await asyncio.sleep(0.01)
        gone.set()  # item 1's client disconnects before its batch starts
        with pytest.raises(ClientGone):
            await lost
        gate.release.set()
        return await held, await kept

    assert asyncio.run(main()) == (0, 20)
    b.close()
    assert gate.batches == [[0], [2]] and b.dropped == 1


def test_bad_settings():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError, match="wait"):
        Batcher(lambda x: x, wait_s=-1)


@pytest.mark.parametrize("threads", [1, 3])
def test_request_workers_search_on_their_own_faiss_threads(threads):
    """OpenMP's thread count is per thread: the pool's initializer sets it in each worker (a
    worker started after the main thread's setting would otherwise get the process default)."""
    import functools

    import faiss

    from clipforge.search.http import WorkerPool
    from clipforge.search.index import set_search_threads

    before = faiss.omp_get_max_threads()
    pool = WorkerPool(2, 8, 10.0, initializer=functools.partial(set_search_threads, threads))

    async def both() -> list[int]:
        return list(await asyncio.gather(*(pool.run(faiss.omp_get_max_threads) for _ in range(4))))

    try:
        assert asyncio.run(both()) == [threads] * 4
    finally:
        pool.shutdown()
    assert faiss.omp_get_max_threads() == before  # the calling thread's own count is untouched
