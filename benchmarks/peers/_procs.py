"""Worker processes of one peer: start, pause, resume, stop, and their memory (Linux /proc).

Each command runs in a session of its own, so one signal to its process group reaches the
processes it forks (Celery's pool, Dramatiq's and Huey's worker processes, backlane's
supervised workers). ``pause`` is how a drain starts from a full queue with warm workers:
SIGSTOP the workers, enqueue, SIGCONT.

A ``Reaper`` outlives the benchmark by a moment: it kills every group still running when the
benchmark ends, however it ends (an exception, Ctrl-C, SIGTERM, even SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

_REAPER = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    pgid = int(line[1:])
    if line[0] == "+":
        groups.add(pgid)
    else:
        groups.discard(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Reaper:
    """A watchdog process, in a session of its own, told of each worker process group as it
    starts and stops: when this process ends and the pipe to it closes, it kills every group
    still running. Without it, workers (each in its own session, out of reach of Ctrl-C)
    would outlive a benchmark that was interrupted or killed."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def _tell(self, line: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def watch(self, pgid: int) -> None:
        self._tell(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._tell(f"-{pgid}")

    def close(self) -> None:
        """Kill whatever is still registered, and wait for the reaper to finish."""
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def _stats() -> list[tuple[int, str, int, int]]:
    """Every process's pid, state, parent pid and process group (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        found.append((int(entry), state, int(ppid), int(pgrp)))
    return found


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid, _, ppid, _ in _stats():
        tree.setdefault(ppid, []).append(pid)
    return tree


def groups_alive(pgids: list[int]) -> bool:
    """Whether any process of these process groups still lives (zombies do not count)."""
    wanted = set(pgids)
    return any(pgrp in wanted and state != "Z" for _, state, _, pgrp in _stats())


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process under them."""
    tree = _children()
    found: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process and its reaped children (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class Workers:
    """Worker processes started from ``commands``; their output goes to ``log``."""

    def __init__(
        self,
        commands: list[list[str]],
        *,
        cwd: Path,
        env: dict[str, str],
        log: Path,
        reaper: Reaper | None = None,
        settle: bool = True,
    ) -> None:
        self.log = log
        self.reaper = reaper
        self.settle = settle
        """Whether leaving the ``with`` block waits for the workers to go idle before killing
        them (see ``stop``)."""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopped = False
        with log.open("ab") as out:
            for command in commands:
                proc = subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self.procs.append(proc)
                if reaper is not None:
                    reaper.watch(proc.pid)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On an error or Ctrl-C nothing more is measured: kill at once.
        if not self.stopped:
            self.stop(settle=self.settle and exc_type is None)

    def check(self) -> None:
        """Raise if a worker process has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"a worker exited with code {proc.returncode}:\n{tail}")

    def pids(self) -> list[int]:
        return descendants([proc.pid for proc in self.procs])

    def rss(self) -> tuple[int, int]:
        """Total resident memory of every worker process, and how many processes."""
        pids = self.pids()
        return sum(rss_bytes(pid) for pid in pids), len(pids)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by every worker process, and by the children
        they have reaped (RQ's per-job forks)."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def wait_idle(self, timeout: float = 20.0, window: float = 0.3) -> None:
        """Wait until every worker process has finished starting: until their CPU use over
        ``window`` seconds falls under a tenth of a core (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        used = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(window)
            self.check()
            now = self.cpu_seconds()
            if now - used < 0.1 * window:
                return
            used = now

    def _signal(self, sig: signal.Signals) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def pause(self, sqlite_file: str | None = None) -> None:
        """Stop every worker process; with ``sqlite_file``, make sure none is stopped while
        holding its write lock (resume briefly and try again until it is free)."""
        for _ in range(200):
            self._signal(signal.SIGSTOP)
            if sqlite_file is None or not Path(sqlite_file).exists() or _writable(sqlite_file):
                return
            self._signal(signal.SIGCONT)
            time.sleep(0.01)
        raise RuntimeError(f"a paused worker kept holding {sqlite_file}")

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, settle: bool = True) -> None:
        """Kill every process of their groups, and return once all are gone: only called
        when every job has run, so nothing is lost, and no peer's graceful shutdown adds to
        the run's time. With ``settle``, first wait until they are idle, so that each has
        recorded (acknowledged) what it ran, or a peer would run it again beside the next
        set of workers on the same queues; without, when the store is emptied before
        anything else uses it. (A killed worker blocked in a pop must also be seen gone by
        Redis before new jobs arrive: ``compare.py`` waits for that.)"""
        self.stopped = True
        self.resume()
        if settle:
            with contextlib.suppress(RuntimeError):
                self.wait_idle(timeout=5.0)
        self._signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        pgids = [proc.pid for proc in self.procs]
        deadline = time.monotonic() + 5.0
        while groups_alive(pgids) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.reaper is not None:
            for pgid in pgids:
                self.reaper.forget(pgid)


def _writable(path: str) -> bool:
    conn = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
