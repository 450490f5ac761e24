"""Requests that arrive while the previous one is in flight travel together.

At a few hundred calls a second, one database round trip per call costs more CPU (on both
sides of the socket) than the statement itself. A `Batcher` sends the first item at once
and queues whatever arrives while that runs; the queue goes next, in one statement. When
calls are few, nothing waits; when they are many, batches grow instead of queues.

Items nobody waits for in a hurry may also wait up to `window` seconds for company: an
item submitted as `urgent` ends that wait for every item queued with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
R = TypeVar("R")


class BatchCancelled(RuntimeError):
    """The batching task was cancelled (its process stopping) before the item was flushed."""


class Batcher(Generic[K, V, R]):
    """`flush(items)` answers a mapping from each item's key to its result; an item whose
    key is absent gets `default`. A failed flush fails every item it carried."""

    def __init__(self, flush: Callable[[Sequence[tuple[K, V]]], Awaitable[Mapping[K, R]]], *,
                 default: R, max_items: int = 500, window: float = 0.0) -> None:
        self.flush, self.default, self.max_items = flush, default, max_items
        self.window = window
        self._queue: list[tuple[K, V, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self.flushes = 0

    async def submit(self, key: K, value: V, *, urgent: bool = False) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((key, value, future))
        if urgent or len(self._queue) >= self.max_items:
            self._hurry.set()
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self.window > 0 and not self._hurry.is_set():
                    try:
                        await asyncio.wait_for(self._hurry.wait(), self.window)
                    except TimeoutError:
                        pass
                self._hurry.clear()
                batch = self._queue[:self.max_items]
                del self._queue[:self.max_items]
                live = [(k, v, f) for k, v, f in batch if not f.done()]  # not cancelled
                if not live:
                    continue
                self.flushes += 1
                try:
                    results = await self.flush([(k, v) for k, v, _ in live])
                except asyncio.CancelledError:
                    _fail(live, BatchCancelled("the batch was cancelled"))
                    raise
                except Exception as exc:  # every caller of the batch hears of it; we go on
                    _fail(live, exc)
                    continue
                for key, _, future in live:
                    if not future.done():
                        future.set_result(results.get(key, self.default))
        finally:
            self._task = None
            # cancelled with items left: they fail rather than wait forever
            _fail(self._queue, BatchCancelled("the batch was cancelled"))
            self._queue.clear()


def _fail(items: Sequence[tuple[Any, Any, asyncio.Future[Any]]], exc: Exception) -> None:
    for _, _, future in items:
        if not future.done():
            future.set_exception(exc)
