"""The worker's threads for ``def`` tasks: quick calls share a trip to a thread, and
nothing a shared call does holds the others up for long, loses a result or runs a call
whose job was cancelled."""

import contextvars
import threading
import time

import anyio
import anyio.lowlevel
import pytest

from backlane.threads import QUICK, SHARE_AT_MOST, ThreadRunner

pytestmark = pytest.mark.anyio

job_name: contextvars.ContextVar[str] = contextvars.ContextVar("job_name", default="")


def runner(threads: int = 4) -> ThreadRunner:
    return ThreadRunner(anyio.CapacityLimiter(threads))


async def knowing_quick(key: str = "t") -> ThreadRunner:
    """A runner that has seen one quick call of ``key``: its next calls may share a trip."""
    threads = runner()
    await threads.run(key, lambda: None)
    return threads


async def run_together(threads: ThreadRunner, calls: list[tuple[str, object]]) -> list[object]:
    """Start every call in the same turn of the event loop; their results, in order."""
    results: list[object] = [None] * len(calls)

    async def one(i: int, key: str, func: object) -> None:
        results[i] = await threads.run(key, func)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for i, (key, func) in enumerate(calls):
            tg.start_soon(one, i, key, func)
    return results


async def test_quick_calls_of_one_turn_share_a_thread() -> None:
    threads = runner()
    await threads.run("quick", threading.get_ident)  # now known to be quick
    idents = await run_together(threads, [("quick", threading.get_ident)] * 10)
    assert len(set(idents)) == 1
    assert idents[0] != threading.get_ident()  # a worker thread, not the loop's


async def test_unknown_and_slow_tasks_get_threads_of_their_own() -> None:
    threads = runner(threads=10)
    # a task never seen is not taken for quick: ten calls, ten threads at once
    entered = threading.Barrier(10, timeout=5)

    def meets_the_others() -> int:
        entered.wait()
        return threading.get_ident()

    idents = await run_together(threads, [("first-time", meets_the_others)] * 10)
    assert len(set(idents)) == 10

    def slow() -> int:
        time.sleep(QUICK * 3)
        return threading.get_ident()

    await threads.run("slow", slow)  # its last call was slow
    entered = threading.Barrier(4, timeout=5)
    idents = await run_together(threads, [("slow", meets_the_others)] * 4)
    assert len(set(idents)) == 4


async def test_a_shared_call_that_blocks_holds_the_others_up_briefly() -> None:
    threads = await knowing_quick("usually-quick")
    release = threading.Event()

    def first() -> str:
        release.wait(5)
        return "first"

    async def time_the_rest() -> float:
        start = time.perf_counter()
        await run_together(threads, [("usually-quick", lambda: "rest")] * 3)
        return time.perf_counter() - start

    async with anyio.create_task_group() as tg:
        got: list[object] = []

        async def blocked() -> None:
            got.append(await threads.run("usually-quick", first))

        tg.start_soon(blocked)
        took = await time_the_rest()
        assert got == []  # still blocked
        release.set()
    assert got == ["first"]
    assert took < SHARE_AT_MOST + 1.0  # not until the blocked call ended (5 s)


async def test_calls_sharing_a_trip_behind_a_blocked_one_go_on_without_it() -> None:
    threads = await knowing_quick()
    release = threading.Event()
    order: list[str] = []

    def blocks() -> str:
        release.wait(5)
        order.append("blocked")
        return "blocked"

    def quick(name: str) -> str:
        order.append(name)
        return name

    async with anyio.create_task_group() as tg:
        results: list[object] = []

        async def call(func: object) -> None:
            results.append(await threads.run("t", func))  # type: ignore[arg-type]

        tg.start_soon(call, blocks)
        tg.start_soon(call, lambda: quick("a"))
        tg.start_soon(call, lambda: quick("b"))
        with anyio.fail_after(2):
            while len(results) < 2:
                await anyio.sleep(0.001)
        release.set()
    assert sorted(order[:2]) == ["a", "b"]
    assert sorted(results, key=str) == ["a", "b", "blocked"]


async def test_results_errors_and_context_reach_each_caller() -> None:
    threads = await knowing_quick()

    def whose() -> str:
        return job_name.get()

    def fails() -> None:
        raise ValueError("no")

    def exits() -> None:
        raise SystemExit(3)

    def stops() -> None:
        raise StopIteration

    async def as_job(name: str, func: object) -> object:
        job_name.set(name)
        try:
            return await threads.run("t", func)  # type: ignore[arg-type]
        except BaseException as exc:  # the test looks at what arrived
            return exc

    outcomes: dict[str, object] = {}

    async def record(name: str, func: object) -> None:
        outcomes[name] = await as_job(name, func)

    async with anyio.create_task_group() as tg:
        for name, func in [("a", whose), ("b", fails), ("c", whose), ("d", exits), ("e", stops)]:
            tg.start_soon(record, name, func)
    assert outcomes["a"] == "a"
    assert outcomes["c"] == "c"
    assert isinstance(outcomes["b"], ValueError)
    assert isinstance(outcomes["d"], SystemExit)
    assert isinstance(outcomes["e"], RuntimeError)


async def test_a_cancelled_caller_returns_at_once_and_a_waiting_call_never_runs() -> None:
    threads = runner(threads=1)
    release = threading.Event()
    ran: list[str] = []

    def blocks() -> None:
        release.wait(5)
        ran.append("blocks")

    async with anyio.create_task_group() as tg:
        tg.start_soon(threads.run, "slow", blocks)
        await anyio.sleep(0.05)  # it holds the only thread
        with anyio.move_on_after(0.05) as waited:
            await threads.run("other", lambda: ran.append("never"))
        assert waited.cancelled_caught
        tg.cancel_scope.cancel()  # the blocked call's caller gives up too: it returns
    release.set()
    await anyio.sleep(0.1)
    assert ran == ["blocks"]  # finished in its thread; the cancelled waiting call never ran


async def test_a_cancelled_shared_call_lets_the_calls_behind_it_run() -> None:
    threads = await knowing_quick()
    release = threading.Event()
    results: list[object] = []

    async def gives_up() -> None:
        with anyio.move_on_after(0.05):
            await threads.run("t", lambda: release.wait(5))

    async def waits(value: str) -> None:
        results.append(await threads.run("t", lambda: value))

    async with anyio.create_task_group() as tg:
        tg.start_soon(gives_up)
        tg.start_soon(waits, "a")
        tg.start_soon(waits, "b")
    release.set()
    assert sorted(results, key=str) == ["a", "b"]


async def test_no_more_calls_run_at_once_than_the_limiter_allows() -> None:
    threads = runner(threads=2)
    running = 0
    most = 0
    lock = threading.Lock()

    def counts() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    await run_together(threads, [("slow", counts)] * 6)
    assert most == 2


async def test_a_call_may_reach_back_to_the_event_loop() -> None:
    threads = runner()

    async def on_the_loop() -> str:
        await anyio.lowlevel.checkpoint()
        return "back"

    assert await threads.run("t", lambda: anyio.from_thread.run(on_the_loop)) == "back"


async def test_a_call_that_ended_is_answered_without_waiting_for_the_slow_one_after_it() -> None:
    threads = await knowing_quick()
    release = threading.Event()
    answered: list[float] = []

    async def quick_first() -> None:
        start = time.perf_counter()
        await threads.run("t", lambda: "quick")
        answered.append(time.perf_counter() - start)

    async with anyio.create_task_group() as tg:
        tg.start_soon(quick_first)
        tg.start_soon(threads.run, "t", lambda: release.wait(5))  # behind it, same trip
        with anyio.fail_after(2):
            while not answered:
                await anyio.sleep(0.001)
        release.set()
    assert answered[0] < 1.0  # not after the slow call's 5 s


async def test_a_task_that_was_slow_in_a_shared_trip_is_not_shared_next_time() -> None:
    threads = await knowing_quick()
    release = threading.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(threads.run, "t", lambda: release.wait(5))
        tg.start_soon(threads.run, "t", lambda: None)
        await anyio.sleep(SHARE_AT_MOST * 10)
        release.set()
    entered = threading.Barrier(3, timeout=5)
    idents = await run_together(
        threads, [("t", lambda: (entered.wait(), threading.get_ident())[1])] * 3
    )
    assert len(set(idents)) == 3


async def test_a_trip_that_waits_for_a_thread_keeps_its_calls_together() -> None:
    # No call of the trip is slow while no thread has taken it yet (every thread busy, or
    # the event loop holding the GIL): its calls then still share one thread.
    threads = await knowing_quick("quick")
    holders = [object() for _ in range(threads.limiter.total_tokens)]
    for holder in holders:
        await threads.limiter.acquire_on_behalf_of(holder)

    async def free_later() -> None:
        await anyio.sleep(SHARE_AT_MOST * 5)
        for holder in holders:
            threads.limiter.release_on_behalf_of(holder)

    async with anyio.create_task_group() as tg:
        tg.start_soon(free_later)
        idents = await run_together(threads, [("quick", threading.get_ident)] * 5)
    assert len(set(idents)) == 1


async def test_a_trip_waiting_for_a_thread_does_not_poll_for_it() -> None:
    # while every thread is busy, a waiting trip costs the event loop nothing
    threads = await knowing_quick("quick")
    threads.limiter.total_tokens = 1
    gate = threading.Event()
    slow = threads.run("slow", lambda: gate.wait(5))
    splits = 0
    split = threads._split

    def counting(trip: object) -> None:
        nonlocal splits
        splits += 1
        split(trip)  # type: ignore[arg-type]

    threads._split = counting  # type: ignore[method-assign]
    results: list[object] = []

    async def waits_for_both() -> None:
        results.extend(await run_together(threads, [("quick", lambda: 1), ("quick", lambda: 2)]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: slow)
        await anyio.sleep(0.01)
        tg.start_soon(waits_for_both)
        await anyio.sleep(SHARE_AT_MOST * 50)
        gate.set()
    assert results == [1, 2]
    assert splits <= 3
