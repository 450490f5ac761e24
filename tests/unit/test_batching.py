"""Batcher: what arrives while a flush is in flight goes in the next one, together."""

import asyncio

import pytest

from controlplane.calls.batching import Batcher


class Flusher:
    def __init__(self) -> None:
        self.batches: list[list[tuple[int, str]]] = []
        self.release = asyncio.Event()
        self.fail_next = False

    async def __call__(self, items):
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("database gone")
        return {key: value.upper() for key, value in items if key % 2 == 0}


async def test_items_arriving_during_a_flush_travel_together_in_the_next():
    flush = Flusher()
    batcher = Batcher(flush, default="none")
    first = asyncio.create_task(batcher.submit(0, "a"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(batcher.submit(k, v)) for k, v in ((1, "b"), (2, "c"))]
    await asyncio.sleep(0)
    assert flush.batches == [[(0, "a")]]  # the first went at once, alone
    flush.release.set()
    assert await first == "A"
    assert [await t for t in others] == ["none", "C"]  # absent from the answer: the default
    assert flush.batches == [[(0, "a")], [(1, "b"), (2, "c")]]
    assert batcher.flushes == 2


async def test_a_failed_flush_fails_its_items_only():
    flush = Flusher()
    batcher = Batcher(flush, default="none")
    flush.fail_next = True
    doomed = asyncio.create_task(batcher.submit(0, "a"))
    await asyncio.sleep(0)
    later = asyncio.create_task(batcher.submit(2, "b"))
    flush.release.set()
    with pytest.raises(ConnectionError):
        await doomed
    assert await later == "B"


async def test_a_caller_that_gave_up_is_not_flushed_and_batches_are_bounded():
    flush = Flusher()
    batcher = Batcher(flush, default="none", max_items=2)
    first = asyncio.create_task(batcher.submit(0, "a"))
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher.submit(2, "x"))
    rest = [asyncio.create_task(batcher.submit(k, "y")) for k in (4, 6, 8)]
    await asyncio.sleep(0)
    gone.cancel()
    flush.release.set()
    await first
    assert [await t for t in rest] == ["Y", "Y", "Y"]
    assert flush.batches == [[(0, "a")], [(4, "y")], [(6, "y"), (8, "y")]]


async def test_items_in_no_hurry_wait_for_company_until_an_urgent_one_comes():
    flush = Flusher()
    flush.release.set()
    batcher = Batcher(flush, default="none", window=0.2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = asyncio.create_task(batcher.submit(0, "a"))
    await asyncio.sleep(0.05)
    assert flush.batches == []  # still waiting for company
    second = asyncio.create_task(batcher.submit(2, "b"))
    assert [await first, await second] == ["A", "B"]
    assert flush.batches == [[(0, "a"), (2, "b")]]
    assert loop.time() - start >= 0.19
    # an urgent item takes whatever waits with it at once
    start = loop.time()
    waiting = asyncio.create_task(batcher.submit(4, "c"))
    await asyncio.sleep(0.01)
    assert await batcher.submit(6, "d", urgent=True) == "D"
    assert await waiting == "C"
    assert loop.time() - start < 0.15
    assert flush.batches[1:] == [[(4, "c"), (6, "d")]]


async def test_items_left_by_a_cancelled_batcher_fail_as_cancelled():
    from controlplane.calls.batching import BatchCancelled

    flush = Flusher()
    batcher = Batcher(flush, default="none", window=10)
    waiting = asyncio.create_task(batcher.submit(0, "a"))
    await asyncio.sleep(0.01)
    assert batcher._task is not None
    batcher._task.cancel()
    with pytest.raises(BatchCancelled):
        await waiting
    assert flush.batches == []
