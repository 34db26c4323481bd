"""The worker: claims jobs, runs them under a lease, records how each attempt ended.

``async def`` tasks run on the worker's event loop; ``def`` tasks in the worker's own
bounded thread pool (never AnyIO's shared default limiter, which the web app's sync
endpoints need). A lease renewed by heartbeat marks a job as held; a worker that dies
loses its leases and another worker takes the jobs again. On ``stop()`` the worker stops
claiming, lets running jobs finish within the grace period, and hands the rest back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import traceback
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from .app import _settle
from .context import TaskContext, resolve_dependencies
from .jobs import ATTEMPT_RETRIED, Job, JobState, attempt_record
from .metrics import observe_attempt
from .retry import Retry
from .stores.base import Outcome, Store, WorkerRecord
from .threads import ThreadRunner
from .tracing import job_span

if TYPE_CHECKING:
    from .app import Backlane
    from .tasks import Task

log = logging.getLogger("backlane.worker")


@dataclass
class _Held:
    job: Job
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    """Around the task's call: cancelling it cancels the job (its dependencies still close)."""
    outer: anyio.CancelScope | None = None
    """Around the set-up and teardown of its dependencies too, if it has any: cancelled
    only when the worker abandons the job."""
    context: TaskContext | None = None
    handed_back: bool = False
    abandoned: bool = False


def error_record(exc: BaseException, *, message: str | None = None) -> dict[str, Any]:
    """What a failed attempt keeps of its exception: type, message and traceback."""
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return {
        "type": name,
        "message": message if message is not None else str(exc),
        "traceback": "".join(traceback.format_exception(kind, exc, exc.__traceback__)),
    }


class _DeadlinePassed(Exception):
    """The task's ``timeout`` ran out; ``error`` is the ``TimeoutError`` that says where."""

    def __init__(self, error: TimeoutError) -> None:
        self.error = error


def _being_cancelled() -> bool:
    """Whether something asked to cancel the running task (always True on Python 3.10,
    which cannot tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def checked_queues(queues: list[str] | None) -> list[str] | None:
    """``queues`` as a worker takes them: None for every queue. Raises ``ValueError`` for
    an empty list, which names no queue."""
    if queues is not None and not queues:
        raise ValueError("queues must name at least one queue (None means every queue)")
    return queues


class Worker:
    """Runs jobs from a lane's store until ``stop()`` is called."""

    def __init__(
        self,
        lane: Backlane,
        *,
        concurrency: int | None = None,
        queues: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.lane = lane
        settings = lane.settings
        self.concurrency = concurrency or settings.concurrency
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        self.queues = checked_queues(queues)
        self.threads = threads or settings.threads or self.concurrency
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = settings.lease_seconds
        self.grace = settings.shutdown_grace
        self._held: dict[str, _Held] = {}
        self._outcomes: list[Outcome] = []
        self._stopping = False
        self._slot_free = anyio.Event()
        self._wake: asyncio.Future[None] | None = None
        """What the claim loop waits on while idle: settled by a change or an outcome."""
        self._threads: ThreadRunner | None = None
        self._until_idle = False
        self.started_at = time.time()
        self._in_flight = 0
        self._flushed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: list[str] = []
        """Jobs requests of this process handed over, to release with the next claim."""
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.processed = 0

    def __repr__(self) -> str:
        return f"<Worker {self.id} concurrency={self.concurrency}>"

    @property
    def held(self) -> list[str]:
        """Ids of the jobs this worker holds now."""
        return list(self._held)

    def stop(self) -> None:
        """Ask the worker to stop claiming and shut down gracefully. Safe from any thread."""
        self._stopping = True
        self.lane.notifier.notify()

    async def run(self) -> None:
        """Claim and run jobs until ``stop()``; then finish or hand back what is held."""
        self._threads = ThreadRunner(anyio.CapacityLimiter(self.threads))
        self.started_at = time.time()
        self._slot_free = anyio.Event()
        await self.lane.open()
        log.info("worker %s started (concurrency %d)", self.id, self.concurrency)
        self._loop = asyncio.get_running_loop()
        self.lane._running.append(self)
        try:
            async with anyio.create_task_group() as service:
                service.start_soon(self._maintain)
                try:
                    await self._claim_loop()
                    await self._wind_down()
                except BaseException:  # cancelled from outside, or a bug: end the jobs too
                    self._abandon_jobs()
                    raise
                finally:
                    await self._wait_for_jobs()
                await self._flush()
                service.cancel_scope.cancel()
        finally:
            self.lane._running.remove(self)  # no request hands jobs over from here on
        if self._released:  # handed over as it wound down
            await self._release_handed_over()
        await self._flush()
        with anyio.CancelScope(shield=True):
            try:
                await self.lane.store.forget_worker(self.id)
            except Exception:
                log.warning("worker %s could not remove its heartbeat record", self.id)
        log.info("worker %s stopped after %d jobs", self.id, self.processed)

    async def run_until_idle(self) -> int:
        """Run jobs until none is left that could run now; returns how many ran."""
        self._until_idle = True
        await self.run()
        return self.processed

    async def run_inline(self, jobs: list[Job]) -> None:
        """Run ``jobs`` here, one after another, once each (eager mode): each is stored as
        running, executed, and its outcome recorded; a failure does not stop the rest."""
        if self._threads is None:
            self._threads = ThreadRunner(anyio.CapacityLimiter(1))
        for job in jobs:
            now = time.time()
            job = job.copy(
                state=JobState.RUNNING,
                worker_id=self.id,
                attempts=1,
                started_at=now,
                lease_until=now + self.lease,
                after=None,
                release_at=None,
            )
            await self.lane.enqueue_jobs([job])
            with job_span(job, worker_id=self.id) as span:
                outcome = await self.execute(_Held(job))
                span.ended(outcome)
            observe_attempt(self.lane, job, outcome)
            if outcome is None:
                continue
            if outcome.state is JobState.QUEUED:  # no retries inline: the attempt failed
                outcome = self._ended(job, JobState.FAILED, error=outcome.error)
            if outcome.state is JobState.FAILED and outcome.error:
                log.error("task %s failed:\n%s", job.task, outcome.error.get("traceback"))
            await self.lane.store.finish([outcome])
            self.lane.notifier.notify()

    def has_room_here(self) -> bool:
        """Whether this worker runs on the running event loop, is not stopping, and has a
        free slot."""
        return (
            not self._stopping
            and len(self._held) < self.concurrency
            and self._loop is asyncio.get_running_loop()
        )

    def hand_over(self, ids: list[str]) -> None:
        """Take the deferred jobs ``ids`` of a request whose response has been sent (an
        embedded worker, from its own web process, on its loop): this worker releases them
        with its next claim, which may take them; where the store can, that is one
        transaction with the outcomes it records, shared by a burst of requests."""
        self._released.extend(ids)
        if self._wake is not None:
            _settle(self._wake)

    def _start(self, held: _Held) -> None:
        """Run ``held`` in a task of its own: a plain asyncio task (an AnyIO task group's
        costs three times as much to start), which ``_wait_for_jobs`` waits for. It is
        only ever cancelled through ``held.scope`` (an AnyIO cancellation): that respects
        the job's shielded clean-up and reaches a ``def`` task's ``check_cancelled()``."""
        assert self._loop is not None
        task = self._loop.create_task(self._run_one(held), name=f"backlane job {held.job.id}")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_task_done)

    def _job_task_done(self, task: asyncio.Task[None]) -> None:
        self._job_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug of ours
            log.error("worker %s: a job's task failed", self.id, exc_info=task.exception())

    def _abandon_jobs(self) -> None:
        """Cancel every job still held, dependencies' set-up and teardown included (their
        shielded clean-up excepted), without recording it: this worker ends, and the
        jobs' leases bring them back."""
        for held in self._held.values():
            if not held.abandoned:
                held.abandoned = held.handed_back = True
                held.scope.cancel()
                if held.outer is not None:
                    held.outer.cancel()

    async def _wait_for_jobs(self) -> None:
        """Wait until every job's task has ended: those handed back finish their clean-up
        first, for up to the shutdown grace, after which what is left is abandoned (a
        dependency stuck in its set-up or teardown). If this worker is cancelled meanwhile,
        abandon them at once, wait all the same, and be cancelled after."""
        cancelled: BaseException | None = None
        patience: float | None = self.grace
        while self._job_tasks:
            try:
                with anyio.CancelScope(shield=True):
                    _, pending = await asyncio.wait(set(self._job_tasks), timeout=patience)
            except asyncio.CancelledError as exc:  # a plain cancel passes a shield
                cancelled = exc
                pending = set(self._job_tasks)
            if pending and (cancelled is not None or patience is not None):
                self._abandon_jobs()
                patience = None
        if cancelled is not None:
            raise cancelled

    async def _claim_loop(self) -> None:
        settings = self.lane.settings
        idle = settings.poll_min
        # after jobs, a store that tells of new work (a wait_for_work of its own) needs no
        # quick polls: its wait returns as soon as there is any
        told = type(self.lane.store).wait_for_work is not Store.wait_for_work
        after_jobs = settings.poll_max if told else settings.poll_min
        while not self._stopping:
            free = self.concurrency - len(self._held)
            if free <= 0:
                if self._released:  # no room here: let other workers have them
                    await self._release_handed_over()
                # stop() may come from another thread: look at it again now and then
                with anyio.move_on_after(settings.poll_max):
                    await self._slot_free.wait()
                self._slot_free = anyio.Event()
                continue
            now = time.time()
            generation = self._flushed
            outcomes, self._outcomes = self._outcomes, []  # recorded in the same call
            released, self._released = self._released, []
            self._in_flight += 1
            try:
                with anyio.CancelScope(shield=True):  # a claim that commits must be seen
                    _, jobs = await self.lane.store.finish_and_claim(
                        outcomes,
                        worker_id=self.id,
                        queues=self.queues,
                        limit=free,
                        now=now,
                        lease_until=now + self.lease,
                        release=released,
                    )
            except Exception:
                self._outcomes[:0] = outcomes
                self._released[:0] = released
                self._in_flight -= 1
                log.exception("worker %s could not claim jobs; retrying", self.id)
                await self.lane.notifier.wait(min(idle * 4, 2.0))
                idle = min(idle * 2, settings.poll_max)
                continue
            self._in_flight -= 1
            if outcomes:
                self._flushed += 1
            if outcomes or released:
                self.lane.notifier.notify()
            if jobs:
                idle = after_jobs
                for job in jobs:
                    held = _Held(job)
                    self._held[job.id] = held
                    self._start(held)
                if len(jobs) == free:
                    continue  # there may be more: claim again at once
                if released:  # fed by this process's requests: let the next few gather
                    await anyio.sleep(settings.poll_min)
                    continue
                await anyio.lowlevel.checkpoint()  # the jobs start before the wait is set up
                await self._idle(idle)  # took all there was: no empty claim right after
                continue
            busy = self._held or self._outcomes or self._released or self._in_flight
            if self._until_idle and not busy:
                if generation == self._flushed:
                    return
                continue
            await self._idle(idle)
            idle = min(idle * 2, settings.poll_max)

    async def _idle(self, timeout: float) -> None:
        """Wait until jobs may be claimable: a change in this process, a change the store
        reports from elsewhere (if it can), ``stop()``, or ``timeout`` seconds; or until a
        job of this worker ended, whose outcome the next claim records, or a request
        handed jobs over."""
        if self._outcomes or self._released:
            return
        self._wake = wake = asyncio.get_running_loop().create_future()
        try:
            await self._idle_until(wake, timeout)
        finally:
            self._wake = None

    async def _idle_until(self, wake: asyncio.Future[None], timeout: float) -> None:
        store = self.lane.store
        if type(store).wait_for_work is Store.wait_for_work:
            await self.lane.notifier.wait(timeout, future=wake)
            return
        # one task for the store's wait, none for the local one: a job handed over by the
        # store reaches the claim loop in as few turns of the event loop as possible
        remote = asyncio.ensure_future(self._wait_for_store(timeout, wake))
        try:
            await self.lane.notifier.wait(timeout, future=wake)
        finally:
            if not remote.done():
                remote.cancel()
                await asyncio.wait([remote])

    async def _wait_for_store(self, timeout: float, wake: asyncio.Future[None]) -> None:
        try:
            await self.lane.store.wait_for_work(timeout)
        except Exception:
            log.debug("store wake-up failed; polling instead", exc_info=True)
            await asyncio.sleep(timeout)
        finally:  # here, not in a done callback: the claim loop runs one turn sooner
            _settle(wake)

    async def _release_handed_over(self) -> None:
        released, self._released = self._released, []
        try:
            with anyio.CancelScope(shield=True):
                await self.lane.store.release(released)
        except Exception:  # they are released by the sweep after the release grace
            log.exception("worker %s could not release %d jobs", self.id, len(released))
        self.lane.notifier.notify()

    async def _wind_down(self) -> None:
        if self._released:
            await self._release_handed_over()
        if self._held:
            log.info(
                "worker %s waiting up to %ss for %d jobs", self.id, self.grace, len(self._held)
            )
            with anyio.move_on_after(self.grace):
                while self._held:
                    await self._slot_free.wait()
                    self._slot_free = anyio.Event()
                    await self._flush()
        if self._held:
            ids = list(self._held)
            for held in self._held.values():
                held.handed_back = True
                held.scope.cancel()
            with anyio.CancelScope(shield=True):
                await self.lane.store.hand_back(worker_id=self.id, ids=ids)
            log.info("worker %s handed back %d unfinished jobs", self.id, len(ids))

    async def _run_one(self, held: _Held) -> None:
        try:
            with job_span(held.job, worker_id=self.id) as span:
                outcome = await self.execute(held)
                span.ended(outcome)
            observe_attempt(self.lane, held.job, outcome)
        finally:
            self._held.pop(held.job.id, None)
            self._slot_free.set()
        if outcome is not None:
            self._outcomes.append(outcome)
            self.processed += 1
            if self._wake is not None:
                _settle(self._wake)  # the claim loop records it with its next claim

    async def execute(self, held: _Held) -> Outcome | None:
        """Run one claimed job; the outcome to record, or None if it was handed back."""
        job = held.job
        try:
            task = self.lane.resolve_task(job.task)
            args, kwargs = task.codec.decode(job.payload)
        except Exception as exc:  # unknown task or corrupt payload: a failed job, not a crash
            log.error("job %s (%s) cannot run: %s", job.id, job.task, exc)
            return self._ended(job, JobState.FAILED, error=error_record(exc))

        finished = False
        value: Any = None
        try:
            if task.codec.context_param or task.codec.dependencies:
                held.outer = outer = anyio.CancelScope()
                if held.abandoned:
                    outer.cancel()
                with outer:
                    async with AsyncExitStack() as stack:
                        ctx = self._context(job)
                        held.context = ctx
                        if task.codec.context_param:
                            kwargs[task.codec.context_param] = ctx
                        kwargs.update(
                            await resolve_dependencies(
                                task.codec.dependencies, stack=stack, context=ctx
                            )
                        )
                        with held.scope:
                            value = await self._call(task, args, kwargs)
                            finished = True
            else:  # nothing to set up or close: the common case, kept lean
                with held.scope:
                    value = await self._call(task, args, kwargs)
                    finished = True
            if not finished:
                return None if held.handed_back else self._cancelled(job)
            result = task.codec.encode_result(value)
        except _DeadlinePassed as passed:
            message = f"timed out after {task.timeout}s"
            log.warning("job %s (%s) %s", job.id, job.task, message)
            return self._after_failure(job, task, passed.error, message=message)
        except (Exception, SystemExit) as exc:  # a task's sys.exit() ends its attempt only
            log.warning("job %s (%s) attempt %d failed: %r", job.id, job.task, job.attempts, exc)
            return self._after_failure(job, task, exc)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            if held.scope.cancel_called:  # it swallowed our cancel, then raised its own
                return None if held.handed_back else self._cancelled(job)
            # raised by the task itself (a library's leaked cancellation): its attempt fails
            log.warning("job %s (%s) attempt %d failed: %r", job.id, job.task, job.attempts, exc)
            return self._after_failure(job, task, exc)
        return self._ended(job, JobState.SUCCEEDED, result=result)

    def _cancelled(self, job: Job) -> Outcome:
        error = {"type": "Cancelled", "message": "cancelled on request", "traceback": ""}
        return self._ended(job, JobState.CANCELLED, error=error)

    def _context(self, job: Job) -> TaskContext:
        lane = self.lane

        async def report(fraction: float | None, message: str | None) -> None:
            await lane.store.set_progress(
                job.id, worker_id=self.id, progress=fraction, message=message
            )
            lane.notifier.notify()

        return TaskContext(
            job_id=job.id,
            task=job.task,
            attempt=job.attempts,
            queue=job.queue,
            report=report,
            state=lane.state,
        )

    async def _call(self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        if not task.timeout:
            return await self._call_now(task, args, kwargs)
        try:
            with anyio.fail_after(task.timeout) as deadline:
                return await self._call_now(task, args, kwargs)
        except TimeoutError as exc:
            if deadline.cancelled_caught:  # not a TimeoutError of the task's own
                raise _DeadlinePassed(exc) from None
            raise

    async def _call_now(self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        if task.is_async:
            return await task.func(*args, **kwargs)
        assert self._threads is not None
        call = functools.partial(task.func, *args, **kwargs) if args or kwargs else task.func
        return await self._threads.run(task.name, call)

    def _after_failure(
        self, job: Job, task: Task[Any, Any], exc: BaseException, *, message: str | None = None
    ) -> Outcome:
        now = time.time()
        delay = task.policy.delay_after(job.attempts, exc)
        error = error_record(exc, message=message)
        if delay is None:
            return self._ended(job, JobState.FAILED, error=error, now=now)
        if isinstance(exc, Retry):
            error["type"] = "Retry"
        return Outcome(
            job_id=job.id,
            worker_id=self.id,
            state=JobState.QUEUED,
            finished_at=now,
            error=error,
            run_at=now + delay,
            attempt=attempt_record(job, ATTEMPT_RETRIED, now, error),
        )

    def _ended(
        self,
        job: Job,
        state: JobState,
        *,
        result: str | None = None,
        error: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> Outcome:
        now = time.time() if now is None else now
        keep = (
            self.lane.settings.keep_succeeded
            if state is JobState.SUCCEEDED
            else self.lane.settings.keep_failed
        )
        return Outcome(
            job_id=job.id,
            worker_id=self.id,
            state=state,
            finished_at=now,
            result=result,
            error=error,
            keep_until=now + keep,
            attempt=None
            if state is JobState.SUCCEEDED
            else attempt_record(job, state.value, now, error),
        )

    async def _flush(self) -> None:
        delay = 0.05
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            self._in_flight += 1
            try:
                with anyio.CancelScope(shield=True):
                    await self.lane.store.finish(batch)
            except Exception:
                self._in_flight -= 1
                log.exception(
                    "worker %s could not record %d outcomes; retrying", self.id, len(batch)
                )
                self._outcomes[:0] = batch
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._in_flight -= 1
            self._flushed += 1
            self.lane.notifier.notify()

    async def _maintain(self) -> None:
        settings = self.lane.settings
        heartbeat = max(self.lease / 3, 0.05)
        next_sweep = 0.0
        next_purge = time.monotonic() + settings.purge_interval
        while True:
            now_m = time.monotonic()
            try:
                await self.lane.store.beat(self._record())
                if self._held:
                    ids = list(self._held)
                    asked = await self.lane.store.renew_leases(
                        worker_id=self.id, ids=ids, lease_until=time.time() + self.lease
                    )
                    for job_id in asked:
                        self._cancel_held(job_id)
                if now_m >= next_sweep:
                    now = time.time()
                    count = await self.lane.store.requeue_expired(
                        now, keep_until=now + settings.keep_failed
                    )
                    if count:
                        log.warning("took back %d jobs whose worker stopped answering", count)
                        self.lane.notifier.notify()
                    next_sweep = now_m + settings.sweep_interval
                if now_m >= next_purge:
                    await self.lane.store.purge(before=time.time())
                    next_purge = now_m + settings.purge_interval
            except Exception:
                log.exception("worker %s maintenance failed; will try again", self.id)
            wake = min(next_sweep, next_purge) - time.monotonic()
            await anyio.sleep(max(0.01, min(heartbeat, wake)))

    def _record(self) -> WorkerRecord:
        return WorkerRecord(
            id=self.id,
            started_at=self.started_at,
            seen_at=time.time(),
            concurrency=self.concurrency,
            queues=tuple(self.queues) if self.queues else None,
            jobs=tuple(self._held),
            processed=self.processed,
        )

    def _cancel_held(self, job_id: str) -> None:
        held = self._held.get(job_id)
        if held is None:
            return
        if held.context is not None:
            held.context.cancelled.set()
        held.scope.cancel()
