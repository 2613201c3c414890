"""The dynamic batcher alone: batch formation, per-request results, failures, bounds and draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from graphs.serve.batcher import DynamicBatcher, QueueFull, ShuttingDown


class Recorder:
    """A compute that answers each request with its payload and records the batches it saw."""

    def __init__(self, fail_on=None, gate: threading.Event | None = None):
        self.batches, self.fail_on, self.gate = [], fail_on, gate

    def __call__(self, batch):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append([(p.rows, p.payload) for p in batch])
        if self.fail_on is not None and any(p.payload == self.fail_on for p in batch):
            raise RuntimeError("backend broke")
        return [("answer", p.payload) for p in batch]


def run(coro):
    return asyncio.run(coro)


async def stop_while_held(batcher, release):
    """Stop ``batcher`` while its computation is held: a new request is refused while it drains, then ``release()``
    lets the held computation finish, and the stop completes."""
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.05)
    with pytest.raises(ShuttingDown):
        await batcher.submit(1, 100)
    release()
    await stopping


def test_batches_fill_up_to_max_rows_and_answer_each_request():
    async def main():
        compute = Recorder()
        batcher = DynamicBatcher(compute, max_rows=10, max_delay_s=0.05, max_queue=100)
        await batcher.start()
        jobs = [(4, 0), (4, 1), (4, 2), (1, 3), (1, 4), (30, 5)]
        answers = await asyncio.gather(*(batcher.submit(rows, n) for rows, n in jobs))
        await batcher.stop()
        return compute.batches, answers

    batches, answers = run(main())
    assert answers == [("answer", n) for n in range(6)]
    assert [[n for _, n in b] for b in batches] == [[0, 1], [2, 3, 4], [5]]


def test_a_lone_request_leaves_at_once_despite_a_long_deadline():
    async def main():
        batcher = DynamicBatcher(Recorder(), max_rows=100, max_delay_s=5.0, max_queue=100)
        await batcher.start()
        started = time.perf_counter()
        answer = await batcher.submit(1, 0)
        waited = time.perf_counter() - started
        await batcher.stop()
        return answer, waited

    answer, waited = run(main())
    assert answer == ("answer", 0) and waited < 0.5


def test_a_batch_waits_for_announced_arrivals_and_no_longer_than_they_take():
    async def arrive(batcher, n, after):
        with batcher.arriving():
            await asyncio.sleep(after)
            if n is None:  # announced, then it never came (a body that failed to parse)
                return None
        return await batcher.submit(1, n)

    async def main():
        compute = Recorder()
        batcher = DynamicBatcher(compute, max_rows=100, max_delay_s=5.0, max_queue=100)
        await batcher.start()
        started = time.perf_counter()
        await asyncio.gather(arrive(batcher, 0, 0.0), arrive(batcher, 1, 0.1), arrive(batcher, None, 0.2))
        waited = time.perf_counter() - started
        await batcher.stop()
        return compute.batches, waited

    batches, waited = run(main())
    assert [[n for _, n in b] for b in batches] == [[0, 1]]
    assert waited < 1.0


def test_a_delay_lets_concurrent_requests_share_one_batch():
    async def main():
        compute = Recorder()
        batcher = DynamicBatcher(compute, max_rows=1000, max_delay_s=0.2, max_queue=100)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(1, n) for n in range(20)))
        await batcher.stop()
        return compute.batches

    batches = run(main())
    assert len(batches) == 1 and len(batches[0]) == 20


async def _failing_inline(batch):
    await asyncio.sleep(0)
    if any(p.payload == 1 for p in batch):
        raise RuntimeError("device broke")
    return [("answer", p.payload) for p in batch]


@pytest.mark.parametrize("where", ["worker", "inline"])
def test_a_failing_batch_fails_its_own_requests_only(where):
    async def main():
        if where == "worker":
            batcher = DynamicBatcher(Recorder(fail_on=1), max_rows=2, max_delay_s=0.05, max_queue=100)
        else:
            batcher = DynamicBatcher(
                Recorder(), max_rows=2, max_delay_s=0.05, max_queue=100, inline_rows=2, inline=_failing_inline
            )
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(1, n) for n in range(4)), return_exceptions=True)
        await batcher.stop()
        return results

    results = run(main())
    assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
    assert results[2:] == [("answer", 2), ("answer", 3)]


def test_a_full_queue_refuses_at_once_and_stop_drains_the_rest():
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher(Recorder(gate=gate), max_rows=1, max_delay_s=0.0, max_queue=3)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(1, 0))]
        await asyncio.sleep(0.05)  # request 0 is computing, held at the gate
        tasks += [asyncio.create_task(batcher.submit(1, n)) for n in range(1, 4)]
        await asyncio.sleep(0.05)  # requests 1-3 wait in the queue
        with pytest.raises(QueueFull, match="3 requests waiting"):
            await batcher.submit(1, 99)
        await stop_while_held(batcher, gate.set)
        return [t.result() for t in tasks]

    assert run(main()) == [("answer", n) for n in range(4)]


def test_stop_while_an_inline_batch_awaits_its_device_answers_it_and_every_queued_request():
    async def main():
        device = asyncio.Event()
        seen = []

        async def inline(batch):
            seen.append([p.payload for p in batch])
            await device.wait()
            return [("answer", p.payload) for p in batch]

        batcher = DynamicBatcher(Recorder(), max_rows=2, max_delay_s=0.0, max_queue=10, inline_rows=2, inline=inline)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(1, n)) for n in range(5)]
        await asyncio.sleep(0.05)  # the first batch is on the device, the others queued
        await stop_while_held(batcher, device.set)
        return [t.result() for t in tasks], seen

    answers, seen = run(main())
    assert answers == [("answer", n) for n in range(5)]
    assert seen == [[0, 1], [2, 3], [4]]


def test_a_lone_request_goes_at_once_in_its_own_task_and_others_queue_behind_it():
    async def main():
        device = asyncio.Event()
        seen, tasks, in_flight, most = [], [], [0], [0]

        async def inline(batch):
            seen.append(([p.payload for p in batch], asyncio.current_task()))
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            await device.wait()
            in_flight[0] -= 1
            return [("answer", p.payload) for p in batch]

        batcher = DynamicBatcher(Recorder(), max_rows=8, max_delay_s=0.0, max_queue=10, inline_rows=8, inline=inline)
        await batcher.start()
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(batcher.submit(1, 0))]
        await asyncio.sleep(0.05)  # request 0 is on the device
        tasks += [asyncio.create_task(batcher.submit(1, n)) for n in (1, 2, 3)]
        await asyncio.sleep(0.05)
        device.set()
        answers = [await t for t in tasks]
        await batcher.stop()
        return answers, seen, tasks, most[0]

    answers, seen, tasks, most = run(main())
    assert answers == [("answer", n) for n in range(4)]
    assert [payloads for payloads, _ in seen] == [[0], [1, 2, 3]]
    # Computed in the request's own task, then by the batching task; never two batches at once.
    assert seen[0][1] is tasks[0] and seen[1][1] not in tasks and most == 1


def test_requests_read_in_one_turn_of_the_loop_share_a_batch_though_the_batcher_is_idle():
    """A computation that never yields (the CPU kernel's) would otherwise let each of them go alone."""
    seen = []

    async def inline(batch):
        seen.append([p.payload for p in batch])
        return [("answer", p.payload) for p in batch]

    async def main():
        batcher = DynamicBatcher(Recorder(), max_rows=8, max_delay_s=0.0, max_queue=10, inline_rows=8, inline=inline)
        await batcher.start()
        await asyncio.sleep(0)
        answers = await asyncio.gather(*(batcher.submit(1, n) for n in range(6)))
        alone = await batcher.submit(1, 6)
        await batcher.stop()
        return answers, alone

    answers, alone = run(main())
    assert answers == [("answer", n) for n in range(6)] and alone == ("answer", 6)
    assert seen == [[0, 1, 2, 3, 4, 5], [6]]


def test_small_batches_run_on_the_event_loop_and_larger_ones_on_the_worker():
    threads = []

    def compute(batch):
        threads.append((sum(p.rows for p in batch), threading.current_thread().name))
        return [None] * len(batch)

    async def main():
        batcher = DynamicBatcher(compute, max_rows=100, max_delay_s=0.0, max_queue=10, name="w", inline_rows=4)
        await batcher.start()
        await batcher.submit(4, 0)
        await batcher.submit(5, 1)
        await batcher.stop()

    run(main())
    loop_thread = threading.current_thread().name
    assert threads[0] == (4, loop_thread) and threads[1][0] == 5 and threads[1][1].startswith("w")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"max_rows": 0}, "max_rows=0"),
        ({"max_delay_s": -1.0}, "max_delay_s=-1.0"),
        ({"max_queue": 0}, "max_queue=0"),
        ({"inline_rows": -1}, "inline_rows=-1"),
    ],
)
def test_arguments_are_validated(kwargs, needle):
    args = {"max_rows": 8, "max_delay_s": 0.0, "max_queue": 4, **kwargs}
    with pytest.raises(ValueError, match=needle):
        DynamicBatcher(Recorder(), **args)
