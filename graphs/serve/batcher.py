"""Dynamic batching: coalesce queued requests into one computation, answer each with its own rows.

A batch starts with the oldest queued request and takes the following ones while they fit in ``max_rows`` (the
largest bucket). It waits for more only while requests are announced as arriving (``arriving()``: their bodies
are being read or parsed), and no longer than ``max_delay_s`` since it began collecting; with nothing queued and
nothing arriving it leaves at once, so a lone request never waits for the deadline. A request larger than
``max_rows`` forms a batch of its own. A request that finds nothing queued, nothing arriving, no batch being
collected or computed and no other request doing the same in its turn of the event loop, and that is small enough
to be computed on the event loop, is computed at once in its own task, a batch of one: the hand-over to the
batching task and back cost about 8 µs a request. The queue is
bounded: past ``max_queue`` waiting requests ``submit`` raises ``QueueFull`` at once.
Every accepted request is answered exactly once, with its result or the computation's exception, also across
``stop()``, which refuses new requests and drains the queue before it returns.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


# Put on the queue to wake a collecting batch when the last announced arrival turns out not to come.
_WAKE = object()


@dataclass
class Pending:
    rows: int
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchRecord:
    """What one computation served, for metrics: requests, real rows, seconds each request waited, compute time."""

    requests: int
    rows: int
    queue_seconds: tuple[float, ...]
    compute_seconds: float


class DynamicBatcher:
    """``compute(batch)`` runs on one worker thread and returns one result per ``Pending`` of the batch; a batch of
    at most ``inline_rows`` rows runs on the event loop instead, where the thread hand-off would cost more than
    the computation: awaited as ``inline(batch)`` where given (it may yield to other requests while a device
    works), else ``compute(batch)`` there."""

    def __init__(
        self,
        compute: Callable[[Sequence[Pending]], Sequence[Any]],
        max_rows: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchRecord], None] | None = None,
        name: str = "batcher",
        inline_rows: int = 0,
        inline: Callable[[Sequence[Pending]], Awaitable[Sequence[Any]]] | None = None,
    ):
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows} is out of range: allowed >= 1")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s={max_delay_s} is out of range: allowed >= 0")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} is out of range: allowed >= 1")
        if inline_rows < 0:
            raise ValueError(f"inline_rows={inline_rows} is out of range: allowed >= 0")
        self.compute, self.max_rows, self.max_delay_s, self.max_queue = compute, max_rows, max_delay_s, max_queue
        self.on_batch, self.inline_rows, self.inline = on_batch, inline_rows, inline
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: asyncio.Queue[Pending | object | None] | None = None
        self._held: collections.deque[Pending] = collections.deque()
        self._worker: asyncio.Task | None = None
        self._closing = False
        # Accepted and not yet handed to the worker thread: what the queue bound counts.
        self.waiting = 0
        self._arriving = 0
        self._collecting = False
        # The batching task waits for a first request with nothing queued or held.
        self._idle = False
        # Resolved when the batch of one computed in its request's task is done.
        self._alone: asyncio.Future | None = None
        # Requests that found the batcher free and yield once before going alone.
        self._considering = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request on its way (a body being read): a collecting batch waits for it, up to its deadline.
        Submit after leaving the block, with no ``await`` in between."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._arriving == 0 and self._collecting:
                self._queue.put_nowait(_WAKE)

    async def submit(self, rows: int, payload: Any) -> Any:
        if self._closing or self._queue is None:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        if self.waiting >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} requests waiting); retry later")
        if rows <= self.inline_rows and self._batcher_free():
            # Requests read in the same turn of the event loop reach this point one after another: each yields
            # once, so that the first does not go alone while the others would have formed a batch with it.
            self._considering += 1
            try:
                await asyncio.sleep(0)
            finally:
                self._considering -= 1
            if not self._considering and self._batcher_free():
                return await self._compute_alone(rows, payload)
        item = Pending(rows, payload, asyncio.get_running_loop().create_future())
        self.waiting += 1
        self._queue.put_nowait(item)
        # Not shielded: a cancelled request cancels its future, which the worker then skips (it answers only
        # futures not done); a shield would cost every request one more future and one more loop iteration.
        return await item.future

    def _batcher_free(self) -> bool:
        return self._idle and self._alone is None and not self._arriving and self._queue.empty()

    async def _compute_alone(self, rows: int, payload: Any) -> Any:
        """A batch of one, computed in the request's own task; the batching task starts no batch meanwhile."""
        alone = self._alone = asyncio.get_running_loop().create_future()
        pending = Pending(rows, payload, alone)
        try:
            results = self.compute([pending]) if self.inline is None else await self.inline([pending])
        finally:
            self._alone = None
            alone.set_result(None)
        if self.on_batch is not None:
            compute_seconds = time.perf_counter() - pending.enqueued
            self.on_batch(BatchRecord(1, rows, (0.0,), compute_seconds))
        return results[0]

    async def stop(self) -> None:
        """Refuse new requests, answer every queued one, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._queue.put_nowait(None)
        await self._worker
        if self._alone is not None:
            await self._alone
        self._worker = None
        self._executor.shutdown(wait=True)

    async def _next(self, timeout: float | None) -> Pending | object | None:
        if self._held:
            return self._held.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            # wait_for with no time left would give up before even looking at a non-empty queue.
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                raise TimeoutError from None
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _collect(self, first: Pending) -> list[Pending]:
        self._collecting = True
        try:
            return await self._gather(first)
        finally:
            self._collecting = False

    async def _gather(self, first: Pending) -> list[Pending]:
        batch, rows = [first], first.rows
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_rows:
            if not self._held and self._queue.empty() and not self._arriving:
                break
            try:
                item = await self._next(deadline - time.perf_counter())
            except TimeoutError:
                break
            if item is _WAKE:
                continue
            if item is None:
                # The stop marker: serve what is collected, then let the worker see the marker again.
                self._queue.put_nowait(None)
                break
            if rows + item.rows > self.max_rows:
                self._held.appendleft(item)
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._idle = not self._held
            try:
                first = await self._next(None)
            finally:
                self._idle = False
            if first is _WAKE:
                continue
            while self._alone is not None:
                # A batch of one is on the device: requests queue meanwhile, and join the next batch.
                await self._alone
            if first is None:
                if not self._held:
                    return
                self._queue.put_nowait(None)
                continue
            batch = await self._collect(first)
            self.waiting -= len(batch)
            started = time.perf_counter()
            queue_seconds = tuple(started - p.enqueued for p in batch)
            rows = sum(p.rows for p in batch)
            try:
                if rows <= self.inline_rows:
                    results = self.compute(batch) if self.inline is None else await self.inline(batch)
                else:
                    results = await loop.run_in_executor(self._executor, self.compute, batch)
            except Exception as error:  # noqa: BLE001 - every waiter must get an answer, whatever broke
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            compute_seconds = time.perf_counter() - started
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(BatchRecord(len(batch), rows, queue_seconds, compute_seconds))
