"""The PostgreSQL store's settings and schema: its URL, its SQL, and its migrations.

The SQL lives in ``sql/postgres/``: ``schema.sql`` (the whole current schema, for a fresh
install), numbered migrations (``0001_jobs.sql``, ...) that bring an older schema up to
date, and ``queries.sql`` (the statements of the verbs). Every table lives in one schema
(``?schema=``, default ``backlane``); ``{schema}`` in the SQL is that schema, quoted, and
``{channel}`` the LISTEN/NOTIFY channel on which the schema announces work.

Migrations run in one transaction under an advisory lock, so processes starting together
migrate once; ``schema.migrations`` records the versions applied.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..exceptions import ConfigurationError, StoreError

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:  # deprecated there from Python 3.12, removed in 3.14
    from importlib.abc import Traversable

DEFAULT_SCHEMA = "backlane"
DEFAULT_CONNECT_TIMEOUT = 10
"""Seconds a connect may wait for the server (libpq's ``connect_timeout``) unless the URL
says: without one, a host that drops packets holds a connect for the operating system's
TCP timeout (about 130 s on Linux)."""
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_SECONDS = re.compile(r"[ \t\n\r\f\v]*\+?[0-9]+[ \t\n\r\f\v]*")
"""A ``connect_timeout`` as libpq reads it (ASCII digits; ``int()`` takes more)."""
_MIGRATION_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_OWN_PARAMETERS = ("schema", "auto_migrate", "pool_size", "application_name")
"""Query parameters backlane reads: each at most once."""


@dataclass(frozen=True)
class PostgresSettings:
    """What a ``postgresql://`` URL asks of the store."""

    conninfo: str
    """The URL as libpq takes it: backlane's own query parameters removed."""
    schema: str
    auto_migrate: bool
    pool_size: int
    application_name: str = "backlane"
    """How the store's sessions show in ``pg_stat_activity`` (its listener's with
    ``listen`` after it)."""
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT
    """Seconds one connect may wait for the server (libpq's ``connect_timeout``, which
    ``conninfo`` holds): the URL's, or ``DEFAULT_CONNECT_TIMEOUT``."""

    @property
    def quoted_schema(self) -> str:
        return f'"{self.schema}"'

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel on which this schema announces claimable work."""
        return f"{self.schema}.work"


def parse_url(url: str) -> PostgresSettings:
    """The settings of a ``postgresql://`` (or ``postgres://``) URL.

    backlane reads and removes three query parameters: ``schema`` (default ``backlane``;
    lower-case letters, digits and underscores), ``auto_migrate`` (default ``1``: bring
    the schema up to date at open; ``0``: only check it) and ``pool_size`` (most
    connections of one event loop, default 10). Any other parameter goes to libpq
    (``sslmode``, ...); ``application_name`` defaults to ``backlane``, and
    ``connect_timeout`` to ``DEFAULT_CONNECT_TIMEOUT`` seconds (the URL's wins; the
    ``PGCONNECT_TIMEOUT`` environment variable is not read). Raises
    ``ConfigurationError`` saying what is wrong (a bad value, or one of backlane's
    parameters given twice)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}; write postgresql://user@host/db")
    schema, auto_migrate, pool_size, application_name = DEFAULT_SCHEMA, True, 10, "backlane"
    connect_timeout: int | None = None
    rest: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OWN_PARAMETERS:
            if name in seen:  # which one was meant? (the Redis store refuses it too)
                raise ConfigurationError(f"PostgreSQL URL: it names {name} twice")
            seen.add(name)
        if name == "schema":
            schema = value
        elif name == "auto_migrate":
            if value.lower() not in (*_TRUE, *_FALSE):
                raise ConfigurationError(
                    f"PostgreSQL URL: auto_migrate must be 1 or 0, got {value!r}"
                )
            auto_migrate = value.lower() in _TRUE
        elif name == "pool_size":
            if not value.isdigit() or int(value) < 1:
                raise ConfigurationError(
                    f"PostgreSQL URL: pool_size must be a whole number above 0, got {value!r}"
                )
            pool_size = int(value)
        elif name == "application_name":
            application_name = value
        else:
            if name == "connect_timeout":  # libpq takes the last one given
                if not _SECONDS.fullmatch(value):  # what libpq reads, and no more
                    raise ConfigurationError(
                        f"PostgreSQL URL: connect_timeout must be a whole number of seconds, "
                        f"0 or more, got {value!r}"
                    )
                connect_timeout = int(value)
            rest.append((name, value))
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"PostgreSQL URL: schema {schema!r} is not a plain name; use at most 48 "
            "lower-case letters, digits and underscores, not starting with a digit"
        )
    if connect_timeout is None:
        connect_timeout = DEFAULT_CONNECT_TIMEOUT
        rest.append(("connect_timeout", str(connect_timeout)))
    base = url.split("?", 1)[0].split("#", 1)[0]  # urlunsplit would drop an empty host
    conninfo = f"{base}?{urlencode(rest)}" if rest else base
    return PostgresSettings(
        conninfo=conninfo,
        schema=schema,
        auto_migrate=auto_migrate,
        pool_size=pool_size,
        application_name=application_name,
        connect_timeout=connect_timeout,
    )


def _sql_folder() -> Traversable:
    return resources.files("backlane.stores") / "sql" / "postgres"


def render(sql: str, settings: PostgresSettings) -> str:
    """``sql`` with ``{schema}`` and ``{channel}`` filled in for ``settings``."""
    return sql.replace("{schema}", settings.quoted_schema).replace("{channel}", settings.channel)


def migrations() -> list[tuple[int, str, str]]:
    """The migrations shipped with backlane as (version, name, SQL script), in order."""
    found = []
    for entry in _sql_folder().iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            version, name = int(match.group(1)), match.group(2)
            found.append((version, name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def fresh_schema() -> str:
    """The whole current schema (``schema.sql``), as a fresh install creates it."""
    return (_sql_folder() / "schema.sql").read_text(encoding="utf-8")


def latest_version() -> int:
    return migrations()[-1][0]


@functools.cache
def queries() -> dict[str, str]:
    """The statements of ``queries.sql`` by name, with ``{schema}`` still to fill in."""
    text = (_sql_folder() / "queries.sql").read_text(encoding="utf-8")
    blocks = re.split(r"^-- name: *", text, flags=re.MULTILINE)[1:]
    return {name.strip(): body.strip() for name, _, body in (b.partition("\n") for b in blocks)}


def rendered_queries(settings: PostgresSettings) -> dict[str, str]:
    """The statements of ``queries.sql`` for the schema of ``settings``."""
    return {name: render(sql, settings) for name, sql in queries().items()}


async def migrate(conn: Any, settings: PostgresSettings) -> tuple[int, int]:
    """Bring the schema of ``settings`` to the latest version over ``conn`` (a psycopg
    ``AsyncConnection`` in autocommit mode), creating the schema if it is missing: a fresh
    schema gets ``schema.sql`` whole, an older one the migrations it lacks, all in one
    transaction. Returns (version before, version after); raises ``StoreError`` when the
    schema is newer than this backlane knows."""
    sql = rendered_queries(settings)
    latest = latest_version()
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"backlane:{settings.schema}",)
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {settings.quoted_schema}")
        await conn.execute(sql["migrations_table"])
        current = await _version(conn, sql)
        if current is not None and current > latest:
            raise _too_new(settings, current, latest)
        if current is None:
            await conn.execute(render(fresh_schema(), settings))
            for version, name, _ in migrations():
                await conn.execute(sql["record_migration"], {"version": version, "name": name})
        else:
            for version, name, script in migrations():
                if version > current:
                    await conn.execute(render(script, settings))
                    await conn.execute(sql["record_migration"], {"version": version, "name": name})
    return (current or 0, latest)


async def check_version(conn: Any, settings: PostgresSettings) -> None:
    """Make sure the schema of ``settings`` is at the latest version, changing nothing;
    raises ``StoreError`` saying how to migrate when it is missing or older, and to upgrade
    backlane when it is newer."""
    sql = rendered_queries(settings)
    latest = latest_version()
    cursor = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{settings.quoted_schema}.migrations",)
    )
    row = await cursor.fetchone()
    current = await _version(conn, sql) if row and row[0] else None
    if current is not None and current > latest:
        raise _too_new(settings, current, latest)
    if current != latest:
        found = "no backlane schema" if current is None else f"schema version {current}"
        raise StoreError(
            f"PostgreSQL store: {found} in schema {settings.schema!r}, and this backlane "
            f"needs version {latest}; run `backlane migrate --url URL` (or open the store "
            "once without auto_migrate=0)"
        )


async def _version(conn: Any, sql: dict[str, str]) -> int | None:
    cursor = await conn.execute(sql["schema_version"])
    row = await cursor.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _too_new(settings: PostgresSettings, current: int, latest: int) -> StoreError:
    return StoreError(
        f"PostgreSQL store: schema {settings.schema!r} is at version {current}, newer than "
        f"this backlane knows ({latest}); upgrade backlane"
    )
