"""The live job events (``GET {prefix}/jobs/{id}/events``, server-sent events): the
stream follows a job's state and progress until it ends, says when it is removed, and
ends on time for a job that waits."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backlane import Backlane, Job, JobState, TaskContext
from backlane.fastapi import install, status_router

NOW = time.time()


def job_in(state: JobState) -> Job:
    return Job(task="m:t", payload="{}", state=state, created_at=NOW, run_at=NOW)


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event type, data) of each event of a text/event-stream body."""
    found = []
    for block in text.split("\n\n"):
        kind, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if data is not None:
            found.append((kind, data))
    return found


async def steps(ctx: TaskContext) -> str:
    for fraction in (0.25, 0.5, 0.75):
        await ctx.progress(fraction, f"at {fraction}")
        await anyio.sleep(0.05)
    return "done"


def later(seconds: float, action: Any) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def test_events_follow_a_job_until_it_ends() -> None:
    lane = Backlane("memory://", poll_max=0.05)
    app = FastAPI()
    install(lane, app, workers=1)
    with TestClient(app) as client:

        async def enqueue_paused() -> str:
            await lane.store.pause_queue("default", True)
            return (await lane.task_for(steps).enqueue()).id

        job_id = client.portal.call(enqueue_paused)  # type: ignore[union-attr]
        later(0.3, lambda: client.portal.call(lane.store.pause_queue, "default", False))  # type: ignore[union-attr]
        reply = client.get(f"/backlane/jobs/{job_id}/events")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    seen = events(reply.text)
    states = [data["state"] for _, data in seen]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    progress = [data["progress"] for _, data in seen if data["progress"] is not None]
    assert progress == sorted(progress) and 0.5 in progress
    assert seen[-1][1]["result"] == "done"
    assert "retry: 1000" in reply.text


def test_events_end_with_gone_when_the_job_is_removed() -> None:
    lane = Backlane("memory://")
    app = FastAPI()
    install(lane, app, workers=0)
    with TestClient(app) as client:
        (job,) = client.portal.call(lane.store.enqueue, [job_in(JobState.QUEUED)])  # type: ignore[union-attr]
        later(0.2, lambda: client.portal.call(lane.store.delete, [job.id]))  # type: ignore[union-attr]
        reply = client.get(f"/backlane/jobs/{job.id}/events")
        assert [kind for kind, _ in events(reply.text)] == ["message", "gone"]
        assert client.get("/backlane/jobs/0123456789abcdef/events").status_code == 404
        assert client.get("/backlane/jobs/not%20an%20id/events").status_code == 404


def test_a_stream_ends_after_its_time_for_a_job_that_waits() -> None:
    lane = Backlane("memory://")
    app = FastAPI()
    app.include_router(status_router(lane, stream_seconds=0.3))
    with TestClient(app) as client:
        (job,) = client.portal.call(lane.store.enqueue, [job_in(JobState.QUEUED)])  # type: ignore[union-attr]
        started = time.monotonic()
        reply = client.get(f"/jobs/{job.id}/events")
        assert 0.3 <= time.monotonic() - started < 3
        assert [data["state"] for _, data in events(reply.text)] == ["queued"]
