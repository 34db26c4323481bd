"""The PostgreSQL store with real processes, deployed as in production (issue 4):
``backlane migrate`` first, then a web process (uvicorn, ``install(app, workers=0)``) and
two ``backlane worker`` processes that open the store with ``auto_migrate=0``.

2,000 jobs go in through the web app's drop-in while the workers run them; one worker is
killed with SIGKILL mid-run. Nothing is lost, and the only jobs that run twice are the ones
the dead worker held and had started.

The served app is built by this module only in the uvicorn process (``BACKLANE_PG_WEB=1``):
the test process never builds it.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from backlane import Backlane, Job, JobState
from tests.acceptance._procs import Uvicorn
from tests.acceptance.conftest import _STARTED, REPO_ROOT, WorkerProcess, alive, wait_for
from tests.services import store_url

pytestmark = pytest.mark.slow

WEB_ENV = "BACKLANE_PG_WEB"
WORKER_TARGET = "tests.acceptance.worker_app:lane"
JOBS = 2_000
PAUSE = 0.02
"""Seconds each job takes (``worker_app.record``)."""


def _build_web_app() -> Any:
    """The web process: the drop-in on ``BACKLANE_URL``, no embedded worker."""
    from fastapi import FastAPI

    from backlane.fastapi import BackgroundTasks
    from tests.acceptance import worker_app

    lane = Backlane()
    app = FastAPI()
    lane.install(app, workers=0)

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/jobs")
    async def add(background_tasks: BackgroundTasks) -> dict[str, str]:
        job = background_tasks.add_task(worker_app.record, pause=PAUSE)
        return {"id": job.id}

    return app


if os.environ.get(WEB_ENV) == "1":
    web_app = _build_web_app()


class PostgresLab:
    """A schema of its own on the test server, migrated by ``backlane migrate``; the web
    process, the workers, and the execution log their tasks write."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        self.url = f"{url}&auto_migrate=0"
        self.executions = tmp_path / "executions.log"
        self.executions.touch()
        self.env = {
            **os.environ,
            "BACKLANE_URL": self.url,
            "WORKER_APP_LOG": str(self.executions),
            "BACKLANE_SHUTDOWN_GRACE": "3",
        }
        self.workers: list[WorkerProcess] = []
        self.lane = Backlane(self.url)

    def migrate(self) -> str:
        """``backlane migrate`` as its own process; its output."""
        done = subprocess.run(
            [sys.executable, "-m", "backlane", "migrate", "--url", self.url],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        anyio.run(self.lane.open)  # auto_migrate=0: only checks the version
        return done.stdout

    def start_worker(self, *args: str) -> WorkerProcess:
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backlane", "worker", WORKER_TARGET, *args],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(proc, log)
        self.workers.append(worker)
        return worker

    def web(self) -> Uvicorn:
        env = {"BACKLANE_URL": self.url, WEB_ENV: "1", "BACKLANE_RELEASE_GRACE": "5"}
        return Uvicorn(
            "tests.acceptance.test_postgres_processes:web_app",
            env=env,
            log=self.tmp_path / "uvicorn.log",
        )

    def jobs(self, state: JobState | None = None) -> list[Job]:
        return anyio.run(lambda: self.lane.store.list_jobs(state=state, limit=100_000))

    def count(self, state: JobState) -> int:
        counts = anyio.run(self.lane.store.counts)
        return sum(by_state.get(state, 0) for by_state in counts.values())

    def recorded(self) -> list[str]:
        return self.executions.read_text().splitlines()

    def close(self) -> None:
        for worker in self.workers:
            for pid in [worker.pid, *(int(pid) for _, pid in _STARTED.findall(worker.output()))]:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if worker.proc.poll() is None:
                worker.proc.wait(timeout=10)
        anyio.run(self.lane.close)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[PostgresLab]:
    with store_url("postgres", tmp_path) as url:
        lab = PostgresLab(tmp_path, url)
        try:
            yield lab
        finally:
            lab.close()


class Poster(threading.Thread):
    """POSTs ``count`` requests to ``/jobs``, ``concurrency`` at a time; keeps the ids."""

    def __init__(self, url: str, count: int, concurrency: int = 16) -> None:
        super().__init__(daemon=True)
        self.url, self.count, self.concurrency = url, count, concurrency
        self.ids: list[str] = []
        self.statuses: Counter[int] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._post_all())
        except BaseException as exc:  # reported by the test
            self.error = exc

    async def _post_all(self) -> None:
        left = iter(range(self.count))
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as client:

            async def post_some() -> None:
                for _ in left:
                    reply = await client.post("/jobs")
                    self.statuses[reply.status_code] += 1
                    if reply.status_code == 200:
                        self.ids.append(reply.json()["id"])

            await asyncio.gather(*(post_some() for _ in range(self.concurrency)))


@pytest.mark.timeout(60)
def test_web_and_two_workers_on_postgres_lose_nothing_when_one_is_killed(
    lab: PostgresLab,
) -> None:
    began = time.monotonic()
    assert "migrated from version 0 to" in lab.migrate()
    with lab.web() as server:
        poster = Poster(server.url, JOBS)
        poster.start()
        # Requests come in over HTTP more slowly than two workers run the jobs: let a
        # backlog build first, so that both workers are busy when one of them dies.
        wait_for(lambda: lab.count(JobState.QUEUED) >= 500, 30, "a backlog of 500 jobs")
        victim = lab.start_worker("--concurrency", "4")
        survivor = lab.start_worker("--concurrency", "4")
        victim_id = victim.started()[victim.pid]
        survivor_id = survivor.started()[survivor.pid]

        def victim_is_busy() -> bool:
            done = lab.jobs(JobState.SUCCEEDED)
            return len(lab.recorded()) >= 300 and sum(j.worker_id == victim_id for j in done) >= 20

        wait_for(victim_is_busy, 30, "300 executions, 20 of them finished by the victim")
        # As in test_worker_processes: SIGSTOP freezes the victim, so the jobs stored
        # `running` under its id now are exactly those it holds at its death (a statement
        # it had sent commits or not on its own; a transaction it had open is rolled back
        # when SIGKILL closes its connections). The survivor could take one of them earlier
        # only if the victim had missed heartbeats for a whole lease (2 s); the snapshot is
        # taken within milliseconds.
        # A stop landing between two batches finds it holding nothing: thaw, freeze again.
        held, snapshot_took = victim.freeze_holding(
            lambda: {job.id for job in lab.jobs(JobState.RUNNING) if job.worker_id == victim_id}
        )
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        started_by_victim_while_held = held & set(lab.recorded())
        assert held, "the victim held no job at any of 50 freezes: the test proves nothing"
        assert snapshot_took < 0.5

        poster.join(timeout=40)
        assert poster.error is None, poster.error
        assert poster.statuses == {200: JOBS}
        ids = set(poster.ids)
        assert len(ids) == JOBS
        wait_for(
            lambda: lab.count(JobState.SUCCEEDED) == JOBS,
            40 - (time.monotonic() - began),
            f"all {JOBS} jobs succeeded after the kill",
        )

    jobs = {job.id: job for job in lab.jobs()}
    assert set(jobs) == ids
    assert all(job.state is JobState.SUCCEEDED for job in jobs.values())
    executions = Counter(lab.recorded())
    ran_twice = {job_id for job_id, n in executions.items() if n > 1}
    assert set(executions) == ids, "a job never ran"
    assert max(executions.values()) <= 2
    assert ran_twice <= held
    # A held job the victim had started either ran again on the survivor, or the victim's
    # own finish was already on its way to the server when it was frozen and committed
    # after the snapshot: then the victim is recorded as the one that ended it, once.
    for job_id in started_by_victim_while_held - ran_twice:
        assert jobs[job_id].worker_id == victim_id and jobs[job_id].attempts == 1, jobs[job_id]
    assert ran_twice <= started_by_victim_while_held
    for job_id, job in jobs.items():
        if job_id in held:  # taken again after the lease expired: the attempt counted
            assert (job.worker_id, job.attempts) == (survivor_id, 2)
        else:
            assert job.attempts == 1
    finished_by = Counter(job.worker_id for job in jobs.values())
    print(
        f"\npostgres kill test: {JOBS} jobs through the web app, {len(lab.recorded())} "
        f"executions, victim held {len(held)} at its death "
        f"({len(started_by_victim_while_held)} started), {len(ran_twice)} ran twice; "
        f"finished by victim {finished_by[victim_id]}, survivor {finished_by[survivor_id]}; "
        f"{time.monotonic() - began:.1f}s in all"
    )
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(10) == 0


async def post_at_once(url: str, count: int) -> list[tuple[int, str]]:
    """``count`` POSTs to ``/jobs``, all in flight together, each on its own connection
    opened beforehand; (status, job id) of each."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30.0))
            for _ in range(count)
        ]
        await asyncio.gather(*(client.get("/ping") for client in clients))
        replies = await asyncio.gather(*(client.post("/jobs") for client in clients))
    return [
        (r.status_code, r.json().get("id", "") if r.status_code == 200 else "") for r in replies
    ]


@pytest.mark.timeout(60)
def test_a_hundred_concurrent_requests_each_run_their_task_once(lab: PostgresLab) -> None:
    lab.migrate()
    worker = lab.start_worker("--concurrency", "20")
    worker.started()
    with lab.web() as server:
        replies = asyncio.run(post_at_once(server.url, 100))
        assert [status for status, _ in replies] == [200] * 100
        ids = {job_id for _, job_id in replies}
        wait_for(lambda: lab.count(JobState.SUCCEEDED) == 100, 30, "the 100 jobs succeeded")
        time.sleep(0.3)  # a second run of any job would show by now
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            states = [client.get(f"/backlane/jobs/{job_id}").json() for job_id in ids]
    assert Counter(lab.recorded()) == Counter(dict.fromkeys(ids, 1))  # each exactly once
    assert [(s["state"], s["attempts"]) for s in states] == [("succeeded", 1)] * 100
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
