"""Schedules with real processes: three schedulers, one job per slot; a delayed job that
survives a restart of every process."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from backlane import Backlane, JobState
from tests.acceptance import schedule_app
from tests.services import store_url

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.acceptance.schedule_app:lane"

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with store_url(request.param, tmp_path) as found:
        yield found


class Procs:
    def __init__(self, url: str, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.log = tmp_path / "runs.log"
        self.log.touch()
        self.env = {**os.environ, "BACKLANE_URL": url, "SCHEDULE_APP_LOG": str(self.log)}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *command: str) -> subprocess.Popen[bytes]:
        with (self.tmp_path / f"proc-{len(self.procs)}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backlane", *command, TARGET],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=20)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp_path.glob("proc-*.log"))


@pytest.fixture
def procs(url: str, tmp_path: Path) -> Iterator[Procs]:
    lab = Procs(url, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def test_three_schedulers_one_job_per_slot(url: str, procs: Procs) -> None:
    lane = Backlane(url)
    anyio.run(lane.open)  # the schema exists before the processes race for it
    worker = procs.start("worker")
    schedulers = [procs.start("scheduler") for _ in range(3)]
    deadline = time.monotonic() + 60  # the 12 s count from when all four are up
    while procs.output().count("scheduler started") < 3 or "backlane.worker: worker" not in (
        procs.output()
    ):
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    time.sleep(11.5)  # about 12 s with the time the schedulers take to stop
    for proc in schedulers:
        procs.stop(proc)
    time.sleep(1.5)  # the worker runs what the last slots produced
    procs.stop(worker)

    async def jobs() -> list[tuple[float, JobState]]:
        found = await lane.store.list_jobs(task=schedule_app.every_second.name, limit=1000)
        await lane.close()
        return [(job.meta["slot"], job.state) for job in found]

    found = anyio.run(jobs)
    slots = [slot for slot, _ in found]
    runs = procs.log.read_text().splitlines()
    print(f"\n{len(found)} jobs for {len(set(slots))} slots, {len(runs)} runs")
    assert len(slots) == len(set(slots)), "two jobs for one slot"
    assert all(float(s).is_integer() for s in slots)
    assert 10 <= len(runs) <= 14, procs.output()  # slots in the 12 s, and stopping
    assert len(runs) == len(set(runs))  # each job ran once
    assert {state for _, state in found} == {JobState.SUCCEEDED}


def test_delayed_job_survives_a_restart_of_every_process(url: str, procs: Procs) -> None:
    lane = Backlane(url)
    due = time.time() + 6

    async def enqueue() -> str:
        async with lane:
            from datetime import datetime, timezone

            at = datetime.fromtimestamp(due, timezone.utc)
            handle = await lane.task(schedule_app.at_time).options(at=at).enqueue("late")
            return handle.id

    job_id = anyio.run(enqueue)
    first = procs.start("worker")
    time.sleep(2)
    procs.stop(first, signal.SIGKILL)  # every process of the service gone
    assert procs.log.read_text() == ""
    procs.start("worker")
    deadline = time.monotonic() + 20
    while "late" not in procs.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    label, ran_at = procs.log.read_text().split()
    print(f"\nran {float(ran_at) - due:+.3f} s from its time")
    assert label == "late"
    assert abs(float(ran_at) - due) <= 1.0

    async def state() -> JobState:
        async with lane:
            return (await (await lane.job(job_id)).info()).state

    deadline = time.monotonic() + 5
    while anyio.run(state) is not JobState.SUCCEEDED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert anyio.run(state) is JobState.SUCCEEDED
