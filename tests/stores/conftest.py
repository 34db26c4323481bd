"""The conformance suite's fixtures: every store, opened fresh for each test.

A store joins the suite by adding one factory to ``STORE_FACTORIES``: an async context
manager that yields the store, open and empty, and closes it afterwards. A store that needs
a server (Redis, PostgreSQL) calls ``require_service`` when the server cannot be reached:
the test is skipped on a laptop and fails in CI, where ``BACKLANE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from backlane.stores import store_from_url
from backlane.stores.base import Store
from backlane.stores.memory import MemoryStore
from backlane.stores.redis import RedisStore
from backlane.stores.sqlite import SQLiteStore
from tests.services import (
    require_service,  # noqa: F401 - re-exported for store test modules
    store_url,
)

StoreFactory = Callable[[Path], AbstractAsyncContextManager[Store]]


@asynccontextmanager
async def _opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def memory_store(tmp_path: Path) -> AbstractAsyncContextManager[Store]:
    return _opened(MemoryStore())


def sqlite_store(tmp_path: Path) -> AbstractAsyncContextManager[Store]:
    return _opened(SQLiteStore(f"sqlite:///{tmp_path / 'jobs.db'}"))


@asynccontextmanager
async def _server_store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    with store_url(kind, tmp_path) as url:
        async with _opened(store_from_url(url)) as opened:
            yield opened


def redis_store(tmp_path: Path) -> AbstractAsyncContextManager[Store]:
    return _server_store("redis", tmp_path)


@asynccontextmanager
async def _redis_scripts_store(tmp_path: Path) -> AsyncIterator[Store]:
    with store_url("redis", tmp_path) as url:
        store = RedisStore(url)
        store.use_functions = False  # as on Redis 6.2, which has no functions
        async with _opened(store) as opened:
            yield opened


def redis_scripts_store(tmp_path: Path) -> AbstractAsyncContextManager[Store]:
    return _redis_scripts_store(tmp_path)


def postgres_store(tmp_path: Path) -> AbstractAsyncContextManager[Store]:
    return _server_store("postgres", tmp_path)


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": memory_store,
    "sqlite": sqlite_store,
    "redis": redis_store,
    "redis-scripts": redis_scripts_store,
    "postgres": postgres_store,
}


@pytest.fixture(params=list(STORE_FACTORIES))
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """The factory of one store of the suite (the test runs once per store)."""
    factory: StoreFactory = STORE_FACTORIES[request.param]
    return factory


@pytest.fixture
async def store(store_factory: StoreFactory, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, empty store, closed after the test."""
    async with store_factory(tmp_path) as opened:
        yield opened
