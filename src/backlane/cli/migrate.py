"""``backlane migrate``: bring a store's schema up to date, or check that it is.

Stores with a schema of their own (PostgreSQL) migrate when they open unless told not to
(``?auto_migrate=0``): production deploys run this command once, before the new code
starts. SQLite files migrate themselves when opened; Redis and memory have no schema.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from ..exceptions import BacklaneError
from ._app import AppOption, UrlOption, _console, _fail, _lane_from_options, _redact, cli


@cli.command()
def migrate(
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing: exit 1 unless the schema is up to date (for deploy scripts).",
        ),
    ] = False,
    url: UrlOption = None,
    app: AppOption = None,
) -> None:
    """Bring the store's schema up to date (PostgreSQL: create the schema if missing, then
    apply the migrations it lacks, in one transaction).

    The store comes from --url, --app, or BACKLANE_URL. Safe to run from several machines at
    once: one migrates, the others find it done.
    """
    lane = _lane_from_options(url, app)
    store = lane.store
    shown = _redact(lane.url)
    migrate_store = getattr(store, "migrate", None)
    if migrate_store is None:
        _console().print(
            f"{shown}: this store brings its schema (if any) up to date itself when it "
            "opens; nothing to do."
        )
        return
    try:
        before, after = asyncio.run(migrate_store(check=check))
    except BacklaneError as exc:
        _fail(str(exc))
    schema = getattr(getattr(store, "settings", None), "schema", "?")
    if check:
        _console().print(f"{shown}: schema {schema!r} is up to date (version {after}).")
    elif before == after:
        _console().print(f"{shown}: schema {schema!r} was already up to date (version {after}).")
    else:
        _console().print(f"{shown}: schema {schema!r} migrated from version {before} to {after}.")
