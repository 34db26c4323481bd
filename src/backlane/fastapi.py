"""FastAPI integration: the durable ``BackgroundTasks`` drop-in, ``install()``, status API.

Change one import::

    from backlane.fastapi import BackgroundTasks

and ``background_tasks.add_task(func, *args, **kwargs)`` stores the task before the
response leaves, starts it only after the response has been sent, retries it, and lets
anyone follow it by id. A request's tasks run one after another in the order added
(dependencies' first); all are discarded if the endpoint raises or the response is a 5xx.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import Backlane
from .exceptions import ConfigurationError, InvalidArguments
from .jobs import Job, JobHandle, JobState
from .tasks import TaskCall
from .worker import checked_queues

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["BackgroundTasks", "DurableBackgroundTasks", "TaskArgumentsRejected", "install"]

log = logging.getLogger("backlane")

_BATCH = "backlane.batch"
_JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class TaskArgumentsRejected(RequestValidationError, InvalidArguments):  # type: ignore[misc]
    """``add_task`` arguments that do not fit the task: FastAPI answers 422, nothing stored."""

    def __init__(self, exc: InvalidArguments) -> None:
        errors = [{**err, "loc": ["task", exc.task, *err["loc"]]} for err in exc.errors()]
        RequestValidationError.__init__(self, errors)
        self.task = exc.task
        Exception.__init__(self, str(exc))


class RequestBatch:
    """The tasks one request added, and where they are in their hand-over."""

    def __init__(self, lane: Backlane) -> None:
        self.lane = lane
        self.jobs: list[Job] = []
        self.handles: list[JobHandle] = []
        self.local: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.connections: list[Any] = []
        """For each job, the caller's connection whose transaction it joins, or None."""
        self.stored = False
        self.finished = False
        self.handed_over = False
        """Whether the response has been sent and the jobs let run (or, eager, run)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        """The request's event loop, once handed over."""
        self.late: list[tuple[Job, JobHandle]] = []
        """Jobs added once handed over, still to store, oldest first."""

    def add(self, job: Job, handle: JobHandle, connection: Any = None) -> None:
        """Add a job after the others. With ``connection``, the job — and every later job
        of the request, which waits for it — joins that connection's transaction. Once
        the response has gone (a dependency's teardown adding a task), the job is stored
        at once, queued after the request's last job."""
        job.after = self.jobs[-1].id if self.jobs else None
        if self.handed_over:
            if connection is not None:
                raise ConfigurationError(
                    f"task {job.task!r}: added with connection= after the response was sent "
                    "(in a dependency's teardown), it cannot join that transaction; enqueue "
                    "it with `await task.options(connection=...).enqueue(...)` before the "
                    "commit instead"
                )
            job.state, job.release_at = JobState.QUEUED, None
            self.jobs.append(job)
            self.handles.append(handle)
            self.connections.append(None)
            if self.loop is None or _running_loop() is self.loop:
                self._store_late(job, handle)
            else:  # a def dependency's teardown, on a worker thread
                self.loop.call_soon_threadsafe(self._store_late, job, handle)
            return
        if connection is None and self.connections:
            connection = self.connections[-1]
        self.jobs.append(job)
        self.handles.append(handle)
        self.connections.append(connection)

    def _store_late(self, job: Job, handle: JobHandle) -> None:
        """Store (or, eager, run) a job added once the response had gone, after the jobs
        added before it, as stored: one at a time, in the order added."""
        self.late.append((job, handle))
        if len(self.late) == 1:  # none under way
            self.lane.run_soon(self._store_late_ones())

    async def _store_late_ones(self) -> None:
        with anyio.CancelScope(shield=True):
            while self.late:
                job, handle = self.late[0]
                position = next(i for i, h in enumerate(self.handles) if h is handle)
                job.after = self.handles[position - 1].id if position else None
                try:
                    if self.lane.eager:
                        await self.lane.worker(concurrency=1).run_inline([job])
                    else:
                        (stored,) = await self.lane.enqueue_jobs([job])
                        handle.id = stored.id
                except Exception:
                    log.exception("could not store task %s added after its response", job.task)
                del self.late[0]

    async def persist(self) -> None:
        """Store the jobs before the response leaves: deferred until ``after_response``
        releases them, or, for jobs given a connection, queued inside the transaction open
        on it, so they exist only once the caller commits it (a request-scoped dependency
        commits after the response has been sent)."""
        if self.stored or not self.jobs or self.lane.eager:
            return
        now = time.time()
        hold = now + self.lane.settings.release_grace
        for job, connection in zip(self.jobs, self.connections, strict=True):
            if connection is None:
                job.release_at = hold
            else:
                job.state, job.release_at = JobState.QUEUED, None
        # A cancellation (a client gone) must not leave jobs stored that we do not know of.
        if any(job.key for job in self.jobs) or self.connections[-1] is not None:
            with anyio.CancelScope(shield=True):
                stored = await self._persist_one_by_one()
        elif self.lane.store.enqueue_returns_once_begun:  # no shield needed: it costs
            stored = await self.lane.enqueue_jobs(self.jobs)
        else:
            with anyio.CancelScope(shield=True):
                stored = await self.lane.enqueue_jobs(self.jobs)
        self.stored = True
        for handle, job in zip(self.handles, stored, strict=True):
            handle.id = job.id

    async def _persist_one_by_one(self) -> list[Job]:
        # A job whose idempotency key is taken is not stored; the next task of the request
        # must then wait for the job that holds the key instead. Each job goes through its
        # own connection, if it was given one.
        stored: list[Job] = []
        for job, connection in zip(self.jobs, self.connections, strict=True):
            if stored:
                job.after = stored[-1].id
            (kept,) = await self.lane.enqueue_jobs([job], connection=connection)
            stored.append(kept)
        self.jobs = stored
        return stored

    def drop(self) -> None:
        """Forget jobs not yet stored (the request failed)."""
        if not self.stored:
            self.jobs.clear()
            self.connections.clear()
            self.local.clear()
            self.finished = True

    async def abandon(self) -> None:
        """The request failed: discard whatever was stored."""
        if self.stored and not self.finished:
            with anyio.CancelScope(shield=True):
                now = time.time()
                keep = now + self.lane.settings.keep_failed
                await self.lane.store.discard([j.id for j in self.jobs], now, keep_until=keep)
        self.drop()
        self.finished = True

    def exit_endpoint(self, kind: type[BaseException] | None, *_: object) -> bool:
        """The endpoint (and its dependencies) returned or raised: if it raised, FastAPI
        would never have run these tasks, so neither do we."""
        if kind is not None:
            self.drop()
        return False

    async def exit_request(self, kind: type[BaseException] | None, *_: object) -> bool:
        """The request ended (without the middleware): hand over, unless it failed."""
        if kind is None:
            await self.after_response()
        else:
            self.drop()
        return False

    async def after_response(self) -> None:
        """The response has been sent: let the jobs run (or, eager, run them here), then
        run the local tasks. What runs here is shielded from cancellation: a
        StreamingResponse sends from a task group that Starlette cancels as soon as the
        server reports the client gone, right after the last chunk; the local (and eager)
        tasks run here all the same, as Starlette's own background tasks would, after the
        response and before the teardown of the request's dependencies."""
        if self.finished:
            return
        self.finished = self.handed_over = True
        self.loop = asyncio.get_running_loop()
        if self.lane.eager or self.local:
            with anyio.CancelScope(shield=True):
                await self._after_response()
        else:
            await self._after_response()

    async def _after_response(self) -> None:
        if self.jobs:
            if self.lane.eager:
                await self.lane.worker(concurrency=1).run_inline(self.jobs)
            else:
                if not self.stored:  # no middleware stored them when the response started
                    await self.persist()
                ids = [j.id for j in self.jobs]
                worker = self.lane.worker_with_room()
                if worker is not None:  # an embedded worker releases them with its claim
                    worker.hand_over(ids)
                else:
                    await self.lane.release(ids)
        for func, args, kwargs in self.local:
            try:
                if inspect.iscoroutinefunction(func):
                    await func(*args, **kwargs)
                else:
                    await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))
            except Exception:
                log.exception("local background task %r failed", func)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class DurableBackgroundTasks:
    """What an endpoint receives as ``BackgroundTasks``: one instance per request, shared
    by the request's dependencies."""

    def __init__(self, batch: RequestBatch) -> None:
        self._batch = batch

    @property
    def lane(self) -> Backlane:
        return self._batch.lane

    @property
    def jobs(self) -> list[JobHandle]:
        """Handles of the tasks added so far, in order."""
        return list(self._batch.handles)

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> JobHandle:
        """Add a task to run after the response, durably; returns its handle.

        ``func`` is a plain module-level function (found by its import path), a
        ``@lane.task``, or ``task.options(...)`` for a delay, priority, queue or key.
        Arguments are checked against its signature now: a mismatch is a 422.
        With ``task.options(connection=session)`` (PostgreSQL store) the job joins the
        transaction open on that connection when the response starts, and exists only if
        it commits; later tasks of the request join it too.
        """
        lane = self._batch.lane
        options = None
        if isinstance(func, TaskCall):
            options = func.opts
            func = func.task
        task = lane.task_for(func)
        try:
            job = task.build_job(args, kwargs, options, state=JobState.DEFERRED)
        except InvalidArguments as exc:
            raise TaskArgumentsRejected(exc) from None
        handle = JobHandle(lane, job.id, task.name)
        self._batch.add(job, handle, None if options is None else options.connection)
        return handle

    def add_local_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func`` in this process after the response, as Starlette does: not stored,
        not retried, lost on a crash. For callables a worker cannot import."""
        self._batch.local.append((func, args, kwargs))


async def _background_tasks(conn: HTTPConnection) -> DurableBackgroundTasks:
    # A plain dependency (a generator one costs FastAPI a context manager per request)
    # that hooks into the request's exit stack, which encloses the endpoint's own
    # (function) stack: an exception of the endpoint, or of the teardown of any dependency
    # run before the response, passes through it, whatever was resolved first; it closes
    # after the response has been sent.
    scope = conn.scope
    request_stack: AsyncExitStack | None = scope.get("fastapi_inner_astack")
    batch = scope.get(_BATCH)
    if batch is None:
        # No middleware (install() not called, or a WebSocket): hand over when the request
        # ends, after the response has been sent.
        batch = RequestBatch(_lane_for(conn))
        scope[_BATCH] = batch
        if request_stack is not None:
            request_stack.push_async_exit(batch.exit_request)
    stack = request_stack or scope.get("fastapi_function_astack")
    if stack is not None:
        stack.push(batch.exit_endpoint)
    return DurableBackgroundTasks(batch)


BackgroundTasks = Annotated[DurableBackgroundTasks, Depends(_background_tasks)]
"""The drop-in for ``fastapi.BackgroundTasks``: ``background_tasks: BackgroundTasks``."""


class _Installed:
    """What ``install()`` set up on an app: the embedded workers and scheduler its lifespan
    starts, and whether that lifespan has run (Starlette runs none for a mounted app)."""

    def __init__(
        self,
        workers: int,
        concurrency: int | None,
        queues: list[str] | None,
        scheduler: bool | None,
    ) -> None:
        self.workers = workers
        self.concurrency = concurrency
        self.queues = queues
        self.scheduler = scheduler
        self.lifespan_ran = False
        self.warned = False
        self.started: dict[asyncio.AbstractEventLoop, asyncio.Task[None] | None] = {}
        """Per event loop, what the first request through a mount started there."""

    def without_lifespan(self, lane: Backlane) -> None:
        """A request came through a mount and the app's lifespan never ran: start on this
        loop, inside the lane's own lifespan, what that lifespan would have started (the
        embedded workers, the scheduler), and say so once."""
        loop = asyncio.get_running_loop()
        if loop in self.started:
            return
        count = 0 if lane.eager else self.workers
        schedules = bool(lane.schedules) if self.scheduler is None else self.scheduler
        if not count and not schedules:
            self.started[loop] = None  # nothing runs here: workers are elsewhere
            return
        if not self.warned:
            self.warned = True
            log.warning(
                "backlane: install() was called on a mounted app, whose lifespan Starlette "
                "never runs; starting %d embedded worker(s)%s on the running event loop, "
                "which will not stop gracefully. Call install() on the outermost app.",
                count,
                " and the scheduler" if schedules else "",
            )
        task = loop.create_task(self._run(lane, count, schedules))
        self.started[loop] = task
        task.add_done_callback(functools.partial(self._ended, loop))

    def _ended(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
        if self.started.get(loop) is task:  # the next request through the mount tries again
            del self.started[loop]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "backlane: the embedded workers of a mounted app stopped",
                exc_info=task.exception(),
            )

    async def _run(self, lane: Backlane, count: int, schedules: bool) -> None:
        await lane.open()
        async with lane.lifespan_context(), anyio.create_task_group() as group:
            for _ in range(count):
                worker = lane.worker(concurrency=self.concurrency, queues=self.queues)
                group.start_soon(worker.run)
            if schedules:
                group.start_soon(lane.scheduler().run)


class DurableTasksMiddleware:
    """Stores a request's tasks when its status is known (< 500) and releases them once the
    response has been sent."""

    def __init__(self, app: ASGIApp, lane: Backlane, installed: _Installed | None = None) -> None:
        self.app = app
        self.lane = lane
        self.installed = installed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        installed = self.installed
        if installed is not None and not installed.lifespan_ran and "app_root_path" in scope:
            installed.without_lifespan(self.lane)  # mounted (a Mount sets app_root_path)
        batch = RequestBatch(self.lane)
        scope[_BATCH] = batch
        sent = False

        async def send_then_hand_over(message: Message) -> None:
            nonlocal sent
            kind = message["type"]
            if kind == "http.response.start":
                if message["status"] >= 500:
                    batch.drop()
                else:
                    await batch.persist()
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                sent = True
                await batch.after_response()

        try:
            await self.app(scope, receive, send_then_hand_over)
        except BaseException:
            await batch.abandon()
            raise
        if not sent:
            if batch.stored:
                await batch.after_response()
            else:
                batch.drop()


class _JobJSON(JSONResponse):
    """JSON as FastAPI sends it; where text another program stored holds lone surrogates
    (which UTF-8 cannot carry), escaped as ``\\udXXXX`` instead of failing."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def status_router(lane: Backlane, *, stream_seconds: float = 60.0) -> APIRouter:
    """The status API, open to whoever knows a job's id (80 random bits; unguessable):

    * ``GET /jobs/{id}``: the job's state, progress, result and error, as JSON.
    * ``GET /jobs/{id}/events``: server-sent events. The job, as ``/jobs/{id}`` shows it,
      comes at once as a JSON ``data:`` line, then again whenever its state, attempts,
      progress or message change. The stream ends after the event showing the job ended;
      with an ``event: gone`` if the job is removed; or after ``stream_seconds``, when a
      client reconnects (``EventSource`` does so by itself). Changes made by this
      process's workers show within milliseconds, other processes' within half a second.
    """
    router = APIRouter()

    # Annotations naming a local (Depends(existing_job)) would not resolve: defaults do.
    async def existing_job(job_id: str) -> Job:
        job = None
        if _JOB_ID.fullmatch(job_id):
            await lane.open()  # not open yet where the app's lifespan did not run (a mount)
            job = await lane.store.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job with id {job_id!r}")
        return job

    @router.get(
        "/jobs/{job_id}",
        response_class=_JobJSON,
        summary="A job's state, progress, result and error",
    )
    async def job_status(job: Job = Depends(existing_job)) -> _JobJSON:
        # a response of its own: FastAPI's serialization would refuse a result nested a
        # few hundred deep (stored by another program), which json reads and writes
        return _JobJSON(job.to_public())

    @router.get(
        "/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        summary="A job's state and progress as server-sent events, until it ends",
    )
    async def job_events(job: Job = Depends(existing_job)) -> AsyncIterator[ServerSentEvent]:
        deadline = time.monotonic() + stream_seconds
        shown: tuple[Any, ...] | None = None
        current: Job | None = job
        while current is not None:
            now_showing = (current.state, current.attempts, current.progress, current.message)
            if now_showing != shown:
                yield ServerSentEvent(
                    data=current.to_public(), retry=1000 if shown is None else None
                )
                shown = now_showing
            if current.state.terminal or time.monotonic() >= deadline:
                return
            await lane.wait_for_change(0.5)
            await anyio.sleep(0.02)  # one read for a burst of changes
            current = await lane.store.get(job.id)
        yield ServerSentEvent(event="gone", data={"id": job.id})

    return router


async def _invalid_arguments(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidArguments)
    errors = [{**err, "loc": ["task", exc.task, *err["loc"]]} for err in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def install(
    lane: Backlane,
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
    """See ``Backlane.install``. Also: ``prefix`` starts with ``/`` (a trailing one is
    ignored; ``"/"`` is the root), else ``ConfigurationError``; with ``dashboard=True`` the
    web dashboard at ``{prefix}/``; with ``metrics=True`` Prometheus metrics at
    ``{prefix}/metrics`` (default: with the dashboard, when prometheus-client is
    installed). Both follow the dashboard's access rule (``backlane.dashboard.access``):
    the FastAPI dependency ``dashboard_auth`` if given, else the token in
    ``BACKLANE_DASHBOARD_TOKEN``, else loopback requests only."""
    current = getattr(app.state, "backlane", None)
    if current is not None and current is not lane:
        raise ConfigurationError("this app already has another Backlane installed")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    checked_queues(queues)  # refused now, not when the lifespan starts the workers
    if dashboard_auth is not None and not (dashboard or metrics):
        raise ConfigurationError("dashboard_auth= guards the dashboard: add dashboard=True")
    prefix = prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ConfigurationError(f"a prefix starts with '/', got {prefix!r}")
    app.state.backlane = lane
    installed = _Installed(workers, concurrency, queues, scheduler)
    app.add_middleware(DurableTasksMiddleware, lane=lane, installed=installed)
    app.include_router(status_router(lane), prefix=prefix, tags=["backlane"])
    if dashboard or metrics:
        from .dashboard import dashboard_router

        app.include_router(
            dashboard_router(
                lane, prefix=prefix, auth=dashboard_auth, pages=dashboard, metrics=metrics
            )
        )
    app.add_exception_handler(InvalidArguments, _invalid_arguments)
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        # The store opens before the app's own start-up (which may enqueue) and closes after
        # its shutdown; the lane's lifespan, the workers and the scheduler run only in
        # between, so that tasks may use what the app's lifespan sets up and tears down.
        installed.lifespan_ran = True
        await lane.open()
        try:
            async with original(application) as state, lane.lifespan_context():
                count = 0 if lane.eager else workers
                embedded = [
                    lane.worker(concurrency=concurrency, queues=queues) for _ in range(count)
                ]
                schedules = (
                    lane.scheduler()
                    if (scheduler is None and lane.schedules) or scheduler
                    else None
                )
                async with anyio.create_task_group() as group:
                    for worker in embedded:
                        group.start_soon(worker.run)
                    if schedules is not None:
                        group.start_soon(schedules.run)
                    try:
                        yield state
                    finally:  # the group then waits for running jobs, up to shutdown_grace
                        for worker in embedded:
                            worker.stop()
                        if schedules is not None:
                            schedules.stop()
        finally:
            await lane.close()

    app.router.lifespan_context = lifespan


def _lane_for(conn: HTTPConnection) -> Backlane:
    """The app's lane; for an app that never called ``install()``, one configured from the
    environment, with an embedded worker started on the running loop at first use."""
    state = conn.app.state
    lane: Backlane | None = getattr(state, "backlane", None)
    if lane is None:
        lane = Backlane()
        state.backlane = lane
        state.backlane_embedded = {}
        log.warning(
            "backlane: this app never called lane.install(app); using %s with a worker on "
            "the running event loop. install() is the recommended set-up: it stores tasks "
            "before the response leaves and stops workers gracefully.",
            lane.url,
        )
    embedded: dict[asyncio.AbstractEventLoop, Worker] | None = getattr(
        state, "backlane_embedded", None
    )
    if embedded is not None and not lane.eager:
        loop = asyncio.get_running_loop()
        if loop not in embedded:
            worker = lane.worker()
            embedded[loop] = worker
            task = loop.create_task(worker.run())
            worker.background = task  # type: ignore[attr-defined]
    return lane
