"""What does the durable drop-in cost per request, next to FastAPI's own BackgroundTasks?

Two apps that differ only by the import (``apps/with_fastapi.py``, ``apps/with_backlane.py``:
one POST endpoint adding a no-op task), each served by its own uvicorn process (one worker
process, no access log). A client on one keep-alive connection sends sequential requests
after a warm-up, then ten clients (one connection each) keep ten requests in flight. The
drop-in runs on SQLite twice: with its embedded worker (the default ``install(app)``), and
web-only (``workers=0``, as when workers run in their own processes).

The whole comparison runs ``--rounds`` times, in a rotating order; the table shows the
median over rounds of each figure, and of each round's ratio drop-in / BackgroundTasks.
Beside latency, each phase reports the server's CPU time per request (user + system, all
its threads, read from /proc on Linux): on a shared machine it moves far less than
latency does, and it is what bounds throughput.

    .venv/bin/python benchmarks/dropin_overhead.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
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
    """Seconds after the last reply until every stored task had run (embedded worker)."""
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


def concurrently(port: int, requests: int, in_flight: int) -> tuple[list[float], float]:
    """``requests`` POSTs from ``in_flight`` clients at once; latencies and seconds taken."""
    per_client = requests // in_flight
    results: list[list[float]] = [[] for _ in range(in_flight)]
    threads = [
        threading.Thread(target=post_many, args=(port, 10**6 * (i + 1), per_client, results[i]))
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


def measure(name: str, requests: int, warmup: int, in_flight: int) -> Figures:
    target, extra = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="backlane-bench-") as tmp:
        folder = Path(tmp)
        db = folder / "bench.db"
        server = Server(target, {"BACKLANE_URL": f"sqlite:///{db}", **extra}, folder)
        try:
            post_many(server.port, 0, warmup, [])
            pid = server.proc.pid
            sequential: list[float] = []
            embedded = extra.get("BENCH_WORKERS") == "1"
            if embedded:
                wait_drained(db)
            cpu_before = cpu_seconds(pid)
            start = time.perf_counter()
            post_many(server.port, warmup, requests, sequential)
            seq_took = time.perf_counter() - start
            if embedded:
                wait_drained(db)  # the worker's share of the requests' cost counts too
            seq_cpu = cpu_per_request(cpu_before, cpu_seconds(pid), requests)
            cpu_before = cpu_seconds(pid)
            conc, conc_took = concurrently(server.port, requests, in_flight)
            drained = wait_drained(db) if embedded else None
            conc_cpu = cpu_per_request(cpu_before, cpu_seconds(pid), len(conc))
        finally:
            server.stop()
    return Figures(
        seq_p50_ms=statistics.median(sequential) * 1000,
        seq_p99_ms=percentile(sequential, 0.99) * 1000,
        seq_rps=requests / seq_took,
        conc_p50_ms=statistics.median(conc) * 1000,
        conc_p99_ms=percentile(conc, 0.99) * 1000,
        conc_rps=len(conc) / conc_took,
        drain_s=drained,
        seq_cpu_us=seq_cpu,
        conc_cpu_us=conc_cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per run and mode")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    names = list(VARIANTS)
    runs: dict[str, list[Figures]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            figures = measure(name, args.requests, args.warmup, args.in_flight)
            runs[name].append(figures)
            print(f"round {round_no + 1} {name}: {figures}", file=sys.stderr, flush=True)

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
