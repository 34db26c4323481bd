"""Where the tests find real servers, and how each test gets a namespace of its own.

Redis and PostgreSQL are used for real (never mocked). A test whose server is missing is
skipped on a laptop and fails in CI, where ``BACKLANE_REQUIRE_SERVICES=1``.

URLs: ``BACKLANE_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``) and
``BACKLANE_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``). Each
test gets a fresh key prefix (``?prefix=``) or schema (``?schema=``), removed afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("BACKLANE_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("BACKLANE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ("memory", "sqlite", "redis", "postgres")


def require_service(name: str, reason: str) -> NoReturn:
    """Give up on a test whose server is missing: skip it, or fail it when the environment
    says services are required (``BACKLANE_REQUIRE_SERVICES=1``, as in CI)."""
    if os.environ.get("BACKLANE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required (BACKLANE_REQUIRE_SERVICES=1) but {reason}")
    pytest.skip(f"{name} is not available: {reason}")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def _built(module: str) -> bool:
    return importlib.util.find_spec(f"backlane.stores.{module}") is not None


@contextmanager
def store_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """A URL for a fresh, empty store of ``kind``; its data is removed afterwards."""
    if kind == "memory":
        yield "memory://"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    elif kind == "redis":
        if not _built("redis"):
            pytest.skip("the Redis store is not built yet")
        if not _reachable(REDIS_URL, 6379):
            require_service("Redis", f"nothing answers at {REDIS_URL}")
        prefix = f"bltest:{uuid.uuid4().hex[:12]}:"
        try:
            yield f"{REDIS_URL}?prefix={prefix}"
        finally:
            _drop_redis_prefix(prefix)
    elif kind == "postgres":
        if not _built("postgres"):
            pytest.skip("the PostgreSQL store is not built yet")
        if not _reachable(POSTGRES_URL, 5432):
            require_service("PostgreSQL", f"nothing answers at {POSTGRES_URL}")
        schema = f"bltest_{uuid.uuid4().hex[:12]}"
        try:
            yield f"{POSTGRES_URL}?schema={schema}"
        finally:
            _drop_postgres_schema(schema)
    else:
        raise ValueError(f"unknown store kind {kind!r}")


def _drop_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


def _drop_postgres_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def postgres_schema_exists(schema: str) -> bool:
    """Whether the PostgreSQL test database has a schema named ``schema``."""
    import psycopg

    with psycopg.connect(POSTGRES_URL) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
        return bool(row and row[0])
