"""The ``backlane`` command: run workers, and look after jobs from a shell.

::

    backlane worker MODULE:ATTR [--concurrency N] [--processes N] [--queues a,b]
    backlane jobs | show ID | retry ID | cancel ID | purge --older-than 7d | counts

The commands that look after jobs find the store through ``--url URL`` or
``--app MODULE:ATTR``, else ``BACKLANE_URL``, else ``sqlite:///./backlane.db``. Output is
a table for people and JSON (``--json``) for scripts.

Exit codes: 0 done; 1 the store could not do it (unknown id, a job that cannot be retried
or cancelled, a store error, a worker process that failed); 2 the command line was wrong
(a bad duration, a ``MODULE:ATTR`` that cannot be imported or is not a lane, a bad URL).
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .app import Backlane
from .exceptions import BacklaneError, ConfigurationError
from .jobs import Job, JobState

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("backlane.cli")

T = TypeVar("T")

cli = typer.Typer(
    name="backlane",
    help="Durable background jobs for FastAPI: run workers and look after jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Entry point of the ``backlane`` console script and of ``python -m backlane``."""
    cli(prog_name="backlane")


# -- finding the lane -----------------------------------------------------------------


def load_lane(target: str) -> Backlane:
    """The lane ``MODULE:ATTR`` names: a ``Backlane``, or an app whose ``state.backlane`` is
    one. The current directory is importable, as with uvicorn. Raises ``typer.BadParameter``
    saying what was wrong."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _bad_target(target, "write it as MODULE:ATTR, for example myapp.tasks:lane")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise _bad_target(
                target,
                f"no module named {missing!r}; run the command from the folder that holds "
                "it, or install the package that provides it",
            ) from None
        raise _import_failed(target, module_name) from exc
    except Exception as exc:
        raise _import_failed(target, module_name) from exc
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise _bad_target(target, f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(found, Backlane):
        return found
    state = getattr(found, "state", None)
    if state is not None:
        lane = getattr(state, "backlane", None)
        if isinstance(lane, Backlane):
            return lane
        raise _bad_target(
            target,
            f"{attr} is an app without a lane installed; call lane.install({attr}) in "
            f"{module_name}, or point at the Backlane itself",
        )
    raise _bad_target(
        target,
        f"{attr} is of type {type(found).__name__}, not a Backlane or an app with one installed",
    )


def _bad_target(target: str, why: str) -> typer.BadParameter:
    return typer.BadParameter(f"cannot use {target!r}: {why}", param_hint="'MODULE:ATTR'")


def _import_failed(target: str, module_name: str) -> typer.BadParameter:
    """The error for a module that raised while being imported; its traceback goes first."""
    typer.echo(traceback.format_exc(), err=True)
    kind, exc = sys.exc_info()[:2]
    what = f"{kind.__name__}: {exc}" if kind is not None else "an error"
    return _bad_target(target, f"importing {module_name!r} raised {what} (traceback above)")


def _lane_from_options(url: str | None, app: str | None) -> Backlane:
    if url is not None and app is not None:
        raise typer.BadParameter("give --url or --app, not both", param_hint="'--url' / '--app'")
    if app is not None:
        return load_lane(app)
    try:
        return Backlane(url)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--url' / BACKLANE_URL") from None


def _redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


# -- running: worker (scheduler, demo and dashboard belong in this section) ------------


class LogLevel(str, enum.Enum):
    """How much a worker logs."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


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
        if queue_list is not None:
            args += ["--queues", ",".join(queue_list)]
        log.info(
            "supervisor (pid %d) starting %d worker processes on %s",
            os.getpid(),
            processes,
            _redact(lane.url),
        )
        raise typer.Exit(_supervise(target, processes, args))
    one = lane.worker(concurrency=concurrency, queues=queue_list)
    log.info(
        "worker %s (pid %d) on %s: concurrency %d, queues %s",
        one.id,
        os.getpid(),
        _redact(lane.url),
        one.concurrency,
        ",".join(queue_list) if queue_list else "all",
    )
    try:
        asyncio.run(_serve(one, supervisor_pid))
    except BacklaneError as exc:
        _fail(f"worker {one.id} stopped: {exc}")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("backlane").setLevel(level.upper())


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
    watchdog = None
    if supervisor_pid is not None:
        watchdog = asyncio.create_task(_watch_supervisor(one, supervisor_pid))
    try:
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


# -- looking after jobs -----------------------------------------------------------------

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Store URL (default: BACKLANE_URL, else sqlite:///./backlane.db).",
        show_default=False,
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="Take the store from this lane (a Backlane or an app with one).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
JobId = Annotated[str, typer.Argument(metavar="ID", help="The job's id.", show_default=False)]


class EndState(str, enum.Enum):
    """The states a job ends in: the only ones ``purge`` removes."""

    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    discarded = "discarded"


_STATE_STYLE = {
    JobState.DEFERRED: "dim",
    JobState.QUEUED: "cyan",
    JobState.RUNNING: "yellow",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "magenta",
    JobState.DISCARDED: "dim",
}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``15m``, ``12h`` or ``7d``. Raises
    ``ValueError`` saying how to write one."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (s, m, h or d), "
            "like 30s, 15m, 12h or 7d"
        )
    return float(match[1]) * _UNIT_SECONDS[match[2]]


@cli.command()
def jobs(
    state: Annotated[
        JobState | None, typer.Option(help="Only jobs in this state.", show_default=False)
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Only jobs of this task (module:qualname).", show_default=False),
    ] = None,
    queue: Annotated[
        str | None, typer.Option(help="Only jobs of this queue.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most jobs to list.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Jobs to skip first.")] = 0,
    as_json: JsonOption = False,
    url: UrlOption = None,
    app: AppOption = None,
) -> None:
    """List jobs, newest first, optionally filtered by state, task and queue.

    --json prints a list of the jobs as the status API shows them.
    """
    found = _run(
        url,
        app,
        lambda lane: lane.store.list_jobs(
            state=state, task=task, queue=queue, limit=limit, offset=offset
        ),
    )
    if as_json:
        typer.echo(json.dumps([job.to_public() for job in found], indent=2))
        return
    console = _console()
    if not found:
        console.print("No jobs match." if offset == 0 else "No more jobs.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("ID", "TASK", "QUEUE", "STATE", "ATT", "PROGRESS", "CREATED", "FINISHED"):
        right = name in ("ATT", "PROGRESS")
        table.add_column(name, no_wrap=name != "TASK", justify="right" if right else "left")
    table.add_column("ERROR", overflow="fold")
    for job in found:
        table.add_row(
            job.id,
            job.task,
            job.queue,
            Text(job.state.value, style=_STATE_STYLE[job.state]),
            str(job.attempts),
            _percent(job.progress),
            _when(job.created_at),
            _when(job.finished_at),
            (job.error or {}).get("type") or "",
        )
    console.print(table)
    if len(found) == limit:
        console.print(f"Showing {limit} jobs from {offset}; --offset {offset + limit} for more.")


@cli.command()
def show(
    job_id: JobId, as_json: JsonOption = False, url: UrlOption = None, app: AppOption = None
) -> None:
    """Show one job in full: arguments, timing, worker, result, and error with traceback."""
    job = _run(url, app, lambda lane: lane.store.get(job_id))
    if job is None:
        _fail(f"no job with id {job_id!r}")
    if as_json:
        typer.echo(json.dumps(_full(job), indent=2))
        return
    console = _console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", job.id),
        ("task", job.task),
        ("state", Text(job.state.value, style=_STATE_STYLE[job.state])),
        ("queue", f"{job.queue} (priority {job.priority})"),
        ("arguments", job.payload),
        ("attempts", str(job.attempts)),
        ("key", job.key or "-"),
        ("created", _when(job.created_at) or "-"),
        ("run at", _when(job.run_at) or "-"),
        ("started", _when(job.started_at) or "-"),
        ("finished", _when(job.finished_at) or "-"),
        ("worker", job.worker_id or "-"),
        ("lease until", _when(job.lease_until) or "-"),
        ("progress", " ".join(p for p in (_percent(job.progress), job.message or "") if p) or "-"),
        ("waits for", job.after or "-"),
        ("cancel asked", "yes" if job.cancel_requested else "no"),
        ("keep until", _when(job.keep_until) or "-"),
    ]
    if job.result is not None:
        rows.append(("result", job.result))
    if job.error:
        rows.append(("error", f"{job.error.get('type')}: {job.error.get('message')}"))
    for name, value in rows:
        grid.add_row(name, value)
    console.print(grid)
    trace = (job.error or {}).get("traceback")
    if trace:
        console.print()
        console.print(Text(trace.rstrip("\n")))


@cli.command()
def retry(job_id: JobId, url: UrlOption = None, app: AppOption = None) -> None:
    """Queue a failed or cancelled job again, to run as soon as a worker is free."""

    async def act(lane: Backlane) -> tuple[Job | None, bool]:
        job = await lane.store.get(job_id)
        if job is None:
            return None, False
        return job, await lane.retry(job_id)

    job, done = _run(url, app, act)
    if job is None:
        _fail(f"no job with id {job_id!r}")
    if not done:
        if job.state in (JobState.FAILED, JobState.CANCELLED) and job.key is not None:
            _fail(
                f"job {job_id} was not queued again: another active job holds its key {job.key!r}"
            )
        _fail(f"job {job_id} is {job.state.value}: only failed or cancelled jobs can be retried")
    _console().print(f"Job {job_id} queued again.")


@cli.command()
def cancel(job_id: JobId, url: UrlOption = None, app: AppOption = None) -> None:
    """Cancel a job: a waiting job ends cancelled at once, a running one is asked to stop.

    Exits with code 1 if the job had already ended.
    """

    async def act(lane: Backlane) -> tuple[Job | None, JobState | None]:
        job = await lane.store.get(job_id)
        if job is None:
            return None, None
        return job, await lane.cancel(job_id)

    job, after = _run(url, app, act)
    if job is None or after is None:
        _fail(f"no job with id {job_id!r}")
    if after is JobState.CANCELLED and job.state is not JobState.CANCELLED:
        _console().print(f"Job {job_id} cancelled.")
    elif after is JobState.RUNNING:
        _console().print(f"Job {job_id} is running; its worker was asked to stop it.")
    else:
        _fail(f"job {job_id} had already ended {after.value}; nothing to cancel")


@cli.command()
def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Remove jobs that ended longer ago than this: 30s, 15m, 12h, 7d.",
            show_default=False,
        ),
    ],
    states: Annotated[
        list[EndState] | None,
        typer.Option(
            "--state",
            help="Only jobs that ended in this state (repeatable; default: all).",
            show_default=False,
        ),
    ] = None,
    url: UrlOption = None,
    app: AppOption = None,
) -> None:
    """Remove ended jobs that finished longer ago than --older-than.

    Ended means succeeded, failed, cancelled or discarded; --state narrows it. Waiting and
    running jobs are never removed.
    """
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--older-than'") from None
    chosen = [JobState(s.value) for s in (states or EndState)]
    before = time.time() - age
    removed = _run(url, app, lambda lane: lane.store.purge(before=before, states=chosen))
    names = ", ".join(s.value for s in chosen)
    _console().print(f"Removed {removed} jobs ({names}) that ended before {_when(before)}.")


@cli.command()
def counts(as_json: JsonOption = False, url: UrlOption = None, app: AppOption = None) -> None:
    """Count jobs per queue and state.

    --json prints {queue: {state: count}}, leaving out states without jobs.
    """
    found = _run(url, app, lambda lane: lane.store.counts())
    if as_json:
        data = {
            queue: {state.value: by_state[state] for state in JobState if state in by_state}
            for queue, by_state in sorted(found.items())
        }
        typer.echo(json.dumps(data, indent=2))
        return
    console = _console()
    if not found:
        console.print("No jobs.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("QUEUE")
    for state in JobState:
        table.add_column(state.value.upper(), justify="right")
    table.add_column("TOTAL", justify="right")
    for queue, by_state in sorted(found.items()):
        cells = [str(by_state.get(state, 0)) for state in JobState]
        table.add_row(queue, *cells, str(sum(by_state.values())))
    console.print(table)


# -- helpers ---------------------------------------------------------------------------


def _run(url: str | None, app: str | None, action: Callable[[Backlane], Awaitable[T]]) -> T:
    """Open the store ``--url`` or ``--app`` chooses, do ``action``, close it; a backlane
    error ends the command with its message and code 1."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    lane = _lane_from_options(url, app)
    path = getattr(lane.store, "path", None)  # a SQLite file: looking must not create it
    if isinstance(path, str) and path != ":memory:" and not os.path.exists(path):
        _fail(f"no SQLite database at {path}; choose the store with --url, --app or BACKLANE_URL")

    async def go() -> T:
        async with lane:
            return await action(lane)

    try:
        return asyncio.run(go())
    except BacklaneError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("Error: ", "bold red"), message))
    raise typer.Exit(code)


def _console() -> Console:
    """Where people's output goes: rows stay whole when piped (to ``grep``, a file)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 400
    return console


def _full(job: Job) -> dict[str, Any]:
    """Everything stored about ``job``: the public view plus arguments and bookkeeping."""
    data = job.to_public()
    data.update(
        arguments=json.loads(job.payload),
        priority=job.priority,
        key=job.key,
        worker_id=job.worker_id,
        lease_until=_iso(job.lease_until),
        after=job.after,
        cancel_requested=job.cancel_requested,
        keep_until=_iso(job.keep_until),
        meta=job.meta,
    )
    return data


def _iso(ts: float | None) -> str | None:
    """A time for scripts: ISO 8601 in UTC, as the status API gives it."""
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _when(ts: float | None) -> str:
    """A time for people: local, to the second."""
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _percent(progress: float | None) -> str:
    return "" if progress is None else f"{progress:.0%}"
