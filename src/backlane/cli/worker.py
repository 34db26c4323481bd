"""``backlane worker``: run a lane's jobs in one process, or supervise several."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..exceptions import BacklaneError, ConfigurationError

if TYPE_CHECKING:
    from ..worker import Worker

from ._app import LogLevel, _configure_logging, _fail, _redact, cli, load_lane

log = logging.getLogger("backlane.cli")


_REPEAT_AFTER = 1.0
"""A supervised worker takes a SIGTERM as "exit now" only this many seconds after the first:
a service manager signalling every process at once, plus the supervisor passing the same
request on, is one request, not two."""


@cli.command()
def worker(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:ATTR",
            help="The lane: a Backlane, or a FastAPI app with one installed "
            "(e.g. myapp.tasks:lane).",
            show_default=False,
        ),
    ],
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1, help="Jobs each process runs at once (default: the lane's).", show_default=False
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Threads each process runs def tasks in (default: the lane's, else the "
            "concurrency).",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes; above 1 a supervisor starts them.")
    ] = 1,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues to take jobs from (default: all).", show_default=False
        ),
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Logging level, to stderr.")
    ] = LogLevel.info,
    supervisor_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run the lane's jobs until stopped.

    SIGTERM or Ctrl-C stops gracefully: no new job is claimed, running jobs get the lane's
    shutdown grace to finish, and the rest go back to the queue. A second signal exits at
    once; the jobs still held come back when their leases expire. With --processes N a
    supervisor starts N worker processes, passes signals on to them, and exits when all
    have exited (with code 1 if any failed).
    """
    supervised = supervisor_pid is not None
    if supervised:
        # Ctrl-C reaches the whole process group; the supervisor passes it on as SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    queue_list = None
    if queues is not None:
        queue_list = [name.strip() for name in queues.split(",") if name.strip()]
        if not queue_list:
            raise typer.BadParameter("name at least one queue", param_hint="'--queues'")
    lane = load_lane(target)
    _configure_logging(log_level.value)
    if processes > 1:
        args = ["--log-level", log_level.value]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        if threads is not None:
            args += ["--threads", str(threads)]
        if queue_list is not None:
            args += ["--queues", ",".join(queue_list)]
        log.info(
            "supervisor (pid %d) starting %d worker processes on %s",
            os.getpid(),
            processes,
            _redact(lane.url),
        )
        raise typer.Exit(_supervise(target, processes, args))
    one = lane.worker(concurrency=concurrency, queues=queue_list, threads=threads)
    try:
        asyncio.run(_serve(one, supervisor_pid))
    except BacklaneError as exc:
        _fail(f"worker {one.id} stopped: {exc}")


async def _serve(one: Worker, supervisor_pid: int | None) -> None:
    """Run ``one`` until it stops; the first stop signal stops it gracefully, a second
    exits the process at once."""
    loop = asyncio.get_running_loop()
    supervised = supervisor_pid is not None
    first: list[float] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if not first:
            first.append(now)
            log.info(
                "worker %s got %s: stopping gracefully (up to %ss for running jobs); "
                "signal again to exit at once",
                one.id,
                name,
                one.grace,
            )
            one.stop()
        elif supervised and now - first[0] < _REPEAT_AFTER:
            log.debug("worker %s got %s again: the same stop request", one.id, name)
        else:
            log.warning(
                "worker %s got %s again: exiting at once; the %d jobs it holds return to the "
                "queue when their leases expire",
                one.id,
                name,
                len(one.held),
            )
            logging.shutdown()
            os._exit(128 + signum)

    handled = [signal.SIGTERM] if supervised else [signal.SIGTERM, signal.SIGINT]
    previous: dict[int, Any] = {}
    for sig in handled:
        try:
            loop.add_signal_handler(sig, on_signal, int(sig))
        except NotImplementedError:  # pragma: no cover - Windows event loops
            previous[sig] = signal.signal(
                sig, lambda s, _f: loop.call_soon_threadsafe(on_signal, s)
            )
    # Said once a stop signal is handled: a SIGTERM sent on seeing this line is a graceful
    # stop, never the default one that ends the process at once.
    log.info(
        "worker %s (pid %d) on %s: concurrency %d, %d threads, queues %s",
        one.id,
        os.getpid(),
        _redact(one.lane.url),
        one.concurrency,
        one.threads,
        ",".join(one.queues) if one.queues else "all",
    )
    watchdog = None
    if supervisor_pid is not None:
        watchdog = asyncio.create_task(_watch_supervisor(one, supervisor_pid))
    # What the process holds by now (the app, its tasks, the libraries) lives as long as
    # it does: frozen, the cyclic collector's full collections no longer walk it (about
    # 12 ms each here, a pause the jobs waiting then share). After the signal handlers:
    # a stop asked for meanwhile is still a graceful one.
    gc.collect()
    gc.freeze()
    try:
        async with AsyncExitStack() as lifespan:
            try:
                await lifespan.enter_async_context(one.lane.lifespan_context())
            except Exception as exc:
                log.error("the lane's lifespan failed to start", exc_info=True)
                raise ConfigurationError(f"the lane's lifespan failed to start: {exc!r}") from exc
            await one.run()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in handled:
            if sig in previous:  # pragma: no cover - Windows event loops
                signal.signal(sig, previous[sig])
            else:
                loop.remove_signal_handler(sig)
        await one.lane.close()


async def _watch_supervisor(one: Worker, supervisor_pid: int) -> None:
    """Stop ``one`` gracefully once its supervisor is gone (killed without passing a
    signal on), so no worker is left behind."""
    while True:  # an orphan learns it only by looking: the kernel sends no signal
        await asyncio.sleep(1.0)
        if os.getppid() != supervisor_pid:
            break
    log.warning("worker %s: supervisor pid %d is gone; stopping", one.id, supervisor_pid)
    one.stop()


def _supervise(target: str, processes: int, args: list[str]) -> int:
    """Start ``processes`` workers, pass SIGTERM and SIGINT on to them as SIGTERM, wait for
    all. Returns 0 when every one stopped cleanly, else 1."""
    command = [sys.executable, "-m", "backlane", "worker", target, "--processes", "1"]
    command += ["--supervisor-pid", str(os.getpid()), *args]
    children: list[subprocess.Popen[bytes]] = []
    forwarded: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        forwarded.append(signum)
        log.info(
            "supervisor got %s: passing it on to %d worker processes",
            signal.Signals(signum).name,
            len(children),
        )
        for child in children:
            child.send_signal(signal.SIGTERM)  # a no-op for a child already reaped

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        for _ in range(processes):
            if forwarded:
                break
            children.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        for child in children:
            code = child.wait()
            # A child signalled before it could install its handlers ends by SIGTERM itself.
            if code != 0 and not (forwarded and code == -signal.SIGTERM):
                failed += 1
                log.error("worker process %d exited with code %d", child.pid, code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("supervisor: all %d worker processes have exited", len(children))
    return 1 if failed else 0
