"""backlane beside FastAPI's BackgroundTasks and every peer, on this machine, in one run.

    python benchmarks/compare.py [--quick] [--only NAME,...]

Installs the peers at the versions pinned in ``requirements-peers.txt`` into their own
virtual environments (``benchmarks/.venv-peers/``; backlane runs from its own, ``.venv``),
then measures, side by side:

* the guide's exercise: 100 concurrent POSTs to a uvicorn app, each adding one task (an
  async 100 ms sleep; a ~20 ms CPU task): reply latency p50/p99, and the time from the first
  request until every task has finished;
* no-op throughput: N jobs enqueued while the workers are paused (SIGSTOP), then drained by
  1 and by 2 worker processes, timed from the first job finished to the last;
* enqueue rate from one client, one call per job and, where the peer has one, batched;
* enqueue-to-start latency p50/p99 at a fixed arrival rate (2 worker processes);
* worker memory (RSS of every process of the 1-process set-up) idle, and after 100,000 jobs
  (or as many as its drain rate allows within the soak's time cap).

Each figure is the median of ``--runs`` runs. The Markdown report goes between markers in
``docs/benchmarks.md`` and the chart to ``docs/images/benchmarks.png`` (a run of every
system; ``--quick`` and ``--only`` print the report and write the docs only with
``--write``). ``--quick`` measures every figure but the soak and the embedded exercise once,
with small drains: 1.5 to 2.2 minutes here, by the load.

A run owns one Redis database (``--redis-url``, else the first free one of 12-15, 11-1; a
``bench:owner`` key marks it) and one PostgreSQL database (``--pg-db``, else
``backlane_bench_<pid>``): it empties them before and after, and refuses one that holds
anything but a finished run's. Every process it starts is killed when it ends, however it
ends (a watchdog process kills what is left even if it is killed itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from peers import SYSTEMS, WEB_APPS, _common, _report
from peers._exercise import calibrate_cpu, exercise
from peers._log import fmt, note, phases_text
from peers._procs import Reaper, Workers
from peers._stats import drain_rate, median, percentile, sized

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venv-peers"
REQUIREMENTS = HERE / "requirements-peers.txt"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "images" / "benchmarks.png"
MAIN_PYTHON = VENVS / "main" / "bin" / "python"


# -- environments ---------------------------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """The requirement lines of each ``# [name]`` section of requirements-peers.txt."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# [") and line.endswith("]"):
            current = found.setdefault(line[3:-1], [])
        elif line and not line.startswith("#") and current is not None:
            current.append(line)
    return found


def ensure_venvs() -> None:
    """Create (or bring up to date) one virtual environment per section."""
    VENVS.mkdir(exist_ok=True)
    (VENVS / ".gitignore").write_text("*\n")
    for name, lines in sections(REQUIREMENTS.read_text()).items():
        venv = VENVS / name
        stamp = venv / "requirements.txt"
        wanted = "\n".join(lines) + "\n"
        if (venv / "bin" / "python").exists() and stamp.exists() and stamp.read_text() == wanted:
            continue
        note(f"installing the {name} peers into {venv.relative_to(ROOT)} (once)")
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
            req.write(wanted)
            req.flush()
            subprocess.run([*pip, "-r", req.name], check=True)
        stamp.write_text(wanted)


def backlane_python(given: str | None) -> str:
    """The interpreter of backlane's own environment."""
    candidates = [given, os.environ.get("BENCH_BACKLANE_PYTHON"), str(ROOT / ".venv/bin/python")]
    candidates.append(sys.executable)
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import backlane"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    sys.exit("cannot find a Python with backlane installed: pass --backlane-python")


# -- plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    runs: int
    drain_s: float
    """Each drain is sized to keep the workers busy about this long."""
    min_jobs: int
    max_jobs: int
    single_s: float
    """Each fill enqueues one call per job for this long, then batches the rest."""
    batch: int
    rate: float
    latency_s: float
    soak_jobs: int
    soak_s: float
    exercise_runs: int
    settle_s: float
    """Idle time before the idle worker's memory is read."""
    warm_up: int
    """Jobs queued while a set of workers starts: they show it is ready, and how fast it goes."""


FULL = Plan(3, 1.5, 100, 30_000, 0.5, 1000, 200.0, 3.0, 100_000, 14.0, 3, 1.0, 100)
QUICK = Plan(1, 0.4, 20, 8000, 0.25, 1000, 200.0, 0.5, 0, 0.0, 1, 0.0, 30)
"""One run of each figure, drains of about 0.4 s (at least 20 jobs), no soak, and the idle
memory read as soon as the workers are idle (``wait_idle`` saw 0.3 s without work)."""


# -- one peer -------------------------------------------------------------------------------


class Driver:
    """A peer's client process (``peers/_driver.py``) in the peer's environment."""

    def __init__(
        self, python: str, module: str, env: dict[str, str], log: Path, reaper: Reaper
    ) -> None:
        self.log = log.open("ab")
        self.reaper = reaper
        # A session of its own, as the workers': Ctrl-C reaches only compare.py, which
        # stops everything it started in order.
        self.proc = subprocess.Popen(
            [python, "-m", "peers._driver", module],
            cwd=HERE,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        reaper.watch(self.proc.pid)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {op} client exited (see {self.log.name})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{op}: {answer['error']}")
        return answer

    def hang_up(self) -> None:
        """Tell the client to exit (it closes its connections first); ``reap`` waits."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def reap(self, timeout: float = 15.0) -> None:
        """Wait for the client to exit (killing it after ``timeout`` seconds)."""
        self.hang_up()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reaper.forget(self.proc.pid)
        self.log.close()


@dataclass
class Figures:
    """One system's measurements, each a list over runs."""

    name: str
    info: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, list[float]] = field(default_factory=lambda: {"1": [], "2": []})
    drain_jobs: dict[str, int] = field(default_factory=dict)
    drained: dict[str, int] = field(default_factory=lambda: {"1": 0, "2": 0})
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {"1": [], "2": []})
    """CPU time of every worker process per job drained (user + system, microseconds)."""
    enqueue: list[float] = field(default_factory=list)
    enqueue_batch: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rss_idle: tuple[int, int] | None = None
    rss_after: tuple[int, int] | None = None
    soaked: int = 0
    latency_rate: float = 0.0
    load: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds of each step of its turn (start-ups, drains, stops...)."""
    error: str | None = None


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``phases[name]``."""
    start = time.monotonic()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.monotonic() - start


class Bench:
    """Runs the measurements; owns the Redis database and PostgreSQL database used."""

    def __init__(self, args: argparse.Namespace, plan: Plan, reaper: Reaper) -> None:
        import redis

        self.args = args
        self.plan = plan
        self.reaper = reaper
        self.redis = redis.Redis.from_url(args.redis_url, decode_responses=True)
        self.redis_db = int(self.redis.connection_pool.connection_kwargs.get("db", 0))
        self.hung_up: list[Driver] = []
        """Clients told to exit at the end of their system's turn, reaped at the next."""
        self.scratch = Path(tempfile.mkdtemp(prefix="backlane-compare-"))
        self.logs = self.scratch / "logs"
        self.logs.mkdir()
        self.pythons = {
            "backlane": args.backlane_python,
            **{name: str(VENVS / name / "bin" / "python") for name in sections(
                REQUIREMENTS.read_text())},
        }  # fmt: skip
        pg_url = args.pg_admin_url.rsplit("/", 1)[0] + "/" + args.pg_db
        self.env = {
            **os.environ,
            "PYTHONPATH": str(HERE),
            "BENCH_REDIS_URL": args.redis_url,
            "BENCH_KEY": "bench:m",
            "BENCH_PG_URL": pg_url,
            "BENCH_DIR": str(self.scratch),
            "BENCH_CPU_LOOPS": str(args.cpu_loops),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.keys = _common
        self.versions = {
            "python": platform.python_version(),
            "redis": self.redis.info("server")["redis_version"],
            "postgres": self._pg("SHOW server_version")[0],
        }

    def baselines(self) -> dict[str, float]:
        """What one round trip costs here: a Redis PING, and a one-row PostgreSQL commit
        (medians, milliseconds), to read the figures against."""
        import psycopg

        pings = []
        for _ in range(200):
            start = time.perf_counter()
            self.redis.ping()
            pings.append(time.perf_counter() - start)
        commits = []
        self.reset_stores()
        with psycopg.connect(self.env["BENCH_PG_URL"], autocommit=True) as conn:
            conn.execute("CREATE TABLE probe (n int)")
            for n in range(100):
                start = time.perf_counter()
                conn.execute("INSERT INTO probe VALUES (%s)", (n,))
                commits.append(time.perf_counter() - start)
        return {
            "redis_ping_ms": percentile(pings, 0.5) * 1000,
            "pg_commit_ms": percentile(commits, 0.5) * 1000,
        }

    def _pg(self, query: str) -> Any:
        import psycopg

        with psycopg.connect(self.args.pg_admin_url, autocommit=True) as conn:
            return conn.execute(query).fetchone()

    # -- the stores the benchmark owns --

    def reset_stores(self, postgres: bool = True) -> None:
        """Empty the Redis database (keeping this run's claim on it) and the SQLite folder,
        and (if ``postgres``) make the PostgreSQL database anew."""
        self.wait_pops_gone()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.flushdb()
            pipe.set(OWNER_KEY, owner_tag())
            pipe.execute()
        import psycopg

        if postgres:
            with psycopg.connect(self.args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.args.pg_db}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{self.args.pg_db}"')
                conn.execute(f"COMMENT ON DATABASE \"{self.args.pg_db}\" IS '{owner_tag()}'")
        for path in self.scratch.iterdir():
            if path.is_file():
                path.unlink()

    def drop_stores(self) -> None:
        self.redis.flushdb()
        import psycopg

        with psycopg.connect(self.args.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.args.pg_db}" WITH (FORCE)')
        shutil.rmtree(self.scratch, ignore_errors=True)

    def wait_pops_gone(self, timeout: float = 5.0) -> None:
        """Wait until no client of the Redis database is blocked in a pop (BRPOP,
        XREADGROUP...): called once the workers are dead, it returns when Redis has seen
        them go, so it hands no new job to a dead client."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            blocked = [
                c
                for c in self.redis.client_list()
                if int(c.get("db", -1)) == self.redis_db and "b" in c.get("flags", "")
            ]
            if not blocked:
                return
            time.sleep(0.005)

    # -- waiting on the tallies the tasks keep --

    def wait_count(self, count: int, timeout: float, workers: Any = None) -> None:
        deadline = time.monotonic() + timeout
        while int(self.redis.get(self.keys.COUNT) or 0) < count:
            if time.monotonic() > deadline:
                done = self.redis.get(self.keys.COUNT)
                raise RuntimeError(f"only {done} of {count} jobs done after {timeout:.0f}s")
            if workers is not None:
                workers.check()
            time.sleep(0.01)

    def wait_list(self, key: str, count: int, timeout: float, workers: Any = None) -> list[float]:
        deadline = time.monotonic() + timeout
        while self.redis.llen(key) < count:
            if time.monotonic() > deadline:
                done = self.redis.llen(key)
                raise RuntimeError(f"only {done} of {count} jobs reported after {timeout:.0f}s")
            if workers is not None:
                workers.check()
            time.sleep(0.01)
        return [float(v) for v in self.redis.lrange(key, 0, -1)]

    def clear(self) -> None:
        k = self.keys
        self.redis.delete(k.COUNT, k.MARKS, k.LAT, k.DONE)

    # -- measurements --

    def drain(
        self,
        driver: Driver,
        workers: Any,
        jobs: int,
        sqlite_file: str | None,
        single_s: float,
        pause: bool = True,
    ) -> tuple[float, dict[str, Any]]:
        """Enqueue ``jobs`` no-ops while the workers are paused (if ``pause``), resume,
        time the drain."""
        self.clear()
        if pause:
            workers.pause(sqlite_file)
        try:
            filled = driver.call(
                "fill", total=jobs, count=jobs, single_s=single_s, batch=self.plan.batch
            )
        finally:
            workers.resume()
        self.wait_count(jobs, timeout=max(60.0, jobs / 50), workers=workers)
        deadline = time.monotonic() + 10
        while True:
            marks = sorted(
                (int(n), float(t))
                for n, t in (m.split() for m in self.redis.lrange(self.keys.MARKS, 0, -1))
            )
            last = next((m for m in marks if m[0] >= jobs), None)
            if last is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if last is None or marks[0][0] > 2:
            raise RuntimeError(f"drain of {jobs}: no first or last finish among {marks}")
        first = marks[0]
        return drain_rate(last[0] - first[0] + 1, first[1], last[1]), filled

    def latency(self, driver: Driver, workers: Any, rate: float) -> tuple[float, float]:
        self.clear()
        sent = driver.call("paced", rate=rate, seconds=self.plan.latency_s)
        waits = self.wait_list(self.keys.LAT, sent["count"], timeout=60, workers=workers)
        return percentile(waits, 0.5) * 1000, percentile(waits, 0.99) * 1000

    def drains(
        self,
        fig: Figures,
        key: str,
        driver: Driver,
        workers: Any,
        guess: float,
        info: dict[str, Any],
        single_s: float,
    ) -> None:
        """``runs`` timed drains, each sized to last about ``drain_s``: a drain that ends in
        less than half that is not counted, and one that is far off resizes the next."""
        plan = self.plan
        jobs = sized(guess, plan.drain_s, plan.min_jobs, plan.max_jobs)
        resized = 0
        while len(fig.drain[key]) < plan.runs:
            cpu = workers.cpu_seconds()
            rate, filled = self.drain(driver, workers, jobs, info["sqlite_file"], single_s)
            cpu = workers.cpu_seconds() - cpu
            self.record_fill(fig, filled)
            took = jobs / rate
            if took < plan.drain_s / 2 and jobs < plan.max_jobs and resized < 3:
                resized += 1
                jobs = sized(rate, plan.drain_s, plan.min_jobs, plan.max_jobs)
                continue
            fig.drain[key].append(rate)
            fig.cpu_us[key].append(cpu / jobs * 1e6)
            fig.drained[key] += jobs
            if took > 2 * plan.drain_s:
                jobs = sized(rate, plan.drain_s, plan.min_jobs, plan.max_jobs)
        fig.drain_jobs[key] = jobs

    def warm_up(self, driver: Driver, workers: Any, sqlite_file: str | None) -> float:
        """Queue a few jobs while the workers start (their start-up goes on meanwhile: the
        jobs are queued long before the workers are ready), and wait until they have run
        them: waits until the workers are ready, and returns their drain rate as a first
        guess."""
        rate, _ = self.drain(driver, workers, self.plan.warm_up, sqlite_file, 60.0, pause=False)
        return rate

    def record_fill(self, fig: Figures, filled: dict[str, Any]) -> None:
        """Enqueue rates from a fill: one call per job (the whole fill when the peer has no
        batch call), and batched."""
        single, took = filled["single"], filled["single_s"]
        if not filled["rest_batched"]:
            single, took = single + filled["rest"], took + filled["rest_s"]
        elif filled["rest"] >= 500 and filled["rest_s"] > 0:
            fig.enqueue_batch.append(filled["rest"] / filled["rest_s"])
        if single >= 50 and took > 0:
            fig.enqueue.append(single / took)

    def system(self, system: Any) -> Figures:
        fig = Figures(system.name)
        fig.load = os.getloadavg()[0]
        started = time.monotonic()
        phases = fig.phases
        with timed(phases, "reset"):
            self.reset_stores(system.postgres)
            for old in self.hung_up:
                old.reap()
            self.hung_up.clear()
        env = {**self.env, **system.env}
        log = self.logs / f"{system.name}.log"
        plan = self.plan
        with timed(phases, "client"):
            driver = Driver(self.pythons[system.venv], system.module, env, log, self.reaper)
        try:
            with timed(phases, "client"):
                info = driver.call("describe", processes=[1, 2])
                fig.info = info
                driver.call("setup")
            sqlite_file = info["sqlite_file"]
            note(f"{system.name}: {info['library']} {info['version']} on {info['store']}")
            # Two worker processes: throughput, then latency at a rate they can sustain.
            with self.workers(info["workers"]["2"], env, log) as workers:
                with timed(phases, "2: start"):
                    guess = self.warm_up(driver, workers, sqlite_file)
                    workers.wait_idle()
                with timed(phases, "2: drains"):
                    self.drains(fig, "2", driver, workers, guess, info, plan.single_s)
                capacity = median(fig.drain["2"]) or 0.0
                arrivals = plan.rate if capacity >= 1.25 * plan.rate else max(1.0, capacity / 2)
                fig.latency_rate = arrivals
                with timed(phases, "2: latency"):
                    for _ in range(plan.runs):
                        p50, p99 = self.latency(driver, workers, arrivals)
                        fig.p50_ms.append(p50)
                        fig.p99_ms.append(p99)
                note(
                    f"  2 processes: {fmt(fig.drain['2'])} jobs/s ({fig.drain_jobs['2']} jobs, "
                    f"{fmt(fig.cpu_us['2'])} us CPU each); start latency "
                    f"at {arrivals:.0f}/s p50 {fmt(fig.p50_ms, 2)} p99 {fmt(fig.p99_ms, 2)} ms"
                )
                with timed(phases, "2: stop"):
                    # The next set works on the same queues: idle first, then gone.
                    workers.stop(settle=True)
                    self.wait_pops_gone()
            # One worker process: memory idle, throughput, memory after the soak.
            with self.workers(info["workers"]["1"], env, log) as workers:
                with timed(phases, "1: start"):
                    guess = self.warm_up(driver, workers, sqlite_file)
                    workers.wait_idle()
                    if plan.settle_s:
                        time.sleep(plan.settle_s)
                fig.rss_idle = workers.rss()
                with timed(phases, "1: drains"):
                    self.drains(fig, "1", driver, workers, guess, info, 0.0)
                done = plan.warm_up + fig.drained["1"]
                rate = median(fig.drain["1"]) or guess
                with timed(phases, "1: soak"):
                    soaked = self.soak(driver, workers, plan.soak_jobs - done, rate)
                    done += soaked
                    if soaked:
                        time.sleep(0.5)
                fig.rss_after = workers.rss()
                fig.soaked = done
                note(
                    f"  1 process: {fmt(fig.drain['1'])} jobs/s ({fig.drain_jobs['1']} jobs, "
                    f"{fmt(fig.cpu_us['1'])} us CPU each); enqueue "
                    f"{fmt(fig.enqueue)}/s, batch {fmt(fig.enqueue_batch)}/s; RSS idle "
                    f"{fig.rss_idle[0] / 2**20:.0f} MB, after {done:,} jobs "
                    f"{fig.rss_after[0] / 2**20:.0f} MB"
                )
                with timed(phases, "1: stop"):
                    # Its stores are emptied before anything else uses them: no need to wait
                    # for the last acknowledgements.
                    workers.stop(settle=False)
            with timed(phases, "client"):
                driver.call("teardown")
        except Exception as exc:
            fig.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            note(f"  {system.name} FAILED: {exc}")
            driver.reap(timeout=0.0)
        else:
            driver.hang_up()  # it exits while the next system's turn starts
            self.hung_up.append(driver)
        fig.seconds = time.monotonic() - started
        note(f"  ({fig.seconds:.0f} s: {phases_text(phases)})")
        return fig

    def workers(self, commands: list[list[str]], env: dict[str, str], log: Path) -> Workers:
        """Worker processes started from ``commands``, known to the reaper."""
        return Workers(commands, cwd=HERE, env=env, log=log, reaper=self.reaper)

    def soak(self, driver: Driver, workers: Any, jobs: int, rate: float) -> int:
        """Run up to ``jobs`` more no-ops through the workers, feeding as they drain, for at
        most the plan's soak time; returns how many ran."""
        if jobs <= 0 or self.plan.soak_s <= 0:
            return 0
        self.clear()
        chunk = max(50, min(20_000, int(rate * 0.5)))
        deadline = time.monotonic() + self.plan.soak_s
        fed = 0
        while fed < jobs and time.monotonic() < deadline:
            size = min(chunk, jobs - fed)
            driver.call("fill", total=10**9, count=size, single_s=0.0, batch=self.plan.batch)
            fed += size
            # keep at most about two chunks waiting
            self.wait_count(fed - chunk, timeout=120, workers=workers)
        self.wait_count(fed, timeout=120, workers=workers)
        return fed

    # -- the guide's exercise --


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one run of each figure, small drains, no memory soak, no embedded exercise "
        "(1.5 to 2.2 min here, by the load)",
    )
    parser.add_argument("--only", help="comma-separated systems (and 'exercise' or web apps)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument("--write", action="store_true", help="write the docs even if partial")
    parser.add_argument("--no-write", action="store_true", help="never write the docs")
    parser.add_argument(
        "--redis-url",
        help="a Redis database for this run alone, emptied before and after (default: the "
        "first free one of 12-15, 11-1 on 127.0.0.1:6379)",
    )
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--pg-db",
        help="the PostgreSQL database this run creates and drops (default backlane_bench_<pid>)",
    )
    parser.add_argument("--backlane-python")
    parser.add_argument("--cpu-loops", type=int, help="CPU task iterations (default: ~20 ms)")
    parser.add_argument("--soak-jobs", type=int, help="jobs before the last memory reading")
    parser.add_argument("--soak-seconds", type=float, help="time cap of the soak (full: 14)")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.list:  # names only: nothing to install for that
        print("systems:", ", ".join(s.name for s in SYSTEMS))
        print("exercise:", ", ".join(_web_key(a.name) for a in WEB_APPS))
        return
    if Path(sys.prefix).resolve() != (VENVS / "main").resolve():
        # First the environments, then the same command again from the peers' environment.
        started = time.monotonic()
        ensure_venvs()
        os.environ["BENCH_BACKLANE_PYTHON"] = backlane_python(args.backlane_python)
        os.environ["BENCH_STARTED"] = str(time.time() - (time.monotonic() - started))
        os.execv(str(MAIN_PYTHON), [str(MAIN_PYTHON), __file__, *argv])

    started_at = float(os.environ.get("BENCH_STARTED", time.time()))
    args.backlane_python = os.environ["BENCH_BACKLANE_PYTHON"]  # found before the exec
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop as on Ctrl-C: clean up, then exit
        signal.signal(sig, _exit_on_signal)
    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = Plan(**{**plan.__dict__, "runs": args.runs, "exercise_runs": args.runs})
    if args.soak_jobs is not None:
        plan = Plan(**{**plan.__dict__, "soak_jobs": args.soak_jobs})
    if args.soak_seconds is not None:
        plan = Plan(**{**plan.__dict__, "soak_s": args.soak_seconds})
    wanted = {name.strip().lower() for name in (args.only or "").split(",") if name.strip()}
    systems = [s for s in SYSTEMS if not wanted or s.name in wanted]
    apps = [
        a
        for a in WEB_APPS
        if (not wanted or "exercise" in wanted or _web_key(a.name) in wanted)
        and (a.quick or not args.quick or _web_key(a.name) in wanted)
    ]
    skipped = store_notes(args.backlane_python)
    systems = [s for s in systems if s.name not in skipped]
    apps = [a for a in apps if _web_key(a.name) not in skipped]
    args.cpu_loops = args.cpu_loops or calibrate_cpu()
    args.redis_url = claim_redis(args.redis_url)
    args.pg_db = args.pg_db or f"backlane_bench_{os.getpid()}"
    check_pg_db(args.pg_admin_url, args.pg_db)
    reaper = Reaper()
    try:
        run(args, plan, reaper, started_at, wanted, systems, apps, skipped)
    finally:
        reaper.close()  # kills whatever is still running


def run(
    args: argparse.Namespace,
    plan: Plan,
    reaper: Reaper,
    started_at: float,
    wanted: set[str],
    systems: list[Any],
    apps: list[Any],
    skipped: dict[str, str],
) -> None:
    bench = Bench(args, plan, reaper)
    load_start = os.getloadavg()
    note(
        f"Redis {args.redis_url}, PostgreSQL database {args.pg_db}, scratch folder "
        f"{bench.scratch}; CPU task {args.cpu_loops:,} loops"
    )
    results: dict[str, Any] = {"systems": {}, "exercise": {}, "skipped": skipped}
    try:
        baselines = bench.baselines()
        if apps:
            note("the guide's exercise: 100 concurrent requests, each adding one task")
        for app in apps:
            results["exercise"][app.name] = {**exercise(bench, app), "durable": app.durable}
        for system in systems:
            fig = bench.system(system)
            results["systems"][system.name] = fig.__dict__
    finally:
        for driver in bench.hung_up:
            driver.reap()
        logs = VENVS / "last-logs"
        shutil.rmtree(logs, ignore_errors=True)
        shutil.copytree(bench.logs, logs)
        bench.drop_stores()
    took = time.time() - started_at
    results["meta"] = _report.machine(
        took=took,
        quick=args.quick,
        runs=plan.runs,
        plan=plan.__dict__,
        cpu_loops=args.cpu_loops,
        load_start=load_start,
        **bench.versions,
        **baselines,
    )
    (VENVS / "last-results.json").write_text(json.dumps(results, indent=1, default=str))
    text = _report.markdown(results)
    print(text)
    complete = not wanted and not args.quick
    if not args.no_write and (complete or args.write):
        _report.write_doc(DOC, text)
        _report.chart(results, CHART)
        note(f"wrote {DOC.relative_to(ROOT)} and {CHART.relative_to(ROOT)}")
    note(f"done in {took:.0f} s (raw figures and logs in {VENVS.relative_to(ROOT)}/)")


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# -- the stores this run owns ---------------------------------------------------------------

OWNER_KEY = "bench:owner"
"""The key that marks a Redis database as taken by a run: ``"<host> <pid>"``."""
REDIS_DBS = (12, 13, 14, 15, *range(11, 0, -1))
"""The Redis databases a run without ``--redis-url`` tries, in order (never 0)."""


def owner_tag() -> str:
    return f"backlane compare.py {socket.gethostname()} {os.getpid()}"


def _reclaimable(tag: str) -> bool:
    """Whether the run that wrote ``tag`` has ended (only known for this host's runs), or is
    this one."""
    *_, host, pid = tag.split()
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()


def _take(url: str) -> str | None:
    """Claim the Redis database at ``url`` for this run if it is empty or was left by a run
    that has ended; else say who holds it."""
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    with client.pipeline() as pipe:
        try:
            pipe.watch(OWNER_KEY)
            owner = pipe.get(OWNER_KEY)
            size = pipe.dbsize()
            if owner is None and size:
                return f"holds {size} keys that are not a benchmark's"
            if owner is not None and not _reclaimable(owner):
                return f"is in use by {owner}"
            pipe.multi()
            pipe.set(OWNER_KEY, owner_tag())
            pipe.execute()
        except redis.WatchError:
            return "was just taken by another run"
        finally:
            client.close()
    return None


def claim_redis(url: str | None) -> str:
    """The Redis database this run owns: ``url``'s, or the first free one of ``REDIS_DBS``
    (on the default server). Exits if ``url``'s is not free: this run empties it."""
    if url:
        why = _take(url)
        if why:
            sys.exit(f"the Redis database {url} {why}: pick a free one with --redis-url")
        return url
    for db in REDIS_DBS:
        candidate = f"redis://127.0.0.1:6379/{db}"
        if _take(candidate) is None:
            return candidate
    sys.exit("no free Redis database on 127.0.0.1:6379: pass one with --redis-url")


def check_pg_db(admin_url: str, name: str) -> None:
    """Exit unless the PostgreSQL database ``name`` is absent or was left by a run that has
    ended: this run drops and makes it anew."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (name,),
        ).fetchone()
    if row is None:
        return
    tag = row[0] or ""
    if not tag.startswith("backlane compare.py") or not _reclaimable(tag):
        sys.exit(
            f"the PostgreSQL database {name} exists and is not a finished benchmark run's "
            f"({tag or 'no owner'}): pick another with --pg-db"
        )


def _web_key(name: str) -> str:
    return name.lower().replace(" (embedded)", "-embedded")


def store_notes(python: str) -> dict[str, str]:
    """backlane's Redis and PostgreSQL stores, where they do not import yet: name -> why."""
    check = (
        "import importlib\n"
        "for name in ('redis', 'postgres'):\n"
        "    try:\n"
        "        importlib.import_module('backlane.stores.' + name)\n"
        "    except Exception as exc:\n"
        "        print(name, type(exc).__name__, exc)\n"
    )
    found = subprocess.run([python, "-c", check], capture_output=True, text=True).stdout
    skipped: dict[str, str] = {}
    for line in found.splitlines():
        store, _, why = line.partition(" ")
        skipped[f"backlane-{store}"] = f"backlane.stores.{store} does not import ({why})"
    return skipped


if __name__ == "__main__":
    main(sys.argv[1:])
