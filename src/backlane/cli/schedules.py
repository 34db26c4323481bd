"""``backlane scheduler`` runs a lane's schedules; ``backlane schedules`` lists, pauses and
resumes them."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from typing import Annotated, Any

import typer

from ..app import Backlane
from ..exceptions import BacklaneError, ConfigurationError
from ..jobs import iso_utc
from ._app import (
    LogLevel,
    _configure_logging,
    _console,
    _fail,
    _redact,
    cli,
    load_lane,
    missing_sqlite_file,
    schema_missing,
)

log = logging.getLogger("backlane.cli")

Target = Annotated[
    str,
    typer.Argument(
        metavar="MODULE:ATTR",
        help="The lane whose schedules to use: a Backlane or an app with one installed.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Name = Annotated[
    str, typer.Argument(metavar="NAME", help="The schedule's name.", show_default=False)
]

schedules_cli = typer.Typer(
    help="List the lane's schedules, or pause and resume one.", no_args_is_help=False
)
cli.add_typer(schedules_cli, name="schedules")


@cli.command()
def scheduler(
    target: Target,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Logging level, to stderr.")
    ] = LogLevel.info,
) -> None:
    """Turn the lane's due schedule slots into jobs until stopped (SIGTERM or Ctrl-C).

    Run as many as you like, on any machines sharing the store: each slot becomes exactly
    one job. Workers run the jobs.
    """
    lane = load_lane(target)
    _configure_logging(log_level.value)
    if not lane.schedules:
        _fail(f"{target} declares no schedules (use @lane.cron or @lane.every)", code=2)
    runner = lane.scheduler()
    log.info("scheduler on %s: %s", _redact(lane.url), ", ".join(lane.schedules))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop)
        try:
            await runner.run()
        finally:
            await lane.close()

    try:
        asyncio.run(serve())
    except BacklaneError as exc:
        _fail(f"scheduler stopped: {exc}")


@schedules_cli.callback(invoke_without_command=True)
def list_schedules(
    ctx: typer.Context,
    app: Annotated[
        str | None,
        typer.Option("--app", metavar="MODULE:ATTR", help="The lane that declares them."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List schedules: name, expression, next run, last run, paused."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = app  # `schedules --app X pause NAME` means the same as `pause NAME --app X`
        return
    if app is None:
        raise typer.BadParameter("name the lane that declares the schedules", param_hint="'--app'")
    lane = load_lane(app)
    rows = _gather(lane)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("name", "schedule", "next run", "last run", "paused", "missed")
    for row in rows:
        table.add_row(
            row["name"],
            row["expression"],
            row["next_run"] or "-",
            row["last_run"] or "-",
            "yes" if row["paused"] else "no",
            row["missed"],
        )
    _console().print(table)


AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="The lane that declares it (may also come before the command).",
        show_default=False,
    ),
]


@schedules_cli.command("pause")
def pause(ctx: typer.Context, name: Name, app: AppOption = None) -> None:
    """Pause a schedule for every scheduler: its slots pass without jobs."""
    _set_paused(_app_of(ctx, app), name, True)


@schedules_cli.command("resume")
def resume(ctx: typer.Context, name: Name, app: AppOption = None) -> None:
    """Resume a paused schedule; slots missed meanwhile follow its missed policy."""
    _set_paused(_app_of(ctx, app), name, False)


def _app_of(ctx: typer.Context, app: str | None) -> str:
    """The lane ``--app`` names, after the command or before it (``schedules --app X``)."""
    given = ctx.obj if app is None else app
    if not isinstance(given, str):
        raise typer.BadParameter("name the lane that declares the schedule", param_hint="'--app'")
    return given


def _set_paused(app: str, name: str, paused: bool) -> None:
    lane = load_lane(app)

    async def go() -> None:
        async with lane:
            await lane.pause_schedule(name, paused)

    try:
        asyncio.run(go())
    except ConfigurationError as exc:
        _fail(str(exc), code=2)
    except BacklaneError as exc:
        _fail(str(exc))
    typer.echo(f"schedule {name} {'paused' if paused else 'resumed'}")


def _gather(lane: Backlane) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        records = {}
        if missing_sqlite_file(lane) is None and not await schema_missing(lane):
            # else nothing ran there yet: no record, and nothing created to say so
            async with lane:
                records = await lane.store.schedules()
        now = time.time()
        rows = []
        for schedule in lane.schedules.values():
            record = records.get(schedule.name)
            rows.append(
                {
                    "name": schedule.name,
                    "task": schedule.task.name,
                    "expression": schedule.expression,
                    "next_run": iso_utc(schedule.next_slot(now)),
                    "last_run": iso_utc(record.last_slot if record else None),
                    "paused": bool(record and record.paused),
                    "missed": schedule.missed,
                }
            )
        return rows

    try:
        return asyncio.run(go())
    except BacklaneError as exc:
        _fail(str(exc))
