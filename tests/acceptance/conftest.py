"""Real ``backlane worker`` processes on one SQLite file, and ways to watch them.

``lab`` starts workers as ``python -m backlane worker tests.acceptance.worker_app:lane``
from the repository root, each in its own process group with its output in a file, and
kills whatever is left of them (supervised children included) when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from backlane import Backlane, Job, JobState
from backlane.tasks import EnqueueOptions, Task

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.acceptance.worker_app:lane"
_STARTED = re.compile(r"backlane\.cli: worker (\S+) \(pid (\d+)\)")


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (an unreaped zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


class WorkerProcess:
    """One ``backlane worker`` command, its output in ``log``."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def started(self, count: int = 1, timeout: float = 30.0) -> dict[int, str]:
        """Wait until ``count`` workers logged their start; returns worker id by pid."""

        def found() -> dict[int, str]:
            return {int(pid): wid for wid, pid in _STARTED.findall(self.output())}

        wait_for(
            lambda: len(found()) >= count or self.proc.poll() is not None,
            timeout,
            f"{count} workers started; output:\n{self.output()}",
        )
        assert len(found()) >= count, f"worker exited early:\n{self.output()}"
        return found()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def freeze_holding(
        self, holding: Callable[[], set[str]], *, tries: int = 50, pause: float = 0.01
    ) -> tuple[set[str], float]:
        """Freeze the worker (SIGSTOP) where ``holding()`` finds it holding jobs: a stop that
        lands between two batches thaws it for ``pause`` seconds and freezes it again. Returns
        the jobs held (empty after ``tries`` freezes that found none) and how long the last
        snapshot took after its stop. The worker stays frozen."""
        held: set[str] = set()
        took = 0.0
        for _ in range(tries):
            self.signal(signal.SIGSTOP)
            stopped = time.monotonic()
            held = holding()
            took = time.monotonic() - stopped
            if held:
                break
            self.signal(signal.SIGCONT)
            time.sleep(pause)
        return held, took

    def wait(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds (AssertionError after)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker pid {self.pid} still running after {timeout}s:\n{self.output()}"
            ) from None


class WorkerLab:
    """A SQLite store in ``tmp_path``, the execution log the tasks write, and workers."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.url = f"sqlite:///{tmp_path}/jobs.db"
        self.executions = tmp_path / "executions.log"
        self.executions.touch()
        self.lane = Backlane(self.url)
        self.workers: list[WorkerProcess] = []
        self.env = {
            **os.environ,
            "BACKLANE_URL": self.url,
            "WORKER_APP_LOG": str(self.executions),
            "BACKLANE_SHUTDOWN_GRACE": "3",
        }
        anyio.run(self.lane.open)  # the schema exists before any worker starts

    def start(self, *args: str, grace: float | None = None) -> WorkerProcess:
        """``python -m backlane worker tests.acceptance.worker_app:lane *args``."""
        env = dict(self.env)
        if grace is not None:
            env["BACKLANE_SHUTDOWN_GRACE"] = str(grace)
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backlane", "worker", TARGET, *args],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(proc, log)
        self.workers.append(worker)
        return worker

    def enqueue(
        self, task: Task[Any, Any], calls: Sequence[dict[str, Any]], *, queue: str | None = None
    ) -> list[str]:
        """Store one job per keyword-argument dict, in one step; their ids in order."""
        options = EnqueueOptions(queue=queue)
        jobs = [task.build_job((), dict(kwargs), options) for kwargs in calls]
        stored = anyio.run(self.lane.enqueue_jobs, jobs)
        return [job.id for job in stored]

    def jobs(self, state: JobState | None = None) -> list[Job]:
        return anyio.run(lambda: self.lane.store.list_jobs(state=state, limit=100_000))

    def job(self, job_id: str) -> Job:
        found = anyio.run(self.lane.store.get, job_id)
        assert found is not None, f"job {job_id} is gone"
        return found

    def count(self, state: JobState) -> int:
        counts = anyio.run(self.lane.store.counts)
        return sum(by_state.get(state, 0) for by_state in counts.values())

    def recorded(self) -> list[str]:
        """Job ids, one per execution started so far, in the order they started."""
        return self.executions.read_text().splitlines()

    def executions_by_job(self) -> Counter[str]:
        return Counter(self.recorded())

    def close(self) -> None:
        for worker in self.workers:
            pids = [worker.pid, *(int(pid) for _, pid in _STARTED.findall(worker.output()))]
            for pid in pids:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if worker.proc.poll() is None:
                worker.proc.wait(timeout=10)
        anyio.run(self.lane.close)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[WorkerLab]:
    lab = WorkerLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
