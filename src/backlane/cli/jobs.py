"""Looking after jobs from a shell: ``jobs``, ``show``, ``retry``, ``cancel``, ``purge``,
``counts``."""

from __future__ import annotations

import enum
import json
import re
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from ..app import Backlane
from ..jobs import Job, JobState, iso_utc
from ._app import AppOption, JobId, JsonOption, UrlOption, _console, _fail, _run, cli


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
_MOST = 1_000_000_000
"""The largest --limit and --offset: every store counts that far (SQLite's and
PostgreSQL's integers, and Redis scripts' numbers, stop short of what Python's do)."""
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
    limit: Annotated[int, typer.Option(min=1, max=_MOST, help="Most jobs to list.")] = 50,
    offset: Annotated[int, typer.Option(min=0, max=_MOST, help="Jobs to skip first.")] = 0,
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
    from rich.table import Table
    from rich.text import Text

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
    from rich.table import Table
    from rich.text import Text

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
    """Queue a failed or cancelled job again, to run as soon as a worker is free.

    Exit codes: 0 queued again; 1 no job has this id (or the store failed); 3 not
    retried, the job is not failed or cancelled (queued already, running, succeeded...),
    as the message says; 4 not retried, another active job holds its idempotency key.
    """

    async def act(lane: Backlane) -> tuple[bool, Job | None]:
        if await lane.retry(job_id):
            return True, None
        return False, await lane.store.get(job_id)  # as it is now, after the refusal

    done, job = _run(url, app, act)
    if done:
        _console().print(f"Job {job_id} queued again.")
        return
    if job is None:
        _fail(f"no job with id {job_id!r}")
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        if job.key is not None:
            _fail(
                f"job {job_id} was not queued again: another active job holds its key "
                f"{job.key!r}; retry it once that job has ended",
                code=_RETRY_KEY_HELD,
            )
        _fail(  # it changed meanwhile (retried, and ended again)
            f"job {job_id} was not queued again: it changed meanwhile and is "
            f"{job.state.value} now; run retry again",
            code=_RETRY_NOT_RETRYABLE,
        )
    _fail(_why_not_retried(job), code=_RETRY_NOT_RETRYABLE)


_RETRY_NOT_RETRYABLE = 3
_RETRY_KEY_HELD = 4


def _why_not_retried(job: Job) -> str:
    """Why ``job``, in a state other than failed or cancelled, was not queued again."""
    if job.state is JobState.QUEUED:
        return f"job {job.id} is queued already, waiting for a worker; nothing to retry"
    if job.state is JobState.DEFERRED:
        return (
            f"job {job.id} is deferred, waiting for the request that added it to finish; "
            "nothing to retry"
        )
    if job.state is JobState.RUNNING:
        return f"job {job.id} is running now; nothing to retry"
    ended = "succeeded" if job.state is JobState.SUCCEEDED else f"was {job.state.value}"
    return f"job {job.id} {ended}; only failed or cancelled jobs can be retried"


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
    from rich.table import Table

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


def _full(job: Job) -> dict[str, Any]:
    """Everything stored about ``job``: the public view plus arguments (the stored text
    when it is not JSON: a job no worker could run) and bookkeeping."""
    try:
        arguments = json.loads(job.payload)
    except (ValueError, RecursionError):
        arguments = job.payload
    data = job.to_public()
    data.update(
        arguments=arguments,
        priority=job.priority,
        key=job.key,
        worker_id=job.worker_id,
        lease_until=iso_utc(job.lease_until),
        after=job.after,
        cancel_requested=job.cancel_requested,
        keep_until=iso_utc(job.keep_until),
        meta=job.meta,
    )
    return data


def _when(ts: float | None) -> str:
    """A time for people: local, to the second; one beyond the calendar (a delay of
    centuries, a purge age of millennia) as POSIX seconds."""
    if ts is None:
        return ""
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} (POSIX seconds)"


def _percent(progress: float | None) -> str:
    return "" if progress is None else f"{progress:.0%}"
