"""What every ``backlane`` command shares: the Typer app, finding the lane, options,
output and exit codes."""

from __future__ import annotations

import asyncio
import enum
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer

from ..app import Backlane
from ..exceptions import BacklaneError, ConfigurationError

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("backlane.cli")

T = TypeVar("T")

cli = typer.Typer(
    name="backlane",
    help="Durable background jobs for FastAPI: run workers and look after jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


class LogLevel(str, enum.Enum):
    """How much a worker logs."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("backlane").setLevel(level.upper())


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


def _run(url: str | None, app: str | None, action: Callable[[Backlane], Awaitable[T]]) -> T:
    """Open the store ``--url`` or ``--app`` chooses, do ``action``, close it; a backlane
    error ends the command with its message and code 1. A store that holds nothing of
    backlane yet (no SQLite file, no PostgreSQL schema) is not created: the command ends
    with code 1, saying so."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    lane = _lane_from_options(url, app)
    missing = missing_sqlite_file(lane)
    if missing is not None:
        _fail(
            f"no SQLite database at {missing}; choose the store with --url, --app or BACKLANE_URL"
        )

    async def go() -> T:
        await _fail_if_not_installed(lane)
        async with lane:
            return await action(lane)

    try:
        return asyncio.run(go())
    except BacklaneError as exc:
        _fail(str(exc))


def missing_sqlite_file(lane: Backlane) -> str | None:
    """The path of the lane's SQLite file if it does not exist (looking at it must not
    create it); None for a file that does, or another store."""
    path = getattr(lane.store, "path", None)
    if isinstance(path, str) and path != ":memory:" and not os.path.exists(path):
        return path
    return None


async def schema_missing(lane: Backlane) -> bool:
    """Whether the lane's store has a schema of its own (PostgreSQL) that is not there
    yet, found without creating it."""
    installed = getattr(lane.store, "installed", None)
    return installed is not None and not await installed()


async def _fail_if_not_installed(lane: Backlane) -> None:
    """End the command with code 1 if the lane's store has a schema of its own (PostgreSQL)
    that is not there yet, which opening the store would create."""
    if not await schema_missing(lane):
        return
    schema = getattr(getattr(lane.store, "settings", None), "schema", "?")
    _fail(
        f"no backlane schema {schema!r} in the PostgreSQL database at {_redact(lane.url)}: "
        "nothing is stored there yet. Choose the store with --url, --app or BACKLANE_URL, "
        "or create the schema with `backlane migrate` (a worker or the app creates it too)"
    )


def _fail(message: str, code: int = 1) -> NoReturn:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text.assemble(("Error: ", "bold red"), message))
    raise typer.Exit(code)


def _console() -> Console:
    """Where people's output goes: rows stay whole when piped (to ``grep``, a file), and
    stored text (arguments, queue names, error messages) shows as it is, never read as
    console markup (``[/b]``) or emoji codes (``:x:``)."""
    from rich.console import Console

    console = Console(highlight=False, markup=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 400
    return console
