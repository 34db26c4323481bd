"""``Backlane``: settings, the task registry, the store chosen by URL, and enqueueing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import numbers
import os
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .exceptions import ConfigurationError, InvalidArguments, JobNotFound, UnknownTask
from .jobs import Job, JobHandle, JobState
from .retry import RetryPolicy
from .stores import Store, store_from_url
from .tasks import P, R, Task, import_name, resolve_import_name
from .tracing import inject_context

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .scheduler import Missed, Schedule, Scheduler
    from .worker import Worker

log = logging.getLogger("backlane")

_ELSEWHERE_SECONDS = 5.0
"""How long ``flush_releases(every_loop=True)`` waits for another loop's releases."""

F = TypeVar("F", bound=Callable[..., Any])

Lifespan = Callable[["Backlane"], AbstractAsyncContextManager[Mapping[str, Any] | None]]
"""A lane's lifespan: called with the lane, an async context manager whose value (a mapping,
or None) tasks read as ``TaskContext.state``."""
_NO_STATE: Mapping[str, Any] = MappingProxyType({})


class TaskDecorator(Protocol):
    """What ``lane.task(...)`` returns: turns a function into a ``Task``."""

    def __call__(self, func: Callable[P, R], /) -> Task[P, R]: ...


class Settings(BaseModel):
    """Every setting, from arguments first, then ``BACKLANE_*`` environment variables.

    A variable set to the empty string counts as unset. A value that does not fit raises
    pydantic's ``ValidationError`` here; ``Backlane(...)`` raises ``ConfigurationError``
    naming the argument or the variable it came from."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        """Fill what the arguments leave out from ``BACKLANE_<NAME>`` variables, in any
        case (plain pydantic: pydantic-settings would cost every worker 1.5 MB)."""
        if not isinstance(data, dict):
            return data
        return {**environment_settings(exclude=data), **data}

    @model_validator(mode="after")
    def _polls_in_order(self) -> Settings:
        if self.poll_max < self.poll_min:
            if "poll_max" not in self.model_fields_set:  # only poll_min was raised
                self.poll_max = self.poll_min
            else:
                raise ValueError(
                    f"poll_max ({self.poll_max}) must not be below poll_min ({self.poll_min})"
                )
        return self

    url: str = "sqlite:///./backlane.db"
    eager: bool = False
    concurrency: int = Field(20, ge=1)
    """Jobs one worker runs at once."""
    threads: int | None = Field(None, ge=0)
    """Threads of one worker's pool for ``def`` tasks (unset or 0: the concurrency)."""
    retries: int = Field(3, ge=0)
    """Default further attempts after a failure, for tasks that do not say."""
    backoff: float = Field(1.0, ge=0)
    """Default base of the exponential backoff, in seconds."""
    lease_seconds: float = Field(30.0, gt=0)
    """How long a job stays held without a heartbeat; a dead worker's jobs return after it."""
    sweep_interval: float = Field(5.0, gt=0)
    """How often a worker looks for expired leases."""
    purge_interval: float = Field(60.0, gt=0)
    keep_succeeded: float = Field(24 * 3600.0, ge=0)
    """Seconds a succeeded job (and its result) is kept."""
    keep_failed: float = Field(7 * 24 * 3600.0, ge=0)
    """Seconds a failed or cancelled job (and its error) is kept."""
    shutdown_grace: float = Field(10.0, ge=0)
    """Seconds running jobs get to finish at shutdown before they are handed back."""
    release_grace: float = Field(10.0, gt=0)
    """Seconds after which a stored request's jobs run even if the release never came."""
    poll_min: float = Field(0.005, gt=0)
    """Shortest wait between two claims of a worker that found work (an embedded worker
    fed by its own requests waits this long after each claim, so that a burst of requests
    shares one); the first wait of an idle worker's back-off."""
    poll_max: float = Field(0.25, gt=0)
    """Longest wait between two claims of an idle worker."""


def environment_settings(exclude: typing.Container[str] = ()) -> dict[str, str]:
    """The settings the ``BACKLANE_*`` variables give (names in any case; empty values
    left out), by setting name, but for those in ``exclude``."""
    found = {key.lower(): value for key, value in os.environ.items() if value != ""}
    return {
        name: found[f"backlane_{name}"]
        for name in Settings.model_fields
        if name not in exclude and f"backlane_{name}" in found
    }


def _settings(given: dict[str, Any]) -> Settings:
    """``Settings(**given)``, or ``ConfigurationError`` naming each value that does not
    fit and where it came from: an argument, or a ``BACKLANE_*`` variable."""
    try:
        return Settings(**given)
    except ValidationError as exc:
        from_env = environment_settings(exclude=given)
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            cause = error.get("ctx", {}).get("error")
            message = str(cause) if isinstance(cause, ValueError) else error["msg"]
            if not name:  # about several settings (poll_min and poll_max): say where each was
                sources = [f"BACKLANE_{key.upper()}={value!r}" for key, value in from_env.items()]
                sources += [f"{key}={value!r}" for key, value in given.items() if key != "url"]
                message += f" (from {', '.join(sources)})" if sources else ""
            elif name in from_env:
                message = f"BACKLANE_{name.upper()}={from_env[name]!r} (environment): {message}"
            elif name in given:
                message = f"{name}={given[name]!r}: {message}"
            problems.append(message)
        raise ConfigurationError("invalid setting: " + "; ".join(problems)) from None


class Notifier:
    """Wakes whoever waits on any event loop of this process when jobs changed here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    async def wait(self, timeout: float, *, future: asyncio.Future[None] | None = None) -> None:
        """Return at the next ``notify()`` or after ``timeout`` seconds; or, given a
        ``future`` of the running loop, as soon as someone else settles it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future() if future is None else future
        entry = (loop, fut)
        with self._lock:
            self._waiters.add(entry)
        timer = loop.call_later(timeout, _settle, fut)  # lighter than asyncio.wait's timeout
        try:
            await fut
        finally:
            timer.cancel()
            with self._lock:
                self._waiters.discard(entry)

    def notify(self) -> None:
        """Wake every waiter. Safe from any thread."""
        with self._lock:
            waiters = list(self._waiters)
        if not waiters:
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # called from a thread with no loop
            here = None
        for loop, fut in waiters:
            if loop is here:  # no need to wake the loop through its self-pipe
                _settle(fut)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_settle, fut)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Backlane:
    """A lane: one store, the tasks it knows, and ways to enqueue and follow jobs.

    ``url`` picks the store (default: ``BACKLANE_URL``, else ``sqlite:///./backlane.db``;
    ``memory://`` for tests). With ``eager=True`` (or ``BACKLANE_EAGER=1``) a request's
    tasks run inline right after its response, as Starlette runs them. ``lifespan``, an
    async context manager factory called with the lane, sets up what tasks share in a
    process (a connection pool, a client) while the lane runs jobs there (see
    ``lifespan_context``); what it yields, a mapping, tasks read as ``TaskContext.state``.
    Nothing is shared between two lanes.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        eager: bool | None = None,
        lifespan: Lifespan | None = None,
        **settings: Any,
    ):
        if lifespan is not None and not callable(lifespan):
            raise ConfigurationError(
                f"lifespan must be an async context manager factory taking the lane, "
                f"not {lifespan!r}"
            )
        unknown = sorted(set(settings) - set(Settings.model_fields))
        if unknown:
            known = ", ".join(Settings.model_fields)
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {known}")
        given = dict(settings)
        if url is not None:
            given["url"] = url
        if eager is not None:
            given["eager"] = eager
        self.settings = _settings(given)
        self.store: Store = store_from_url(self.settings.url)
        self.notifier = Notifier()
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._by_function: dict[Callable[..., Any], Task[Any, Any]] = {}
        self._schedules: dict[str, Schedule] = {}
        self._opened = False
        self._running: list[Worker] = []
        """Workers of this lane running in this process, on any loop."""
        self._releasing: dict[asyncio.AbstractEventLoop, list[str]] = {}
        """Per loop, jobs whose requests' responses were sent, to release together."""
        self._background: dict[asyncio.Task[None], concurrent.futures.Future[None]] = {}
        """Releases and late stores under way, on any loop: each task, with a future done
        when it ends that another thread's loop can wait for."""
        self._lifespan = lifespan
        self._lifespan_lock = anyio.Lock()
        self._state: Mapping[str, Any] | None = None
        """What the lifespan yielded, while it runs (None: it does not run)."""

    def __repr__(self) -> str:
        return f"<Backlane {self.settings.url}>"

    @property
    def state(self) -> Mapping[str, Any]:
        """What the lane's lifespan yielded, while it runs in this process; empty
        otherwise."""
        return self._state if self._state is not None else _NO_STATE

    @asynccontextmanager
    async def lifespan_context(self) -> AsyncIterator[Mapping[str, Any]]:
        """Run the lane's ``lifespan`` (if it has one) for as long as this lasts, and
        yield ``state``. Inside one already running (or one starting), it only yields the
        same state: the lifespan runs once, and the first entry that started it ends it.
        ``install(app)``, ``backlane worker`` and ``backlane.testing.drain`` run jobs
        inside it; a worker you run yourself does so inside ``async with
        lane.lifespan_context():``. What it sets up belongs to the event loop it started
        on."""
        if self._lifespan is None:
            yield self.state
            return
        async with AsyncExitStack() as stack:  # entered and left in this one task
            async with self._lifespan_lock:  # two starting at once: it runs once
                owner = self._state is None
                if owner:
                    given = await stack.enter_async_context(self._lifespan(self))
                    if given is not None and not isinstance(given, Mapping):
                        raise ConfigurationError(
                            f"the lane's lifespan must yield a mapping or None, not {given!r}"
                        )
                    self._state = MappingProxyType(dict(given or {}))
            try:
                yield self.state
            finally:
                if owner:
                    self._state = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def eager(self) -> bool:
        return self.settings.eager

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """The tasks this lane knows, by name."""
        return dict(self._tasks)

    async def open(self) -> None:
        """Open the store (idempotent)."""
        if not self._opened:
            await self.store.open()
            self._opened = True

    async def close(self) -> None:
        """Close the store (idempotent), after the releases gathered on this loop."""
        if self._opened:
            await self.flush_releases()
            self._opened = False
            await self.store.close()

    async def release(self, ids: Sequence[str]) -> None:
        """Let the deferred jobs ``ids`` run: their request's response has been sent.
        Where the store gathers releases (``Store.gather_releases``), they are released
        ``poll_min`` seconds later, in one call with other requests' on this loop, and this
        returns at once; a release that fails is logged, and its jobs run after the
        release grace, as after a crash."""
        if not self.store.gather_releases:
            with anyio.CancelScope(shield=True):
                await self.store.release(ids)
            self.notifier.notify()
            return
        loop = asyncio.get_running_loop()
        waiting = self._releasing.get(loop)
        if waiting is None:
            waiting = self._releasing[loop] = []
            loop.call_later(self.settings.poll_min, self._release_due, loop)
        waiting.extend(ids)

    def _release_due(self, loop: asyncio.AbstractEventLoop) -> None:
        ids = self._releasing.pop(loop, None)
        if ids:
            self._in_background(loop, self._release_gathered(ids))

    def _in_background(
        self, loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None]
    ) -> None:
        """Run ``work`` in a task on ``loop`` that ``flush_releases`` waits for (from any
        loop's, with ``every_loop``)."""
        ended: concurrent.futures.Future[None] = concurrent.futures.Future()
        task = loop.create_task(work)
        self._background[task] = ended

        def done(task: asyncio.Task[None]) -> None:
            self._background.pop(task, None)
            ended.set_result(None)

        task.add_done_callback(done)

    async def _release_gathered(self, ids: list[str]) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.store.release(ids)
        except Exception:
            log.exception("could not release %d jobs; they run after the release grace", len(ids))
            return
        self.notifier.notify()

    def run_soon(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own on the running loop, for a caller that cannot
        wait (``add_task`` once its request's response has gone): ``flush_releases`` and
        ``close`` wait for it. ``work`` logs its own failures."""
        self._in_background(asyncio.get_running_loop(), work)

    async def flush_releases(self, *, every_loop: bool = False) -> None:
        """Send the releases gathered on this loop now, and wait for those under way (and
        for the tasks added after their response that are being stored). With
        ``every_loop``, do so for every event loop: a ``TestClient``'s, whose loop may have
        closed before sending them, or whose loop was sending them just then."""
        loop = asyncio.get_running_loop()
        ids = self._releasing.pop(loop, None) or []
        if every_loop:
            for other in list(self._releasing):
                ids.extend(self._releasing.pop(other, []))
        if ids:
            await self._release_gathered(ids)
        pending = list(self._background.items())
        here = [task for task, _ in pending if task.get_loop() is loop]
        if here:
            await asyncio.gather(*here, return_exceptions=True)
        elsewhere = [
            asyncio.wrap_future(ended)
            for task, ended in pending
            if every_loop and task.get_loop() is not loop and not task.get_loop().is_closed()
        ]
        if elsewhere:  # a loop stopped with its task pending never ends it: wait a while
            await asyncio.wait(elsewhere, timeout=_ELSEWHERE_SECONDS)

    async def __aenter__(self) -> Backlane:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- tasks ------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        max_backoff: float = 300.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> TaskDecorator: ...

    def task(  # type: ignore[misc]  # mypy rejects the keyword-only overload; both are tested
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        max_backoff: float = 300.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> Task[Any, Any] | TaskDecorator:
        """Register a function as a task: ``@lane.task`` or ``@lane.task(retries=5, ...)``.

        ``retries`` further attempts (default from settings), waiting ``backoff * 2**n``
        seconds with jitter, only for exceptions in ``retry_on``; ``timeout`` seconds per
        attempt; default ``queue`` and ``priority`` (higher runs first).
        """

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            if isinstance(fn, Task):  # a task of another lane: this lane's options
                fn = fn.func
            policy = RetryPolicy(
                retries=self.settings.retries if retries is None else retries,
                backoff=self.settings.backoff if backoff is None else backoff,
                max_backoff=max_backoff,
                retry_on=retry_on if isinstance(retry_on, tuple) else (retry_on,),
            )
            task_name = name or f"{fn.__module__}:{fn.__qualname__}"
            task: Task[Any, Any] = Task(
                self,
                fn,
                name=task_name,
                policy=policy,
                timeout=timeout,
                queue=queue,
                priority=priority,
            )
            self._register(task)
            return task

        if func is not None:
            return register(func)
        return typing.cast(TaskDecorator, register)

    # -- schedules ----------------------------------------------------------------------

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The schedules declared on this lane, by name."""
        return dict(self._schedules)

    def cron(
        self,
        expression: str,
        *,
        tz: str = "UTC",
        missed: Missed = "run_once",
        name: str | None = None,
        **options: Any,
    ) -> TaskDecorator:
        """Run the decorated function on a cron schedule (``"0 3 * * *"``: 03:00 daily) in
        time zone ``tz``, correct across DST changes. After downtime, ``missed="run_once"``
        runs one catch-up job, ``"skip"`` none. ``options`` are those of ``task()``. The
        function takes no arguments (a ``TaskContext`` and ``Depends`` are fine)."""
        return self._scheduled(name, options, cron=expression, tz=tz, missed=missed)

    def every(
        self,
        interval: timedelta | float,
        *,
        missed: Missed = "run_once",
        name: str | None = None,
        **options: Any,
    ) -> TaskDecorator:
        """Run the decorated function every ``interval`` (a timedelta or seconds, at least
        1 s), on slots aligned to multiples of the interval. See ``cron`` for the rest."""
        if isinstance(interval, timedelta):
            seconds = interval.total_seconds()
        elif isinstance(interval, numbers.Real) and not isinstance(interval, bool):
            try:
                seconds = float(interval)
            except OverflowError:  # an int past the largest float: refused as infinite
                seconds = float("inf")
        else:
            raise ConfigurationError(
                f"every() takes a timedelta or a number of seconds, not {interval!r}"
            )
        return self._scheduled(name, options, every=seconds, missed=missed)

    def _scheduled(self, name: str | None, options: dict[str, Any], **how: Any) -> TaskDecorator:
        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            task = fn if isinstance(fn, Task) else self.task(**options)(fn)
            try:
                task.codec.encode((), {})
            except InvalidArguments as exc:
                raise ConfigurationError(
                    f"scheduled task {task.name!r} must be callable without arguments: {exc}"
                ) from None
            from .scheduler import Schedule

            schedule = Schedule(name=name or task.name, task=task, **how)
            if schedule.name in self._schedules:
                raise ConfigurationError(f"a schedule named {schedule.name!r} already exists")
            self._schedules[schedule.name] = schedule
            return task

        return typing.cast(TaskDecorator, register)

    async def pause_schedule(self, name: str, paused: bool = True) -> None:
        """Pause (or, with ``paused=False``, resume) a schedule for every scheduler."""
        if name not in self._schedules:
            raise ConfigurationError(
                f"no schedule named {name!r}; known: {', '.join(self._schedules) or 'none'}"
            )
        await self.open()
        await self.store.pause_schedule(name, paused)

    def scheduler(self, *, tick: float = 1.0) -> Scheduler:
        """A scheduler for this lane's schedules (``await scheduler.run()`` until ``stop()``)."""
        from .scheduler import Scheduler

        return Scheduler(self, tick=tick)

    def _register(self, task: Task[Any, Any]) -> None:
        existing = self._tasks.get(task.name)
        if existing is not None and existing.func is not task.func:
            raise ValueError(f"a different task is already registered as {task.name!r}")
        self._tasks[task.name] = task
        self._by_function[task.func] = task

    def task_for(self, func: Callable[..., Any]) -> Task[Any, Any]:
        """The task for ``func``: itself if it is a ``Task``, the registered one, or a new
        default task named by its import path. Raises ``NotImportable`` for functions another
        process could not find."""
        if isinstance(func, Task):
            if func.lane is not self and func.name not in self._tasks:
                self._register(func)
            return func
        task = self._by_function.get(func)
        if task is None:
            name = import_name(func)
            task = self.task(name=name)(func)
        return task

    def resolve_task(self, name: str) -> Task[Any, Any]:
        """The task a job names: registered here, or a plain function imported by its
        ``module:qualname``. Raises ``UnknownTask``."""
        task = self._tasks.get(name)
        if task is not None:
            return task
        found = resolve_import_name(name)
        if isinstance(found, Task):
            self._register(found)
            return found
        try:
            return self.task_for(found)
        except Exception as exc:  # pragma: no cover - resolve_import_name checked it
            raise UnknownTask(str(exc)) from exc

    # -- jobs -------------------------------------------------------------------------

    async def enqueue_jobs(self, jobs: Sequence[Job], *, connection: Any = None) -> list[Job]:
        """Store built jobs in one step (inside ``connection``'s transaction when given) and
        wake local workers (unless every job waits for its request's release)."""
        await self.open()
        for job in jobs:
            inject_context(job.meta)  # the caller's trace travels with the job (otel extra)
        if connection is None:
            stored = await self.store.enqueue(jobs)
        else:
            stored = await self.store.enqueue(jobs, connection=connection)
        if any(job.state is not JobState.DEFERRED for job in jobs):
            self.notifier.notify()
        return stored

    async def job(self, job_id: str) -> JobHandle:
        """The handle of any job by id. Raises ``JobNotFound``."""
        await self.open()
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return JobHandle(self, job.id, job.task)

    async def cancel(self, job_id: str) -> JobState:
        """Cancel a job (see ``JobHandle.cancel``). Raises ``JobNotFound``."""
        await self.open()
        now = time.time()
        state = await self.store.cancel(job_id, now, keep_until=now + self.settings.keep_failed)
        if state is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        self.notifier.notify()
        return state

    async def retry(self, job_id: str) -> bool:
        """Queue a failed or cancelled job again. False if it is in another state."""
        await self.open()
        done = await self.store.retry(job_id, time.time())
        if done:
            self.notifier.notify()
        return done

    def decode_result(self, job: Job) -> Any:
        """A succeeded job's result, decoded with its task's return annotation when known."""
        if job.result is None:
            return None
        task = self._tasks.get(job.task)
        if task is None:
            try:
                task = self.resolve_task(job.task)
            except UnknownTask:
                import json

                return json.loads(job.result)
        return task.codec.decode_result(job.result)

    async def wait_for_change(self, timeout: float) -> None:
        """Wait until jobs change in this process, or ``timeout`` seconds."""
        await self.notifier.wait(timeout)

    # -- running ----------------------------------------------------------------------

    def worker(
        self,
        *,
        concurrency: int | None = None,
        queues: list[str] | None = None,
        threads: int | None = None,
    ) -> Worker:
        """A worker for this lane (``await worker.run()`` runs it until ``stop()``);
        ``threads`` sizes its pool for ``def`` tasks (default: the lane's, else the
        concurrency)."""
        from .worker import Worker

        return Worker(self, concurrency=concurrency, queues=queues, threads=threads)

    def worker_with_room(self) -> Worker | None:
        """A worker of this lane running on the running event loop, not stopping, with a
        free slot; None if there is none."""
        for worker in self._running:
            if worker.has_room_here():
                return worker
        return None

    def install(
        self,
        app: FastAPI,
        *,
        workers: int = 1,
        concurrency: int | None = None,
        queues: list[str] | None = None,
        scheduler: bool | None = None,
        prefix: str = "/backlane",
        dashboard: bool = False,
        dashboard_auth: Callable[..., Any] | None = None,
        metrics: bool | None = None,
    ) -> None:
        """Wire this lane into ``app``: open the store at startup, run ``workers`` embedded
        worker loops (0 for a web-only process) and, if the lane has schedules (or
        ``scheduler=True``), an embedded scheduler; stop them gracefully at shutdown; keep
        every request's tasks durable; serve the status API at ``{prefix}/jobs/{id}`` (and
        its live events at ``{prefix}/jobs/{id}/events``). With ``dashboard=True``, the web
        dashboard at ``{prefix}/``, closed to non-loopback requests unless
        ``BACKLANE_DASHBOARD_TOKEN`` is set or ``dashboard_auth`` (a FastAPI dependency)
        decides; ``metrics`` serves Prometheus metrics at ``{prefix}/metrics`` (default: with
        the dashboard)."""
        from .fastapi import install

        install(
            self,
            app,
            workers=workers,
            concurrency=concurrency,
            queues=queues,
            scheduler=scheduler,
            prefix=prefix,
            dashboard=dashboard,
            dashboard_auth=dashboard_auth,
            metrics=metrics,
        )
