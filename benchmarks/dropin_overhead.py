"""What does the durable drop-in cost per request, next to FastAPI's own BackgroundTasks?

Two apps that differ only by the import (``apps/with_fastapi.py``, ``apps/with_backlane.py``:
one POST endpoint adding a no-op task), each served by its own uvicorn process (one worker
process, no access log). The drop-in runs on SQLite twice: with its embedded worker (the
default ``install(app)``), and web-only (``workers=0``, as when workers run in their own
processes). A fourth server shows the floor of any durable design: ``BackgroundTasks`` plus
one SQLite transaction inserting a job-like row before the reply
(``apps/with_fastapi_and_insert.py``). All four servers stay up for the whole run.

A round sends each server ``--requests`` sequential requests on one keep-alive connection,
then ``--requests`` more from ten clients (one connection each) keeping ten in flight. The
requests go in bursts of ``--burst`` that alternate between the servers, in an order that
rotates, so that every variant meets the load of the same moments on a shared machine: a
ratio to BackgroundTasks compares figures taken within seconds of each other.
Beside latency, each round reports each server's CPU time per request (user + system, all
its threads, read from /proc on Linux), counting, with the embedded worker, the CPU until
the burst's jobs have run: it moves far less than latency does, and it is what bounds
throughput. The table shows the median over rounds of each figure, and of each round's
ratio drop-in / BackgroundTasks.

    .venv/bin/python benchmarks/dropin_overhead.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

APPS = Path(__file__).resolve().parent / "apps"
BASELINE = "BackgroundTasks"
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    BASELINE: ("with_fastapi:app", {}),
    "BackgroundTasks + one SQLite insert (floor)": ("with_fastapi_and_insert:app", {}),
    "drop-in, embedded worker": ("with_backlane:app", {"BENCH_WORKERS": "1"}),
    "drop-in, web only": ("with_backlane:app", {"BENCH_WORKERS": "0"}),
}


@dataclass
class Figures:
    seq_p50_ms: float
    seq_p99_ms: float
    seq_rps: float
    conc_p50_ms: float
    conc_p99_ms: float
    conc_rps: float
    drain_s: float | None
    """Seconds after the round's last reply until every stored task had run (embedded
    worker)."""
    seq_cpu_us: float | None = None
    """Server CPU time per sequential request, microseconds (None where /proc is missing)."""
    conc_cpu_us: float | None = None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of every thread of process ``pid`` so far (Linux only)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return None
    ticks = 0
    for task in tasks.iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_per_request(before: float | None, after: float | None, requests: int) -> float | None:
    if before is None or after is None:
        return None
    return (after - before) / requests * 1e6


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One ``uvicorn`` process serving ``target`` from ``apps/``."""

    def __init__(self, target: str, env: dict[str, str], folder: Path) -> None:
        self.port = free_port()
        self.log = folder / "uvicorn.log"
        command = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(APPS)]
        command += ["--port", str(self.port), "--no-access-log", "--log-level", "warning"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited:\n{self.log.read_text()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/openapi.json")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not answer:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def post_many(port: int, first: int, count: int, latencies: list[float]) -> None:
    """``count`` sequential POSTs on one keep-alive connection; appends each latency."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for n in range(first, first + count):
            start = time.perf_counter()
            conn.request("POST", f"/task/{n}")
            reply = conn.getresponse()
            reply.read()
            latencies.append(time.perf_counter() - start)
            if reply.status != 200:
                raise RuntimeError(f"POST /task/{n} answered {reply.status}")
    finally:
        conn.close()


def concurrently(
    port: int, requests: int, in_flight: int, *, first: int = 0
) -> tuple[list[float], float]:
    """``requests`` POSTs from ``in_flight`` clients at once; latencies and seconds taken."""
    per_client = requests // in_flight
    results: list[list[float]] = [[] for _ in range(in_flight)]
    threads = [
        threading.Thread(
            target=post_many, args=(port, first + i * per_client, per_client, results[i])
        )
        for i in range(in_flight)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - start
    latencies = [value for values in results for value in values]
    if len(latencies) != per_client * in_flight:
        raise RuntimeError("a client thread failed; see the traceback above")
    return latencies, took


def wait_drained(db: Path, timeout: float = 120.0) -> float:
    """Seconds until no job in ``db`` waits or runs."""
    start = time.perf_counter()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        while True:
            query = "SELECT COUNT(*) FROM jobs WHERE state IN ('deferred', 'queued', 'running')"
            (left,) = conn.execute(query).fetchone()
            if left == 0:
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"{left} jobs still waiting after {timeout}s")
            time.sleep(0.01)
    finally:
        conn.close()


@dataclass
class Tally:
    """One variant's share of one round: latencies, seconds spent answering, CPU seconds."""

    latencies: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    cpu: float | None = 0.0

    def add_cpu(self, before: float | None, after: float | None) -> None:
        if self.cpu is None or before is None or after is None:
            self.cpu = None
        else:
            self.cpu += after - before


class Variant:
    """A server for one variant, up for the whole run, on its own SQLite file."""

    def __init__(self, name: str, folder: Path) -> None:
        target, extra = VARIANTS[name]
        self.name = name
        self.db = folder / f"{len(os.listdir(folder))}.db"
        self.embedded = extra.get("BENCH_WORKERS") == "1"
        files = {"BACKLANE_URL": f"sqlite:///{self.db}", "FLOOR_DB": str(self.db)}
        self.server = Server(target, {**files, **extra}, folder)
        self.sent = 0
        self.drain_s: float | None = None
        """Seconds from the end of its last burst until every job had run (embedded)."""

    def burst(self, tally: Tally, count: int, in_flight: int) -> None:
        """``count`` requests, one at a time or ``in_flight`` at once, into ``tally``; for
        an embedded worker, its CPU until the jobs have run counts too."""
        pid = self.server.proc.pid
        if self.embedded:
            wait_drained(self.db)
        before = cpu_seconds(pid)
        start = time.perf_counter()
        if in_flight == 1:
            post_many(self.server.port, self.sent, count, tally.latencies)
        else:
            latencies, _ = concurrently(self.server.port, count, in_flight, first=self.sent)
            tally.latencies.extend(latencies)
        tally.seconds += time.perf_counter() - start
        self.sent += count
        if self.embedded:
            self.drain_s = wait_drained(self.db)
        tally.add_cpu(before, cpu_seconds(pid))


def figures(seq: Tally, conc: Tally, drain_s: float | None) -> Figures:
    def per_request(tally: Tally) -> float | None:
        return None if tally.cpu is None else tally.cpu / len(tally.latencies) * 1e6

    return Figures(
        seq_p50_ms=statistics.median(seq.latencies) * 1000,
        seq_p99_ms=percentile(seq.latencies, 0.99) * 1000,
        seq_rps=len(seq.latencies) / seq.seconds,
        conc_p50_ms=statistics.median(conc.latencies) * 1000,
        conc_p99_ms=percentile(conc.latencies, 0.99) * 1000,
        conc_rps=len(conc.latencies) / conc.seconds,
        drain_s=drain_s,
        seq_cpu_us=per_request(seq),
        conc_cpu_us=per_request(conc),
    )


def measure_round(
    variants: list[Variant], round_no: int, requests: int, burst: int, in_flight: int
) -> dict[str, Figures]:
    """One round: every variant answers ``requests`` sequential requests, then ``requests``
    with ``in_flight`` at once, in bursts of ``burst`` that alternate between the variants
    (the order rotating), so that each sees the machine's load of the same moments."""
    seq = {v.name: Tally() for v in variants}
    conc = {v.name: Tally() for v in variants}
    for tallies, flight in ((seq, 1), (conc, in_flight)):
        for number in range(max(1, requests // burst)):
            shift = (round_no + number) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                variant.burst(tallies[variant.name], burst, flight)
    return {v.name: figures(seq[v.name], conc[v.name], v.drain_s) for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per run and mode")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--burst", type=int, default=250, help="requests to one server before the next's turn"
    )
    args = parser.parse_args()

    names = list(VARIANTS)
    runs: dict[str, list[Figures]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="backlane-bench-") as tmp:
        variants: list[Variant] = []
        try:
            for name in names:
                variants.append(Variant(name, Path(tmp)))
            for variant in variants:
                variant.burst(Tally(), args.warmup, 1)
            for round_no in range(args.rounds):
                found = measure_round(variants, round_no, args.requests, args.burst, args.in_flight)
                for name, figures_ in found.items():
                    runs[name].append(figures_)
                    print(f"round {round_no + 1} {name}: {figures_}", file=sys.stderr, flush=True)
        finally:
            for variant in variants:
                variant.server.stop()

    def med(name: str, field: str) -> float:
        values = [getattr(f, field) for f in runs[name]]
        return float("nan") if None in values else float(statistics.median(values))

    def ratio(name: str, field: str) -> float:
        rounds = zip(runs[name], runs[BASELINE], strict=True)
        pairs = [(getattr(a, field), getattr(b, field)) for a, b in rounds]
        if any(a is None or b is None for a, b in pairs):
            return float("nan")
        return float(statistics.median(a / b for a, b in pairs))

    print(
        f"\n{args.requests} requests per mode, {args.in_flight} in flight when concurrent; "
        f"median of {args.rounds} rounds; a no-op task per request\n"
    )
    print(
        "| app | seq p50 ms | seq p99 ms | seq req/s | seq CPU us/req | conc p50 ms "
        "| conc p99 ms | conc req/s | conc CPU us/req | drained after s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        drains = [f.drain_s for f in runs[name] if f.drain_s is not None]
        drain = f"{statistics.median(drains):.2f}" if drains else "-"
        print(
            f"| {name} | {med(name, 'seq_p50_ms'):.2f} | {med(name, 'seq_p99_ms'):.2f} "
            f"| {med(name, 'seq_rps'):.0f} | {med(name, 'seq_cpu_us'):.0f} "
            f"| {med(name, 'conc_p50_ms'):.2f} | {med(name, 'conc_p99_ms'):.2f} "
            f"| {med(name, 'conc_rps'):.0f} | {med(name, 'conc_cpu_us'):.0f} | {drain} |"
        )
    print(
        "\n| ratio to BackgroundTasks | seq p50 | seq p99 | seq CPU | conc p50 | conc p99 "
        "| conc req/s | conc CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names[1:]:
        print(
            f"| {name} | {ratio(name, 'seq_p50_ms'):.2f}x | {ratio(name, 'seq_p99_ms'):.2f}x "
            f"| {ratio(name, 'seq_cpu_us'):.2f}x | {ratio(name, 'conc_p50_ms'):.2f}x "
            f"| {ratio(name, 'conc_p99_ms'):.2f}x | {ratio(name, 'conc_rps'):.2f}x "
            f"| {ratio(name, 'conc_cpu_us'):.2f}x |"
        )


if __name__ == "__main__":
    main()
