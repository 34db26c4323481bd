"""The lane's lifespan: what tasks share in a process (a pool, a client), set up once
before the lane runs jobs there and torn down after, read through ``TaskContext.state``."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from backlane import Backlane, ConfigurationError, JobState, TaskContext
from backlane.fastapi import BackgroundTasks
from backlane.testing import drain

pytestmark = pytest.mark.anyio


class Resources:
    """A stand-in for a client or pool: records when it was opened and closed."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.open = False

    def lifespan(self, lane: Backlane) -> Any:
        @asynccontextmanager
        async def run(given: Backlane) -> AsyncIterator[dict[str, Any]]:
            assert given is lane
            self.events.append("enter")
            await anyio.sleep(0.01)  # opening takes a moment, as a connection's does
            self.open = True
            try:
                yield {"client": self}
            finally:
                self.open = False
                self.events.append("exit")

        return run(lane)


def client_of(ctx: TaskContext) -> Resources:
    client: Resources = ctx.state["client"]
    return client


async def test_drain_runs_jobs_inside_the_lifespan_once() -> None:
    resources = Resources()
    lane = Backlane("memory://", lifespan=resources.lifespan)

    @lane.task(name="async_sees")
    async def async_sees(ctx: TaskContext) -> bool:
        resources.events.append("async job")
        return client_of(ctx).open

    @lane.task(name="sync_sees")
    def sync_sees(client: Annotated[Resources, Depends(client_of)]) -> bool:
        resources.events.append("sync job")
        return client.open

    async with lane:
        first = await async_sees.enqueue()
        second = await sync_sees.enqueue()
        assert lane.state == {}
        assert await drain(lane) == 2
        assert await first.result(timeout=1) is True
        assert await second.result(timeout=1) is True
    assert resources.events[0] == "enter" and resources.events[-1] == "exit"
    assert sorted(resources.events[1:-1]) == ["async job", "sync job"]
    assert lane.state == {}  # gone with its lifespan


async def test_inside_a_running_lifespan_it_is_not_run_again() -> None:
    resources = Resources()
    lane = Backlane("memory://", lifespan=resources.lifespan)

    @lane.task(name="noop")
    async def noop() -> None:
        pass

    async with lane, lane.lifespan_context() as state:
        assert state["client"] is resources
        await noop.enqueue()
        await drain(lane)
        async with lane.lifespan_context() as again:
            assert again is state
        assert resources.open
    assert resources.events == ["enter", "exit"]


def test_installed_its_lifespan_runs_inside_the_apps_around_the_embedded_worker() -> None:
    resources = Resources()
    events = resources.events

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("app start")
        yield
        events.append("app stop")

    app = FastAPI(lifespan=app_lifespan)
    lane = Backlane("memory://", lifespan=resources.lifespan)
    lane.install(app)

    @lane.task(name="slow_sees")
    async def slow_sees(ctx: TaskContext) -> bool:
        await anyio.sleep(0.2)  # still running when shutdown begins
        events.append("job ends")
        return client_of(ctx).open

    @app.post("/run")
    async def run(background_tasks: BackgroundTasks) -> dict[str, str]:
        return {"id": background_tasks.add_task(slow_sees).id}

    with TestClient(app) as client:
        job_id = client.post("/run").json()["id"]
        anyio.run(anyio.sleep, 0.05)  # the job has started
    assert events == ["app start", "enter", "job ends", "exit", "app stop"]

    async def outcome() -> tuple[JobState, Any]:
        await lane.open()
        job = await lane.store.get(job_id)
        assert job is not None
        return job.state, job.result

    assert anyio.run(outcome) == (JobState.SUCCEEDED, "true")


def test_in_eager_mode_tasks_see_the_state_too() -> None:
    resources = Resources()
    app = FastAPI()
    lane = Backlane("memory://", eager=True, lifespan=resources.lifespan)
    lane.install(app)
    seen: list[bool] = []

    @lane.task(name="eager_sees")
    def eager_sees(ctx: TaskContext) -> None:
        seen.append(client_of(ctx).open)

    @app.post("/run")
    async def run(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(eager_sees)

    with TestClient(app) as client:
        client.post("/run")
    assert seen == [True]
    assert resources.events == ["enter", "exit"]


def test_a_lifespan_that_is_not_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="lifespan must be an async context manager"):
        Backlane("memory://", lifespan={"client": 1})  # type: ignore[arg-type]


async def test_a_lifespan_that_yields_no_mapping_is_refused_when_it_runs() -> None:
    @asynccontextmanager
    async def yields_a_list(lane: Backlane) -> AsyncIterator[Any]:
        yield ["client"]

    lane = Backlane("memory://", lifespan=yields_a_list)
    with pytest.raises(ConfigurationError, match="must yield a mapping or None"):
        async with lane.lifespan_context():
            pass


async def test_two_starting_at_once_run_it_once() -> None:
    resources = Resources()
    lane = Backlane("memory://", lifespan=resources.lifespan)
    seen: list[object] = []

    async def use() -> None:
        async with lane.lifespan_context() as state:
            seen.append(state["client"])
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(use)
        tg.start_soon(use)
    assert seen == [resources, resources]
    assert resources.events == ["enter", "exit"]
