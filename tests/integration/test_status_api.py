"""The status API (``GET {prefix}/jobs/{id}`` and its live events) on every store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backlane import Backlane
from tests.integration import jobs_tasks as t


def ended_job(lane: Backlane) -> str:
    """The id of a job cancelled at once; ``lane`` is closed afterwards."""

    async def go() -> str:
        try:
            handle = await lane.task(t.add).enqueue(2, b=3)
            await handle.cancel()
            return handle.id
        finally:
            await lane.close()

    return anyio.run(go)


@pytest.mark.parametrize("mounted", [False, True], ids=["no-lifespan", "mounted"])
def test_the_status_api_answers_before_the_lane_is_open(lane_url: str, mounted: bool) -> None:
    """An app whose lifespan never ran (a ``TestClient`` used without ``with``, or an app
    mounted in another, whose lifespan Starlette does not run) answered 500 to the status
    API until something else opened the lane: its store was not open."""
    lane = Backlane(lane_url)
    job_id = ended_job(lane)
    app = FastAPI()
    lane.install(app, workers=0)
    outer = app
    if mounted:
        outer = FastAPI()
        outer.mount("/api", app)
    prefix = "/api/backlane" if mounted else "/backlane"
    try:
        client = TestClient(outer, raise_server_exceptions=False)
        reply = client.get(f"{prefix}/jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        assert reply.json()["state"] == "cancelled"
        with client.stream("GET", f"{prefix}/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200
            assert '"state": "cancelled"' in stream.read().decode()
        assert client.get(f"{prefix}/jobs/{'0' * 32}").status_code == 404
    finally:
        anyio.run(lane.close)


DEEP = "[" * 500 + "]" * 500


@pytest.mark.parametrize(
    ("stored", "shown"),
    [("{not json", "{not json"), ("NaN", "NaN"), ("[1e999]", "[1e999]"), (DEEP, None)],
    ids=["not-json", "nan", "out-of-range", "500-deep"],
)
def test_a_result_another_program_stored_is_shown(
    tmp_path: Path, stored: str, shown: object
) -> None:
    """A result that does not read as JSON (``NaN`` neither), or one nested a few hundred
    deep, written by another program: the status API answered 500 (the last one because
    FastAPI's own serialization refuses that depth)."""
    lane = Backlane(f"sqlite:///{tmp_path}/jobs.db")
    job_id = ended_job(lane)
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("UPDATE jobs SET result = ? WHERE id = ?", (stored, job_id))
    app = FastAPI()
    lane.install(app, workers=0)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            reply = client.get(f"/backlane/jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        result = reply.json()["result"]
        if shown is None:  # the JSON value itself
            depth = 0
            while isinstance(result, list) and result:
                result, depth = result[0], depth + 1
            assert depth == 499 and result == []
        else:
            assert result == shown
    finally:
        anyio.run(lane.close)
