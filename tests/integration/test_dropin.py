"""The BackgroundTasks drop-in keeps FastAPI's semantics and makes them durable (DESIGN §2)."""

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.testclient import TestClient

from backlane import Backlane, ConfigurationError, JobHandle, JobState
from backlane.fastapi import BackgroundTasks
from backlane.jobs import Job
from backlane.testing import drain_sync
from tests.integration import recorder, schedule_tasks
from tests.integration.recorder import RECORD


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def job_state(lane: Backlane, job_id: str) -> JobState | None:
    job = anyio.run(lane.store.get, job_id)
    return None if job is None else job.state


def make_app(lane: Backlane, workers: int = 1, seconds: float = 0.05) -> FastAPI:
    """The test app; ``seconds`` is how long each task of ``/ordered`` takes."""
    app = FastAPI()
    lane.install(app, workers=workers, concurrency=10)

    def log_query(background_tasks: BackgroundTasks, q: str | None = None) -> str | None:
        if q:
            background_tasks.add_task(recorder.slow_async, f"dep:{q}")
        return q

    @app.post("/ordered")
    async def ordered(
        background_tasks: BackgroundTasks, q: Annotated[str | None, Depends(log_query)]
    ) -> dict[str, Any]:
        first = background_tasks.add_task(recorder.slow_sync, "endpoint:1", seconds)
        second = background_tasks.add_task(recorder.slow_async, "endpoint:2", seconds)
        return {"ids": [first.id, second.id], "all": [j.id for j in background_tasks.jobs]}

    @app.post("/fail-then-continue")
    def fail_then_continue(background_tasks: BackgroundTasks) -> dict[str, Any]:
        a = background_tasks.add_task(recorder.failing, "a")
        b = background_tasks.add_task(recorder.note, "b")
        return {"ids": [a.id, b.id]}

    @app.post("/raises")
    def raises(background_tasks: BackgroundTasks) -> None:
        app.state.last = background_tasks.add_task(recorder.note, "raised").id
        raise HTTPException(status_code=409, detail="conflict")

    @app.post("/server-error")
    def server_error(background_tasks: BackgroundTasks) -> JSONResponse:
        app.state.last = background_tasks.add_task(recorder.note, "5xx").id
        return JSONResponse({"error": "unavailable"}, status_code=503)

    @app.post("/own-response")
    def own_response(background_tasks: BackgroundTasks) -> PlainTextResponse:
        job = background_tasks.add_task(recorder.note, "own-response")
        return PlainTextResponse(job.id)

    @app.post("/typed/{email}")
    def typed(email: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(recorder.slow_async, "fine")
        background_tasks.add_task(recorder.slow_async, email, seconds="not a number")
        return {"never": "reached"}

    @app.post("/keyed")
    def keyed(background_tasks: BackgroundTasks) -> dict[str, Any]:
        task = lane.task_for(recorder.slow_async)
        first = background_tasks.add_task(task.options(key="only-once"), "keyed", 1.0)
        after = background_tasks.add_task(recorder.note, "after-keyed")
        return {"ids": [first.id, after.id]}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, background_tasks: BackgroundTasks) -> None:
        await websocket.accept()
        job = background_tasks.add_task(recorder.note, "websocket")
        await websocket.send_text(job.id)
        await websocket.close()

    return app


def test_embedded_workers_run_inside_the_apps_own_lifespan(lane_url: str) -> None:
    # A job left from an earlier run starts only once the app's own start-up has set up
    # what tasks use; one running at shutdown ends before the app's own shutdown tears it
    # down (its grace period permitting).
    lane = Backlane(lane_url, shutdown_grace=5)
    anyio.run(_enqueue_before_start_up, lane)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.sleep(0.2)  # an embedded worker already running would take the job now
        recorder.RESOURCE["pool"] = "ready"
        yield
        recorder.RESOURCE.clear()

    app = FastAPI(lifespan=lifespan)
    lane.install(app)

    @app.post("/work")
    def work(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(recorder.uses_resource, "during", 0.3)

    with TestClient(app) as client:
        wait_until(lambda: "left:ready" in RECORD.labels())
        client.post("/work")
        wait_until(lambda: "during:ready" in RECORD.labels("start"))
    assert RECORD.labels("start") == ["left:ready", "during:ready"]
    assert RECORD.labels() == ["left:ready", "during:ready"]


async def _enqueue_before_start_up(lane: Backlane) -> None:
    async with lane:
        await lane.task_for(recorder.uses_resource).enqueue("left")


def test_dependency_tasks_first_then_endpoint_one_after_another(lane_url: str) -> None:
    lane = Backlane(lane_url)
    with TestClient(make_app(lane)) as client:
        reply = client.post("/ordered", params={"q": "x"})
        assert reply.status_code == 200
        body = reply.json()
        assert len(body["all"]) == 3  # one shared instance: dependency + endpoint tasks
        wait_until(lambda: len(RECORD.labels()) == 3)
    assert RECORD.labels("start") == ["dep:x", "endpoint:1", "endpoint:2"]
    events = sorted(RECORD.events, key=lambda e: e[2])
    kinds = [(kind, label) for kind, label, _ in events]
    assert kinds == [
        ("start", "dep:x"), ("end", "dep:x"),
        ("start", "endpoint:1"), ("end", "endpoint:1"),
        ("start", "endpoint:2"), ("end", "endpoint:2"),
    ]  # fmt: skip


def test_requests_run_concurrently_with_each_other(lane_url: str) -> None:
    lane = Backlane(lane_url)
    # tasks long enough that four requests fit in one chain's time on a busy machine
    with TestClient(make_app(lane, seconds=0.5)) as client:
        for _ in range(4):
            assert client.post("/ordered").status_code == 200
        wait_until(lambda: len(RECORD.labels()) == 8)
    starts = [t for kind, label, t in RECORD.events if kind == "start" and label == "endpoint:1"]
    ends = [t for kind, label, t in RECORD.events if kind == "end" and label == "endpoint:2"]
    assert min(ends) > max(starts)  # every request's first task started before any chain ended


def test_a_failed_task_does_not_stop_the_next(lane_url: str) -> None:
    lane = Backlane(lane_url, retries=0)
    with TestClient(make_app(lane)) as client:
        a, b = client.post("/fail-then-continue").json()["ids"]
        wait_until(lambda: RECORD.labels() == ["a", "b"])
        wait_until(lambda: job_state(lane, b) is JobState.SUCCEEDED)
        status = client.get(f"/backlane/jobs/{a}").json()
    assert status["state"] == "failed"
    assert status["error"]["type"] == "RuntimeError"
    assert "a failed on purpose" in status["error"]["message"]
    assert "Traceback" in status["error"]["traceback"]


def test_endpoint_that_raises_keeps_no_task(lane_url: str) -> None:
    lane = Backlane(lane_url)
    app = make_app(lane)
    with TestClient(app) as client:
        assert client.post("/raises").status_code == 409
        assert job_state(lane, app.state.last) is None
        assert client.post("/server-error").status_code == 503
        assert job_state(lane, app.state.last) is None
        time.sleep(0.2)
    assert RECORD.labels() == []


def test_tasks_kept_where_fastapi_drops_them(lane_url: str) -> None:
    lane = Backlane(lane_url)
    with TestClient(make_app(lane)) as client:
        own = client.post("/own-response").text
        with client.websocket_connect("/ws") as ws:
            via_ws = ws.receive_text()
        wait_until(lambda: sorted(RECORD.labels()) == ["own-response", "websocket"])
        wait_until(lambda: job_state(lane, via_ws) is JobState.SUCCEEDED)
        assert job_state(lane, own) is JobState.SUCCEEDED


def test_idempotency_key_inside_a_request_chain(lane_url: str) -> None:
    """Two requests add a task with the same key: it runs once, and each request's next
    task still runs, after it."""
    lane = Backlane(lane_url)
    with TestClient(make_app(lane)) as client:
        one = client.post("/keyed").json()["ids"]
        two = client.post("/keyed").json()["ids"]
        assert job_state(lane, two[0]) is None  # not stored: the key was taken
        wait_until(lambda: job_state(lane, two[1]) is JobState.SUCCEEDED)
        wait_until(lambda: job_state(lane, one[1]) is JobState.SUCCEEDED)
    assert RECORD.labels() == ["keyed", "after-keyed", "after-keyed"]


def test_bad_argument_is_422_and_nothing_is_stored(lane_url: str) -> None:
    lane = Backlane(lane_url)
    with TestClient(make_app(lane, workers=0)) as client:
        reply = client.post("/typed/a@example.com")
        assert reply.status_code == 422
        detail = reply.json()["detail"]
        assert detail[0]["loc"] == ["task", "tests.integration.recorder:slow_async", "seconds"]
        assert "valid number" in detail[0]["msg"]
        assert anyio.run(lane.store.counts) == {}


def test_status_api_shows_the_job(lane_url: str) -> None:
    lane = Backlane(lane_url)
    with TestClient(make_app(lane)) as client:
        ids = client.post("/ordered").json()["ids"]
        wait_until(lambda: job_state(lane, ids[1]) is JobState.SUCCEEDED)
        status = client.get(f"/backlane/jobs/{ids[1]}").json()
        assert client.get("/backlane/jobs/0123456789abcdef").status_code == 404
        assert client.get("/backlane/jobs/..%2F..%2Fetc").status_code == 404
    assert set(status) >= {
        "id", "task", "state", "attempts", "progress", "message", "result", "error",
        "created_at", "started_at", "finished_at",
    }  # fmt: skip
    assert status["state"] == "succeeded"
    assert status["result"] == "endpoint:2"
    assert status["attempts"] == 1


def test_status_api_shows_a_job_due_beyond_the_calendar(lane_url: str) -> None:
    # stored by another program (or before delays were bounded): shown, its time as null
    lane = Backlane(lane_url)
    job = Job(task="tests.integration.recorder:record", payload="{}", run_at=1e300)
    with TestClient(make_app(lane, workers=0)) as client:
        anyio.run(lane.store.enqueue, [job])
        reply = client.get(f"/backlane/jobs/{job.id}")
    assert reply.status_code == 200
    assert reply.json()["run_at"] is None and reply.json()["state"] == "queued"


@pytest.mark.anyio
async def test_stored_before_the_response_leaves_started_only_after(lane_url: str) -> None:
    """Drive the ASGI app by hand: when the last body chunk is handed to the server, the
    jobs are already in the store, still deferred; after it was sent they are queued."""
    lane = Backlane(lane_url)
    app = make_app(lane, workers=0)
    await lane.open()
    seen: dict[str, Any] = {}
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            ids = json.loads(message["body"])["ids"]
            seen["ids"] = ids
            seen["at_send"] = [(await lane.store.get(i)).state for i in ids]  # type: ignore[union-attr]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/ordered", "raw_path": b"/ordered", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1),
        "server": ("test", 80), "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    assert seen["at_send"] == [JobState.DEFERRED, JobState.DEFERRED]
    with anyio.fail_after(2):  # released at once, or with other requests' a moment later
        while True:
            after = [(await lane.store.get(i)).state for i in seen["ids"]]  # type: ignore[union-attr]
            if after == [JobState.QUEUED, JobState.QUEUED]:
                break
            assert after == [JobState.DEFERRED, JobState.DEFERRED]
            await anyio.sleep(0.001)
    await lane.close()


def test_drain_sync_runs_what_each_request_added(lane_url: str) -> None:
    """docs/testing.md's "queue, then drain": every task a request added runs in the next
    ``drain_sync``, with or without the app's lifespan. On SQLite, where releases are
    gathered for a moment, a request served by a ``TestClient`` without ``with`` (its event
    loop gone before the moment passed) left its job deferred: drained 0, run only after
    the release grace; with ``with``, a drain right after the request missed it now and
    then."""
    lane = Backlane(lane_url, retries=0)
    client = TestClient(make_app(lane, workers=0))  # no lifespan: a loop per request
    client.post("/fail-then-continue")
    assert drain_sync(lane) == 2
    assert RECORD.labels() == ["a", "b"]
    with TestClient(make_app(lane, workers=0)) as client:
        for _ in range(10):
            client.post("/own-response")
            assert drain_sync(lane) == 1
    assert RECORD.labels() == ["a", "b"] + ["own-response"] * 10


@pytest.mark.parametrize("eager", [False, True])
def test_a_streaming_response_runs_its_tasks_in_this_process_too(eager: bool) -> None:
    """After a ``StreamingResponse`` the server reports the client gone and Starlette
    cancels the response's task group: local tasks (and, eager, the request's tasks) that
    ran there were cancelled before they could run."""
    lane = Backlane("memory://", eager=eager)
    app = FastAPI()
    lane.install(app, workers=0)

    def session() -> Iterator[dict[str, bool]]:
        resource = {"open": True}
        yield resource
        resource["open"] = False

    def local(resource: dict[str, bool]) -> None:  # as Starlette: before the teardown
        recorder.note("local" if resource["open"] else "local, after the teardown")

    @app.get("/stream")
    def stream(
        background_tasks: BackgroundTasks, resource: Annotated[dict[str, bool], Depends(session)]
    ) -> StreamingResponse:
        background_tasks.add_task(recorder.note, "durable")
        background_tasks.add_local_task(local, resource)
        return StreamingResponse(iter([b"a", b"b"]))

    with TestClient(app) as client:
        for _ in range(5):
            assert client.get("/stream").text == "ab"
    expected = ["durable", "local"] if eager else ["local"]
    assert RECORD.labels() == expected * 5


def test_a_dependency_whose_teardown_raises_discards_the_tasks(lane_url: str) -> None:
    """A yield dependency run before the response (``scope="function"``), whose teardown
    raises (a commit that failed: 409), discards the request's tasks as FastAPI never runs
    them, whichever parameter comes first. Declared before ``BackgroundTasks``, its error
    was not seen, and the tasks ran."""
    lane = Backlane(lane_url)
    app = FastAPI()
    lane.install(app, workers=0)

    def commit_fails() -> Iterator[None]:
        yield
        raise HTTPException(status_code=409, detail="conflict on commit")

    Commit = Annotated[None, Depends(commit_fails, scope="function")]

    @app.post("/session-first")
    def session_first(_: Commit, background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(recorder.note, "session-first")

    @app.post("/tasks-first")
    def tasks_first(background_tasks: BackgroundTasks, _: Commit) -> None:
        background_tasks.add_task(recorder.note, "tasks-first")

    with TestClient(app) as client:
        assert client.post("/session-first").status_code == 409
        assert client.post("/tasks-first").status_code == 409
        assert client.portal.call(lane.store.counts) == {}  # type: ignore[union-attr]


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("installed", [True, False])
def test_a_task_added_by_a_teardown_after_the_response_runs(
    lane_url: str, eager: bool, installed: bool
) -> None:
    """A yield dependency's teardown runs after the response has been sent (FastAPI's
    default ``scope="request"``); a task it added was kept in the request's batch, whose
    jobs had been stored and handed over already, and was silently lost. It now runs,
    after the request's other tasks."""
    lane = Backlane(lane_url, eager=eager)
    app = FastAPI()
    if installed:
        lane.install(app, workers=0)
    else:
        app.state.backlane = lane  # no install(): no middleware (and here no worker)

    def audited(n: int, background_tasks: BackgroundTasks) -> Iterator[None]:
        yield
        background_tasks.add_task(recorder.note, f"teardown {n}")

    @app.post("/audited/{n}")
    def endpoint(
        n: int, background_tasks: BackgroundTasks, _: Annotated[None, Depends(audited)]
    ) -> str:
        return background_tasks.add_task(recorder.note, f"endpoint {n}").id

    with TestClient(app) as client:
        for n in range(3):
            assert client.post(f"/audited/{n}").status_code == 200
        if not eager:
            assert drain_sync(lane) == 6
        if not installed:  # no lifespan of install()'s closes the lane the requests opened
            client.portal.call(lane.close)
    labels = RECORD.labels()
    assert sorted(labels) == sorted(
        f"{kind} {n}" for kind in ("endpoint", "teardown") for n in range(3)
    )
    for n in range(3):  # after the request's other tasks
        assert labels.index(f"endpoint {n}") < labels.index(f"teardown {n}")


def test_a_task_added_by_a_teardown_names_the_job_holding_its_key(lane_url: str) -> None:
    """Stored after the response, a task whose idempotency key an unfinished job holds is
    not stored again; its handle names that job, as ``enqueue``'s would."""
    lane = Backlane(lane_url)
    app = FastAPI()
    lane.install(app, workers=0)
    noted = lane.task(recorder.note)
    handles: list[JobHandle] = []

    def audited(background_tasks: BackgroundTasks) -> Iterator[None]:
        yield
        handles.append(background_tasks.add_task(noted.options(key="audit"), "teardown"))
        handles.append(background_tasks.add_task(noted, "after it"))

    @app.post("/audited")
    def endpoint(_: Annotated[None, Depends(audited)]) -> None:
        return None

    with TestClient(app) as client:
        holder = client.portal.call(noted.options(key="audit").enqueue, "first")
        assert client.post("/audited").status_code == 200
        client.portal.call(lane.flush_releases)
        assert handles[0].id == holder.id
        # the next task waits for the job holding the key, as in the request itself
        after_it = client.portal.call(lane.store.get, handles[1].id)
        assert after_it is not None and after_it.after == holder.id


def test_a_task_added_by_a_teardown_cannot_join_a_transaction() -> None:
    """``connection=`` names a transaction the request's teardown is ending: a task
    added there with it is refused, not stored outside that transaction."""
    lane = Backlane("memory://")
    app = FastAPI()
    lane.install(app, workers=0)

    def session(background_tasks: BackgroundTasks) -> Iterator[None]:
        yield
        background_tasks.add_task(lane.task(recorder.note).options(connection=object()), "x")

    @app.post("/session")
    def endpoint(_: Annotated[None, Depends(session)]) -> None:
        return None

    with TestClient(app) as client, pytest.raises(ConfigurationError, match="connection="):
        client.post("/session")
    assert anyio.run(lane.store.counts) == {}  # nothing stored


@pytest.mark.parametrize(("prefix", "status_path"), [("/ops/", "/ops/jobs"), ("/", "/jobs")])
def test_an_install_prefix_may_end_with_a_slash(prefix: str, status_path: str) -> None:
    """``prefix="/ops/"`` (or ``"/"``, for the root) failed with FastAPI's assertion;
    the dashboard's own routes already accepted it."""
    lane = Backlane("memory://")
    app = FastAPI()
    lane.install(app, workers=0, prefix=prefix, dashboard=True)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        reply = client.get(f"{status_path}/0123456789abcdef")
        assert reply.status_code == 404 and "no job" in reply.json()["detail"]
        assert client.get(status_path.removesuffix("jobs")).status_code == 200  # overview


def test_an_install_prefix_must_be_a_path() -> None:
    with pytest.raises(ConfigurationError, match="starts with '/'"):
        Backlane("memory://").install(FastAPI(), prefix="ops")


def mounted(lane: Backlane, workers: int) -> FastAPI:
    """An app with ``lane`` installed (``POST /api/note`` adds a task noting "mounted"),
    mounted at ``/api`` in an outer app that is returned."""
    api = FastAPI()
    lane.install(api, workers=workers)

    @api.post("/note")
    def note(background_tasks: BackgroundTasks) -> str:
        return background_tasks.add_task(recorder.note, "mounted").id

    outer = FastAPI()
    outer.mount("/api", api)
    return outer


def test_installed_on_a_mounted_app_whose_lifespan_never_runs_tasks_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Starlette runs no lifespan of a mounted app: ``install()`` on one started no
    embedded worker and no scheduler, and the tasks waited, stored, for a worker that
    never came, with no word said. The first request through the mount now starts them
    on its loop, inside the lane's lifespan, and says why."""
    schedule_tasks.RUNS.clear()
    lane = Backlane("memory://")
    lane.every(1, name="tick")(schedule_tasks.tick)
    outer = mounted(lane, workers=1)
    with caplog.at_level("WARNING", logger="backlane"), TestClient(outer) as client:
        ids = [client.post("/api/note").json() for _ in range(3)]
        wait_until(lambda: all(job_state(lane, i) is JobState.SUCCEEDED for i in ids))
        wait_until(lambda: "tick" in schedule_tasks.RUNS, timeout=5)
    assert RECORD.labels() == ["mounted"] * 3
    warnings = [r.getMessage() for r in caplog.records if "lifespan" in r.getMessage()]
    assert len(warnings) == 1 and "mounted" in warnings[0] and "scheduler" in warnings[0]


def test_a_mounted_web_only_app_starts_nothing_and_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``workers=0`` (workers run in processes of their own) and no schedules: there is
    nothing a lifespan would have started, so nothing to say."""
    lane = Backlane("memory://")
    outer = mounted(lane, workers=0)
    with caplog.at_level("WARNING", logger="backlane"), TestClient(outer) as client:
        job_id = client.post("/api/note").json()
        assert drain_sync(lane) == 1
    assert job_state(lane, job_id) is JobState.SUCCEEDED
    assert not [r for r in caplog.records if "lifespan" in r.getMessage()]


def test_a_mounted_apps_workers_that_fail_to_start_are_logged_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Their start failing (here the lane's lifespan, once) was a task exception nobody
    read, and the app ran without workers from then on."""
    tries: list[int] = []

    @asynccontextmanager
    async def flaky_lifespan(lane: Backlane) -> AsyncIterator[None]:
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("the pool is not up yet")
        yield

    lane = Backlane("memory://", lifespan=flaky_lifespan)
    outer = mounted(lane, workers=1)
    with caplog.at_level("ERROR", logger="backlane"), TestClient(outer) as client:
        client.post("/api/note")
        wait_until(lambda: any("stopped" in r.getMessage() for r in caplog.records))
        job_id = client.post("/api/note").json()
        wait_until(lambda: job_state(lane, job_id) is JobState.SUCCEEDED)
    assert len(tries) == 2
