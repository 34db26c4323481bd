"""backlane across processes on Redis: a web process with no embedded worker (uvicorn,
``install(app, workers=0)``) and two ``backlane worker`` processes share one Redis.

* One worker killed with SIGKILL mid-run loses no job, and only the jobs it held run
  twice (the same proof as ``test_worker_processes.py`` gives on SQLite).
* Redis itself killed and restarted (append-only file, ``appendfsync everysec``) in the
  middle of the run: web and workers reconnect and finish; no job is lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from backlane import Backlane, JobState
from tests.acceptance._procs import Uvicorn
from tests.acceptance.conftest import WorkerLab, wait_for
from tests.acceptance.redis_lab import PrivateRedis
from tests.services import require_service, store_url

pytestmark = pytest.mark.slow

WEB_APP = "tests.acceptance.redis_lab:web_app"
JOBS = 2000


class RedisWorkerLab(WorkerLab):
    """``WorkerLab`` on a Redis URL: the same workers, execution log and helpers."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.executions = tmp_path / "executions.log"
        self.executions.touch()
        self.lane = Backlane(url)
        self.workers = []
        self.env = {
            **os.environ,
            "BACKLANE_URL": url,
            "WORKER_APP_LOG": str(self.executions),
            "BACKLANE_SHUTDOWN_GRACE": "3",
        }
        anyio.run(self.lane.open)

    def web(self) -> Uvicorn:
        """The web process (not started): ``redis_lab.web_app`` on this lab's Redis."""
        env = {"BACKLANE_URL": self.url}
        return Uvicorn(WEB_APP, env=env, log=self.tmp_path / "web.log")


@pytest.fixture
def redis_lab(tmp_path: Path) -> Iterator[RedisWorkerLab]:
    with store_url("redis", tmp_path) as url:
        lab = RedisWorkerLab(tmp_path, url)
        try:
            yield lab
        finally:
            lab.close()


def post_jobs(base: str, numbers: range, *, in_flight: int = 8) -> list[str]:
    """POST ``/record/{n}`` for every n, ``in_flight`` at a time; the job ids, in order.
    Every reply must be a 200."""
    ids: dict[int, str] = {}

    async def main() -> None:
        limits = httpx.Limits(max_connections=in_flight)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            todo = iter(numbers)

            async def one_after_another() -> None:
                for n in todo:
                    reply = await client.post(f"/record/{n}")
                    assert reply.status_code == 200, reply.text
                    ids[n] = reply.json()["id"]

            async with anyio.create_task_group() as tg:
                for _ in range(in_flight):
                    tg.start_soon(one_after_another)

    anyio.run(main)
    return [ids[n] for n in numbers]


def in_background(fn: object) -> tuple[threading.Thread, list[object]]:
    """Run ``fn()`` on a thread; its result (or exception) lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except BaseException as exc:  # handed to the test thread
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: list[object], timeout: float) -> object:
    thread.join(timeout)
    assert not thread.is_alive(), "the background requests did not finish"
    (result,) = out
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.mark.timeout(60)
def test_a_worker_killed_with_sigkill_loses_no_job_on_redis(redis_lab: RedisWorkerLab) -> None:
    lab = redis_lab
    started = time.monotonic()
    with lab.web() as web:
        victim = lab.start("--concurrency", "4")
        survivor = lab.start("--concurrency", "4")
        victim_id = victim.started()[victim.pid]
        survivor_id = survivor.started()[survivor.pid]
        thread, out = in_background(lambda: post_jobs(web.url, range(JOBS)))

        def victim_is_busy() -> bool:
            done = lab.jobs(JobState.SUCCEEDED)
            return len(lab.recorded()) >= 300 and sum(j.worker_id == victim_id for j in done) >= 30

        wait_for(victim_is_busy, 30, "300 executions, 30 of them finished by the victim")
        # As on SQLite: SIGSTOP freezes the victim, so the jobs stored `running` under its
        # id from then on are exactly those it holds at its death (a script it had sent is
        # atomic on the server: it is either in the snapshot or not run at all).
        # The web is slower than the workers here, so the victim is often between jobs:
        # freeze it until it is caught holding some (then thaw it and try again soon).
        held, snapshot_took = victim.freeze_holding(
            lambda: {job.id for job in lab.jobs(JobState.RUNNING) if job.worker_id == victim_id},
            tries=100,
            pause=0.03,
        )
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        started_by_victim_while_held = held & set(lab.recorded())
        assert held, "the victim held no job when it died: the test proves nothing"
        assert snapshot_took < 0.5

        ids = joined(thread, out, 30)
        assert isinstance(ids, list) and len(set(ids)) == JOBS
        wait_for(lambda: lab.count(JobState.SUCCEEDED) == JOBS, 30, f"all {JOBS} jobs succeeded")
    jobs = {job.id: job for job in lab.jobs()}
    assert set(jobs) == set(ids)
    assert all(job.state is JobState.SUCCEEDED for job in jobs.values())

    executions = lab.executions_by_job()
    ran_twice = {job_id for job_id, n in executions.items() if n > 1}
    assert set(executions) == set(ids), "a job never ran"
    assert max(executions.values()) <= 2
    assert ran_twice <= started_by_victim_while_held
    # A held job either ran again on the survivor, or the victim's own finish had already
    # been sent when it was frozen and Redis ran it after the snapshot: the victim ended it.
    # The survivor's attempt is the second when the victim had taken the job (its lease
    # ran out), the first when the job was only handed to the victim: given back when its
    # short lease ran out, uncounted (a job the victim started from its hand-off list in the
    # moment before its call taking it was sent, too).
    for job_id, job in jobs.items():
        if job_id in ran_twice or (job_id in held and job_id not in started_by_victim_while_held):
            assert job.worker_id == survivor_id and job.attempts in (1, 2), job
        elif job_id in held:
            assert (job.worker_id, job.attempts) == (victim_id, 1), job
        elif job.attempts != 1:  # claimed by a call the frozen victim had sent, which Redis
            # ran after the snapshot: back when its lease ran out, that attempt counted
            assert (job.worker_id, job.attempts, executions[job_id]) == (survivor_id, 2, 1), job
    print(
        f"\nredis kill test: {JOBS} jobs through the web, {len(lab.recorded())} executions, "
        f"victim held {len(held)} at its death ({len(started_by_victim_while_held)} started), "
        f"{len(ran_twice)} ran twice; victim finished "
        f"{sum(j.worker_id == victim_id for j in jobs.values())}, survivor "
        f"{sum(j.worker_id == survivor_id for j in jobs.values())}; "
        f"{time.monotonic() - started:.1f}s"
    )
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(10) == 0


@pytest.mark.timeout(60)
def test_a_job_handed_to_a_worker_killed_while_waiting_runs_elsewhere_within_seconds(
    redis_lab: RedisWorkerLab,
) -> None:
    from tests.acceptance.worker_app import record

    lab = redis_lab
    # the default lease and sweep: only the hand-off's short lease can bring the job back soon
    lab.env.update({"WORKER_APP_LEASE": "30", "WORKER_APP_SWEEP": "5"})
    victim = lab.start("--concurrency", "4")
    victim_id = victim.started()[victim.pid]
    for _ in range(50):  # freeze the idle victim, then enqueue while its offer is still up
        time.sleep(0.3)
        victim.signal(signal.SIGSTOP)
        (job_id,) = lab.enqueue(record, [{}])
        handed_at = time.monotonic()
        job = lab.job(job_id)
        if job.state is JobState.RUNNING and job.worker_id == victim_id:
            break
        victim.signal(signal.SIGCONT)  # its offer had lapsed: it claims the job; again
        wait_for(lambda: lab.count(JobState.SUCCEEDED) == len(lab.jobs()), 10, "ran")
    else:
        raise AssertionError("no job was handed to the victim")
    victim.signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    survivor = lab.start("--concurrency", "4")
    survivor_id = survivor.started()[survivor.pid]
    wait_for(lambda: lab.job(job_id).state is JobState.SUCCEEDED, 10, "the handed job ran")
    took = time.monotonic() - handed_at
    done = lab.job(job_id)
    assert (done.worker_id, done.attempts) == (survivor_id, 1)  # never started: uncounted
    assert lab.executions_by_job()[job_id] == 1
    assert took < 10  # its lease of 30 s did not have to run out
    print(f"\nhanded to a killed worker: ran on another after {took:.2f}s")
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(10) == 0


@pytest.mark.timeout(60)
def test_redis_restarted_mid_run_web_and_workers_reconnect_and_lose_nothing(
    tmp_path: Path,
) -> None:
    if not PrivateRedis.available():
        require_service("redis-server", "no redis-server binary on PATH")
    started = time.monotonic()
    server = PrivateRedis(tmp_path / "redis").start()
    lab = RedisWorkerLab(tmp_path, f"{server.url}?prefix=restart:")
    try:
        with lab.web() as web:
            first = post_jobs(web.url, range(JOBS * 3 // 5))
            workers = [lab.start("--concurrency", "4") for _ in range(2)]
            worker_ids = {worker.started()[worker.pid] for worker in workers}
            wait_for(lambda: len(lab.recorded()) >= 400, 30, "400 executions")
            # Now jobs are running under leases, and hundreds are queued behind them.

            server.kill()  # a crash: what the server had written to its AOF survives
            down = time.monotonic()
            ran_before = len(lab.recorded())
            # Longer than a call's retries (2 to 4 s): calls fail with StoreError now.
            refused = httpx.post(f"{web.url}/record/-1", timeout=30)
            assert refused.status_code == 500
            time.sleep(max(0.0, 4.0 - (time.monotonic() - down)))
            server.start()
            outage = time.monotonic() - down

            later = post_jobs(web.url, range(JOBS * 3 // 5, JOBS))  # the web reconnects
            ids = first + later
            wait_for(
                lambda: lab.count(JobState.SUCCEEDED) == JOBS, 40, f"all {JOBS} jobs succeeded"
            )
            assert all(worker.proc.poll() is None for worker in workers), "a worker died"
            assert all("StoreError" in worker.output() for worker in workers)
        jobs = {job.id: job for job in lab.jobs()}
        assert set(jobs) == set(ids), "a job was lost"
        assert all(job.state is JobState.SUCCEEDED for job in jobs.values())
        executions = lab.executions_by_job()
        assert set(executions) == set(ids), "a job never ran"
        ran_twice = sum(1 for n in executions.values() if n > 1)
        assert {job.worker_id for job in jobs.values()} <= worker_ids
        print(
            f"\nredis restart test: {JOBS} jobs through the web, Redis down {outage:.2f}s "
            f"after {ran_before} executions (a request meanwhile: {refused.status_code}); "
            f"{len(lab.recorded())} executions, "
            f"{ran_twice} jobs ran twice (leases that lapsed while Redis was away); "
            f"{time.monotonic() - started:.1f}s"
        )
        for worker in workers:
            worker.signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(15) == 0
    finally:
        lab.close()
        server.kill()
