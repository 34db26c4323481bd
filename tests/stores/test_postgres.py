"""What the PostgreSQL store promises beyond the contract: its URL, its schema and
migrations, claims that skip locked rows, wake-ups through LISTEN/NOTIFY, purges that
never make anyone wait, and a clean close — on the real server, never a mock."""

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from backlane.exceptions import ConfigurationError, DriverMissing, StoreError
from backlane.jobs import Job, JobState
from backlane.stores import store_from_url
from backlane.stores.base import Outcome
from backlane.stores.postgres import PostgresStore
from backlane.stores.postgres_link import Coalescer
from backlane.stores.postgres_schema import (
    PostgresSettings,
    latest_version,
    migrations,
    parse_url,
    render,
)
from tests.services import POSTGRES_URL, store_url
from tests.stores.test_contract import LEASE, NOW, make_job, outcome

pytestmark = pytest.mark.anyio

S = JobState


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A store URL whose schema is new, and dropped afterwards."""
    with store_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
def other_url(tmp_path: Path) -> Iterator[str]:
    """A second such URL, for comparisons between two schemas."""
    with store_url("postgres", tmp_path) as url:
        yield url


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def schema_of(url: str) -> str:
    return parse_url(url).schema


async def admin() -> psycopg.AsyncConnection[Any]:
    """A connection of the test's own, in autocommit mode."""
    return await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True)


async def scalar(sql: str, *params: Any) -> Any:
    async with await admin() as conn:
        row = await (await conn.execute(sql, params or None)).fetchone()
        assert row is not None
        return row[0]


# -- the URL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "schema", "auto_migrate", "pool_size", "conninfo"),
    [
        ("postgresql://u@h/db", "backlane", True, 10, "postgresql://u@h/db?connect_timeout=10"),
        (
            "postgres://u@h:5433/db?schema=jobs_1",
            "jobs_1",
            True,
            10,
            "postgres://u@h:5433/db?connect_timeout=10",
        ),
        (
            "postgresql://u:pw@h/db?sslmode=require&auto_migrate=0&pool_size=3",
            "backlane",
            False,
            3,
            "postgresql://u:pw@h/db?sslmode=require&connect_timeout=10",
        ),
        (
            "postgresql:///db?auto_migrate=off&schema=_x",
            "_x",
            False,
            10,
            "postgresql:///db?connect_timeout=10",
        ),
    ],
)
def test_the_url_names_schema_migration_and_pool(
    url: str, schema: str, auto_migrate: bool, pool_size: int, conninfo: str
) -> None:
    settings = parse_url(url)
    assert (settings.schema, settings.auto_migrate, settings.pool_size) == (
        schema,
        auto_migrate,
        pool_size,
    )
    assert settings.conninfo == conninfo  # backlane's parameters are not libpq's
    assert settings.channel == f"{schema}.work"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://h/db?schema=Jobs", "not a plain name"),
        ("postgresql://h/db?schema=drop%20table", "not a plain name"),
        ("postgresql://h/db?schema=jobs%0A", "not a plain name"),  # re.match's $ let it by
        ("postgresql://h/db?schema=" + "x" * 49, "not a plain name"),
        ("postgresql://h/db?auto_migrate=maybe", "auto_migrate must be 1 or 0"),
        ("postgresql://h/db?pool_size=0", "pool_size must be a whole number above 0"),
        ("postgresql://h/db?schema=jobs&schema=other", "names schema twice"),
        ("postgresql://h/db?auto_migrate=0&auto_migrate=1", "names auto_migrate twice"),
        ("postgresql://h/db?connect_timeout=soon", "connect_timeout must be a whole number"),
        # int() takes these, and libpq reads them otherwise or not at all
        ("postgresql://h/db?connect_timeout=1_000", "connect_timeout must be a whole number"),
        ("postgresql://h/db?connect_timeout=%D9%A3", "connect_timeout must be a whole number"),
        ("postgresql://h/db?connect_timeout=-5", "connect_timeout must be a whole number"),
        ("mysql://h/db", "not a PostgreSQL URL"),
    ],
)
def test_a_bad_url_is_refused_with_the_reason(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        parse_url(url)


def test_connects_wait_10_s_at_most_unless_the_url_says() -> None:
    """libpq's own default is no timeout (the OS's, about 130 s against a host that drops
    packets); the store's is 10 s, and a ``connect_timeout`` in the URL wins."""
    default = parse_url("postgresql://u@h/db")
    assert default.connect_timeout == 10
    assert conninfo_to_dict(default.conninfo)["connect_timeout"] == "10"
    own = parse_url("postgresql://u@h/db?connect_timeout=3&sslmode=disable")
    assert own.connect_timeout == 3
    assert conninfo_to_dict(own.conninfo) == {
        "user": "u",
        "host": "h",
        "dbname": "db",
        "connect_timeout": "3",
        "sslmode": "disable",
    }


async def test_a_server_that_is_not_there_is_a_store_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreError, match="connection") as caught:
        await store.open()
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    with pytest.raises(StoreError, match="not open"):
        await store.counts()


async def test_a_store_not_open_or_closed_says_so(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    with pytest.raises(StoreError, match="not open"):
        await store.counts()
    with pytest.raises(StoreError, match="not open"):
        await store.enqueue([make_job()], connection=object())
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get("x")


# -- schema and migrations -----------------------------------------------------------------


async def test_every_table_lives_in_the_schema_the_url_names(store: PostgresStore) -> None:
    schema = store.settings.schema
    async with await admin() as conn:
        rows = await (
            await conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_name IN ('jobs', 'schedules', 'paused_queues', 'workers', "
                "'migrations') AND table_schema IN (%s, 'public') ORDER BY table_name",
                (schema,),
            )
        ).fetchall()
        assert rows == [
            (schema, "jobs"),
            (schema, "migrations"),
            (schema, "paused_queues"),
            (schema, "schedules"),
            (schema, "workers"),
        ]
        applied = await (
            await conn.execute(f'SELECT version, name FROM "{schema}".migrations ORDER BY 1')
        ).fetchall()
    assert applied == [(version, name) for version, name, _ in migrations()]


_CATALOG = {
    "columns": """
        SELECT table_name, ordinal_position, column_name, data_type, udt_name,
               is_nullable, column_default, is_identity, identity_generation
        FROM information_schema.columns WHERE table_schema = %(schema)s
        ORDER BY table_name, ordinal_position""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE k.connamespace = %(schema)s::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = %(schema)s ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = %(schema)s::regnamespace AND NOT t.tgisinternal
        ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p
        WHERE p.pronamespace = %(schema)s::regnamespace ORDER BY 1""",
    "relations": """
        SELECT relname, relkind, relpersistence, reloptions FROM pg_class
        WHERE relnamespace = %(schema)s::regnamespace ORDER BY 1""",
}


async def catalog(schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the catalogs say about ``schema``, with its name written as SCHEMA."""
    dump: dict[str, list[tuple[Any, ...]]] = {}
    async with await admin() as conn:
        for part, sql in _CATALOG.items():
            rows = await (await conn.execute(sql, {"schema": schema})).fetchall()
            text = json.dumps([list(row) for row in rows], default=str)
            dump[part] = json.loads(text.replace(schema, "SCHEMA"))
    return dump


async def install_old(url: str, upto: int) -> None:
    """The schema of ``url`` as a backlane that knew migrations up to ``upto`` left it."""
    settings = parse_url(url)
    async with await admin() as conn:
        await conn.execute(f"CREATE SCHEMA {settings.quoted_schema}")
        await conn.execute(
            f"CREATE TABLE {settings.quoted_schema}.migrations (version integer PRIMARY "
            "KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, name, script in migrations():
            if version <= upto:
                await conn.execute(render(script, settings))
                await conn.execute(
                    f"INSERT INTO {settings.quoted_schema}.migrations VALUES (%s, %s)",
                    (version, name),
                )


async def test_every_migration_path_builds_the_schema_of_a_fresh_install(
    pg_url: str, other_url: str
) -> None:
    fresh = PostgresStore(pg_url)
    assert await fresh.migrate() == (0, latest_version())
    expected = await catalog(schema_of(pg_url))
    assert expected["columns"] and expected["triggers"] and expected["functions"]
    for start in range(1, latest_version()):
        async with await admin() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_of(other_url)}" CASCADE')
        await install_old(other_url, upto=start)
        assert await PostgresStore(other_url).migrate() == (start, latest_version())
        assert await catalog(schema_of(other_url)) == expected, f"migrating from {start}"


async def test_a_schema_left_by_an_older_backlane_is_migrated_at_open_keeping_its_jobs(
    pg_url: str,
) -> None:
    await install_old(pg_url, upto=1)
    schema = schema_of(pg_url)
    async with await admin() as conn:
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, payload, queue, state, run_at, '
            "created_at) VALUES ('old', 't', '[]', 'default', 'queued', %s, %s)",
            (NOW, NOW),
        )
    store = PostgresStore(pg_url)
    await store.open()
    try:
        assert await store.migrate(check=True) == (latest_version(), latest_version())
        old = await store.get("old")
        assert old is not None and old.state is S.QUEUED and old.meta == {}
        assert [job.id for job in await store.claim(
            worker_id="w", queues=None, limit=5, now=NOW, lease_until=NOW + LEASE
        )] == ["old"]  # fmt: skip
        await store.pause_queue("default", True)  # a table of migration 2
        assert await store.paused_queues() == {"default"}
    finally:
        await store.close()


async def test_with_auto_migrate_0_open_only_checks_and_says_how_to_migrate(
    pg_url: str,
) -> None:
    checking = PostgresStore(pg_url + "&auto_migrate=0")
    with pytest.raises(StoreError, match="no backlane schema.*backlane migrate"):
        await checking.open()
    assert await scalar("SELECT to_regnamespace(%s) IS NULL", schema_of(pg_url))  # untouched
    await install_old(pg_url, upto=1)
    with pytest.raises(StoreError, match="schema version 1.*backlane migrate"):
        await checking.open()
    with pytest.raises(StoreError, match="schema version 1"):
        await checking.migrate(check=True)
    assert await checking.migrate() == (1, latest_version())
    await checking.open()
    try:
        assert await checking.counts() == {}
    finally:
        await checking.close()


async def test_a_schema_from_a_newer_backlane_is_refused(store: PostgresStore, pg_url: str) -> None:
    await scalar(
        f'INSERT INTO "{schema_of(pg_url)}".migrations VALUES (999, %s) RETURNING 1', "future"
    )
    for url in (pg_url, pg_url + "&auto_migrate=0"):
        with pytest.raises(StoreError, match="version 999, newer .* upgrade backlane"):
            await PostgresStore(url).open()


def test_stores_opening_at_once_on_a_new_schema_migrate_it_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    start = threading.Barrier(len(stores))

    def open_and_count(store: PostgresStore) -> dict[str, dict[JobState, int]]:
        async def run() -> dict[str, dict[JobState, int]]:
            start.wait()
            await store.open()
            try:
                await store.enqueue([make_job()])
                return await store.counts()
            finally:
                await store.close()

        return asyncio.run(run())

    with ThreadPoolExecutor(max_workers=len(stores)) as pool:
        seen = list(pool.map(open_and_count, stores))
    assert all(1 <= counts["default"][S.QUEUED] <= 4 for counts in seen)
    versions = anyio.run(
        scalar, f'SELECT array_agg(version ORDER BY version) FROM "{schema_of(pg_url)}".migrations'
    )
    assert versions == [version for version, _, _ in migrations()]


# -- one store, many loops and threads -------------------------------------------------------


def test_one_store_serves_several_event_loops_in_turn(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    job = make_job()
    asyncio.run(store.open())
    asyncio.run(store.enqueue([job]))
    assert asyncio.run(store.get(job.id)) == job
    asyncio.run(store.close())


def test_several_threads_opening_at_once_share_one_listener(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    loops = f"backlane-postgres-{store.settings.schema}"

    async def use(n: int) -> int:
        await store.open()
        await store.enqueue([make_job(task=f"t{n}")])
        return len(await store.list_jobs(limit=100))

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            seen = list(pool.map(lambda n: asyncio.run(use(n)), range(4)))
        assert sum(thread.name == loops for thread in threading.enumerate()) == 1
    finally:
        asyncio.run(store.close())
    assert all(1 <= n <= 4 for n in seen)
    assert not any(thread.name == loops for thread in threading.enumerate())


def test_a_loop_that_ends_first_closes_its_connections_and_does_not_hang(pg_url: str) -> None:
    name = f"bl-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{pg_url}&application_name={name}")
    asyncio.run(store.open())

    async def busy() -> None:  # several statements at once: several connections
        await asyncio.gather(*(store.counts() for _ in range(6)))

    try:
        for _ in range(3):
            thread = threading.Thread(target=asyncio.run, args=(busy(),))
            thread.start()
            thread.join(timeout=20)
            assert not thread.is_alive(), "asyncio.run did not return"
        left = asyncio.run(
            scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND backend_type = 'client backend'",
                name,
            )
        )
        assert left == 0  # the listener goes by "<name> listen"
    finally:
        asyncio.run(store.close())


# -- claims ----------------------------------------------------------------------------------


async def test_claim_skips_rows_another_session_holds_without_waiting(
    store: PostgresStore,
) -> None:
    held, free = await store.enqueue([make_job(priority=9), make_job()])
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as other:
        await other.execute(
            f'SELECT 1 FROM "{store.settings.schema}".jobs WHERE id = %s FOR UPDATE', (held.id,)
        )
        began = time.monotonic()
        claimed = await store.claim(
            worker_id="w1", queues=None, limit=5, now=NOW, lease_until=NOW + LEASE
        )
        assert time.monotonic() - began < 1.0
        assert [job.id for job in claimed] == [free.id]
        queued = await store.claim(
            worker_id="w1", queues=["default"], limit=5, now=NOW, lease_until=NOW + LEASE
        )
        assert queued == []  # the per-queue claim skips it too
        await other.rollback()
    again = await store.claim(worker_id="w2", queues=None, limit=5, now=NOW, lease_until=NOW + 1)
    assert [job.id for job in again] == [held.id]


@pytest.mark.parametrize(
    ("query", "index"),
    [("claim_any", "jobs_claimable_any"), ("claim_queues", "jobs_claimable on")],
)
async def test_claims_read_their_partial_index_in_claim_order(
    store: PostgresStore, query: str, index: str
) -> None:
    """With a backlog in three queues and ten times as many ended jobs, each claim walks
    its index in claim order and stops at the limit: no scan of the table, no sort of the
    backlog (the cost a million ended rows would otherwise add)."""
    schema = store.settings.schema
    params = {"now": NOW, "limit": 10, "lease_until": NOW, "worker_id": "w", "queues": ["q1"]}
    async with await admin() as conn:
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, payload, queue, state, run_at, '
            "created_at, finished_at) SELECT 'j' || g, 't', '{}', 'q' || g %% 3, "
            "CASE WHEN g %% 10 = 0 THEN 'queued' ELSE 'succeeded' END, %(now)s - g, "
            "%(now)s, %(now)s FROM generate_series(1, 30000) AS g",
            params,
        )
        await conn.execute(f'ANALYZE "{schema}".jobs')
        sql = store._sql[query]  # the statement the store runs
        rows = await (await conn.execute("EXPLAIN " + sql, params)).fetchall()
    plan = "\n".join(row[0] for row in rows)
    assert f"Index Scan using {index}" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan
    locked = plan.split("LockRows")[1].splitlines()[1]
    assert "Index Scan using jobs_claimable" in locked, plan  # in index order, unsorted


@pytest.mark.slow
def test_processes_sharing_a_schema_never_claim_a_job_twice(pg_url: str) -> None:
    jobs = [make_job() for _ in range(600)]

    async def setup() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        await store.enqueue(jobs)
        await store.close()

    anyio.run(setup)
    start_at = time.time() + 1.5
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, pg_url, f"w{n}", str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in range(3)
    ]
    claimed_by: list[list[str]] = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        claimed_by.append(json.loads(out))
    claimed = [job_id for ids in claimed_by for job_id in ids]
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert set(claimed) == {job.id for job in jobs}
    assert sum(1 for ids in claimed_by if ids) >= 2, "the processes did not overlap"


_CLAIMER = """
import asyncio, json, random, sys, time
from backlane.jobs import JobState
from backlane.stores import store_from_url
from backlane.stores.base import Outcome
from backlane.stores.postgres import PostgresStore

async def main(url, worker, start_at):
    store = PostgresStore(url)
    await store.open()
    claimed = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    while jobs := await store.claim(worker_id=worker, queues=None, limit=random.randint(1, 3),
                                    now=1_700_000_000.0, lease_until=1_700_003_600.0):
        claimed += [job.id for job in jobs]
        await store.finish([Outcome(job_id=job.id, worker_id=worker,
                                    state=JobState.SUCCEEDED, finished_at=1.0) for job in jobs])
    await store.close()
    print(json.dumps(claimed))

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


# -- wake-ups --------------------------------------------------------------------------------


async def woken_within(store: PostgresStore, timeout: float = 5.0) -> float:
    """How long ``wait_for_work`` took to return (``timeout`` when nothing woke it)."""
    began = time.monotonic()
    await store.wait_for_work(timeout)
    return time.monotonic() - began


async def quiet(store: PostgresStore) -> None:
    """Let the announcements made so far go by: return after 0.3 s without one."""
    with anyio.fail_after(10):
        while await woken_within(store, 0.3) < 0.3:
            pass


async def listening(store: PostgresStore) -> None:
    with anyio.fail_after(10):
        while not store.listening:
            await anyio.sleep(0.01)


@pytest.fixture
async def elsewhere(pg_url: str, store: PostgresStore) -> AsyncIterator[PostgresStore]:
    """A second store on the same schema, as another process would have."""
    other = PostgresStore(pg_url)
    await other.open()
    await listening(store)
    try:
        yield other
    finally:
        await other.close()


async def after(delay: float, action: Any, *args: Any) -> None:
    await anyio.sleep(delay)
    await action(*args)


async def test_work_enqueued_elsewhere_wakes_a_waiting_store_at_once(
    store: PostgresStore, elsewhere: PostgresStore
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(after, 0.2, elsewhere.enqueue, [make_job()])
        took = await woken_within(store)
    assert 0.15 < took < 1.0


@pytest.mark.parametrize("change", ["release", "retry", "finish-frees-next", "hand_back",
                                    "lease-expired", "finish-retry-due"])  # fmt: skip
async def test_every_change_that_makes_work_claimable_wakes_waiters(
    store: PostgresStore, elsewhere: PostgresStore, change: str
) -> None:
    first = make_job(state=S.DEFERRED if change == "release" else S.QUEUED, run_at=time.time())
    then = make_job(after=first.id, run_at=time.time())
    await elsewhere.enqueue([first, then])
    now = time.time()
    if change != "release":
        await elsewhere.claim(worker_id="w", queues=None, limit=1, now=now, lease_until=now + 1)
    if change == "retry":
        await elsewhere.finish([outcome(first.id, S.FAILED, "w")])
    await quiet(store)
    actions: dict[str, Any] = {
        "release": (elsewhere.release, [first.id]),
        "retry": (elsewhere.retry, first.id, time.time()),
        "finish-frees-next": (elsewhere.finish, [outcome(first.id, S.SUCCEEDED, "w")]),
        "hand_back": (lambda: elsewhere.hand_back(worker_id="w", ids=[first.id]),),
        "lease-expired": (elsewhere.requeue_expired, now + 2),
        "finish-retry-due": (
            elsewhere.finish,
            [outcome(first.id, S.QUEUED, "w", run_at=time.time())],
        ),
    }
    async with anyio.create_task_group() as tg:
        tg.start_soon(after, 0.2, *actions[change])
        took = await woken_within(store)
    assert took < 1.0, f"{change} did not wake the waiter"


async def test_work_announced_since_the_last_claim_returns_at_once(
    store: PostgresStore, elsewhere: PostgresStore
) -> None:
    assert await store.claim(worker_id="w", queues=None, limit=1, now=NOW, lease_until=NOW) == []
    await elsewhere.enqueue([make_job()])
    await anyio.sleep(0.3)  # the announcement arrives while nobody waits
    assert await woken_within(store) < 0.05

    async def child_waits() -> float:  # a task started after the claim sees its mark
        return await woken_within(store)

    await store.claim(worker_id="w", queues=None, limit=0, now=NOW, lease_until=NOW)
    await elsewhere.enqueue([make_job()])
    await anyio.sleep(0.3)
    async with anyio.create_task_group() as tg:
        took: list[float] = []

        async def record() -> None:
            took.append(await child_waits())

        tg.start_soon(record)
    assert took[0] < 0.05


async def test_nothing_to_claim_means_no_wake_up(
    store: PostgresStore, elsewhere: PostgresStore
) -> None:
    later = make_job(run_at=time.time() + 60)
    running = make_job(run_at=time.time())
    await elsewhere.enqueue([running])
    await elsewhere.claim(worker_id="w", queues=None, limit=1, now=time.time(), lease_until=NOW)
    await quiet(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(elsewhere.enqueue, [later])  # due in a minute: the poll finds it
        tg.start_soon(functools.partial(elsewhere.set_progress, running.id, worker_id="w",
                                        progress=0.5, message=None))  # fmt: skip
        assert await woken_within(store, 0.5) >= 0.45


@pytest.mark.parametrize("queues", [None, ["default"]])
async def test_a_wait_after_a_claim_ends_when_the_earliest_later_job_is_due(
    store: PostgresStore, queues: list[str] | None
) -> None:
    await listening(store)
    now = time.time()
    await store.enqueue([make_job(run_at=now + 1.0, priority=1), make_job(run_at=now + 0.8),
                         make_job(run_at=now + 60, priority=-1),
                         make_job(run_at=now + 0.3, queue="other")])  # fmt: skip
    await store.pause_queue("other", True)  # its job is not for this claim
    await anyio.sleep(0.2)  # the announcements go by before the claim
    claimed = await store.claim(
        worker_id="w", queues=queues, limit=5, now=time.time(), lease_until=now + 60
    )
    assert claimed == []
    await woken_within(store)
    assert 0.75 < time.time() - now < 1.1  # when the job due in 0.8 s is, not the timeout


async def test_work_due_later_announced_while_waiting_ends_the_wait_when_due(
    store: PostgresStore, elsewhere: PostgresStore
) -> None:
    await store.claim(worker_id="w", queues=None, limit=1, now=time.time(), lease_until=NOW)
    await quiet(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(after, 0.1, elsewhere.enqueue, [make_job(run_at=time.time() + 1.5)])
        began = time.monotonic()
        waited = await woken_within(store)
    assert 1.4 < time.monotonic() - began < 1.9, waited  # beyond a second: announced too


async def test_work_in_a_callers_transaction_is_announced_at_commit_only(
    store: PostgresStore,
) -> None:
    await listening(store)
    await quiet(store)
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
        await store.enqueue([make_job()], connection=conn)
        assert await woken_within(store, 0.4) >= 0.35  # not yet: uncommitted
        await conn.rollback()
        assert await woken_within(store, 0.4) >= 0.35  # never: rolled back
        await store.enqueue([make_job()], connection=conn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(after, 0.2, conn.commit)
            assert await woken_within(store) < 1.0


async def test_listening_comes_back_after_the_connection_is_killed(
    store: PostgresStore, elsewhere: PostgresStore
) -> None:
    listeners = (
        "SELECT coalesce(array_agg(pid ORDER BY pid), '{}') FROM pg_stat_activity "
        "WHERE application_name = 'backlane listen' AND query = %s"
    )
    listen = f'LISTEN "{store.settings.channel}"'
    with anyio.fail_after(10):  # each store starts listening in the background on open
        while len(killed := await scalar(listeners, listen)) < 2:
            await anyio.sleep(0.02)
    assert len(killed) == 2  # both stores' listeners
    await scalar(f"SELECT count(pg_terminate_backend(pid)) FROM ({listeners}) AS l(pids), "
                 "unnest(l.pids) AS pid", listen)  # fmt: skip
    with anyio.fail_after(10):
        while not (set(await scalar(listeners, listen)) - set(killed)) or not store.listening:
            await anyio.sleep(0.02)
    await quiet(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(after, 0.2, elsewhere.enqueue, [make_job()])
        took = await woken_within(store)
    assert took < 1.0


@pytest.mark.parametrize("column", ["meta", "error", "attempt_history"])
async def test_a_json_column_holding_a_json_string_does_not_stop_claims(
    store: PostgresStore, column: str
) -> None:
    # written by hand or by another program: the claim must still hand out its jobs, and
    # the job must still read (psycopg gives a jsonb string as a str, not as JSON text)
    odd, plain = await store.enqueue([make_job(), make_job()])
    jobs = f"{store.settings.quoted_schema}.jobs"
    await scalar(f"UPDATE {jobs} SET {column} = %s WHERE id = %s RETURNING 1", '"odd"', odd.id)
    claimed = await store.claim(worker_id="w", queues=None, limit=5, now=NOW, lease_until=NOW)
    assert [job.id for job in claimed] == [odd.id, plain.id]
    held = await store.get(odd.id)
    assert held is not None and held.state is S.RUNNING
    assert {job.id for job in await store.list_jobs()} == {odd.id, plain.id}


@pytest.mark.parametrize("odd", ["\x00", "\udcff"], ids=["NUL", "lone surrogate"])
async def test_text_postgresql_cannot_hold_matches_nothing_and_names_no_job(
    store: PostgresStore, odd: str
) -> None:
    # a search typed into the dashboard's URL (text=%00), an id from a script: no
    # PostgreSQL text holds one, so nothing stored does (arguments are JSON, which escapes)
    (job,) = await store.enqueue([make_job(payload='{"args":["a\\u0000b"]}')])
    for text in (odd, f"a{odd}b"):
        assert await store.list_jobs(text=text) == []
    assert await store.list_jobs(task=f"tests:noop{odd}") == []
    assert await store.list_jobs(queue=f"default{odd}", state=S.QUEUED) == []
    assert await store.get(job.id + odd) is None
    assert await store.cancel(job.id + odd, NOW) is None
    assert await store.retry(job.id + odd, NOW) is False
    assert await store.delete([job.id + odd, job.id]) == 1
    with pytest.raises(StoreError, match="PostgreSQL"):  # not stored: said as a store error
        await store.enqueue([make_job(key=f"k{odd}")])


@pytest.mark.parametrize("field", ["key", "queue"])
async def test_a_key_or_queue_too_long_to_index_is_refused_naming_it(
    store: PostgresStore, field: str
) -> None:
    too_long = os.urandom(6000).hex()  # incompressible: PostgreSQL cannot index it
    with pytest.raises(StoreError, match="idempotency key or a queue name that long"):
        await store.enqueue([make_job(**{field: too_long})])
    assert await store.counts() == {}


async def test_connections_the_server_ended_while_idle_are_not_used_again(
    pg_url: str,
) -> None:
    # a server restart, a failover, idle_session_timeout or a DBA's pg_terminate_backend:
    # the next verbs must not fail for a connection that was dead before they began
    name = f"bl-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{pg_url}&application_name={name}")
    await store.open()
    try:
        await asyncio.gather(*(store.counts() for _ in range(3)))  # a few idle connections
        sessions = "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = %s"
        pids = await scalar(sessions, name)
        assert pids
        await scalar("SELECT count(pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid", pids)
        with anyio.fail_after(10):
            while set(await scalar(sessions, name) or ()) & set(pids):
                await anyio.sleep(0.02)
        (job,) = await store.enqueue([make_job()])
        assert await store.get(job.id) == job
        assert await store.cancel(job.id, NOW) is S.CANCELLED
        assert await store.counts() == {"default": {S.CANCELLED: 1}}
    finally:
        await store.close()


# -- growth, and leaving nothing behind ---------------------------------------------------


async def test_purge_skips_rows_another_session_holds_and_never_waits(
    store: PostgresStore,
) -> None:
    jobs = await store.enqueue([make_job() for _ in range(30)])
    claimed = await store.claim(worker_id="w", queues=None, limit=30, now=NOW, lease_until=NOW)
    await store.finish([outcome(job.id, S.SUCCEEDED, "w", keep_until=NOW) for job in claimed])
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as other:
        await other.execute(
            f'SELECT 1 FROM "{store.settings.schema}".jobs WHERE id = %s FOR UPDATE',
            (jobs[0].id,),
        )
        began = time.monotonic()
        assert await store.purge(before=NOW + 1) == 29
        assert time.monotonic() - began < 1.0
    assert await store.purge(before=NOW + 1) == 1


async def test_close_lets_a_verb_in_flight_end_its_transaction(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    job = (await store.enqueue([make_job()]))[0]
    schema = store.settings.schema
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as other:
        await other.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE', (job.id,))
        with anyio.move_on_after(0.3):  # the caller gives up; the cancel waits for the lock
            await store.cancel(job.id, NOW)
        async with anyio.create_task_group() as tg:
            tg.start_soon(after, 0.3, other.commit)
            await store.close()  # waits for the cancel to commit, then closes its connection
    left = await scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'backlane%%' "
        "AND state LIKE 'idle in transaction%%'"
    )
    assert left == 0
    state = await scalar(f'SELECT state FROM "{schema}".jobs WHERE id = %s', job.id)
    assert state == "cancelled"  # the verb ran to its end although its caller had left


async def test_finish_applies_the_first_outcome_of_the_holder_only(store: PostgresStore) -> None:
    (job,) = await store.enqueue([make_job()])
    await store.claim(worker_id="w1", queues=None, limit=1, now=NOW, lease_until=NOW + LEASE)
    outcomes = [
        Outcome(job_id=job.id, worker_id="w2", state=S.FAILED, finished_at=NOW),
        Outcome(job_id=job.id, worker_id="w1", state=S.SUCCEEDED, finished_at=NOW, result="1"),
        Outcome(job_id=job.id, worker_id="w1", state=S.FAILED, finished_at=NOW),
    ]
    assert await store.finish(outcomes) == [job.id]
    stored = await store.get(job.id)
    assert stored is not None and (stored.state, stored.result) == (S.SUCCEEDED, "1")


def test_settings_are_frozen() -> None:
    settings = parse_url("postgresql://h/db")
    assert isinstance(settings, PostgresSettings)
    with pytest.raises(AttributeError):
        settings.schema = "other"  # type: ignore[misc]


async def test_store_error_names_the_schema_to_migrate(store: PostgresStore) -> None:
    job = Job(task="t", payload="{}", created_at=NOW, run_at=NOW)
    elsewhere = POSTGRES_URL.rpartition("/")[0] + "/postgres"
    async with await psycopg.AsyncConnection.connect(elsewhere) as conn:
        with pytest.raises(StoreError, match=f"schema '{store.settings.schema}' migrated"):
            await store.enqueue([job], connection=conn)


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith("backlane.stores.postgres"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(DriverMissing, match=r"pip install 'backlane\[postgres\]'"):
        store_from_url("postgresql://postgres@127.0.0.1/test")


# -- group commit ----------------------------------------------------------------------------


async def test_enqueues_of_one_loop_turn_share_a_statement_and_fail_alone(
    store: PostgresStore,
) -> None:
    (taken,) = await store.enqueue([make_job()])
    fine = [make_job(task="a"), make_job(task="b")]
    clash = make_job(task="c")
    clash.id = taken.id  # a repeated id fails the joint statement, then this caller alone
    also_fine = make_job(task="d")
    results = await asyncio.gather(
        store.enqueue(fine),
        store.enqueue([clash]),
        store.enqueue([also_fine]),
        return_exceptions=True,
    )
    assert [job.id for job in results[0]] == [job.id for job in fine]  # type: ignore[union-attr]
    assert isinstance(results[1], StoreError)
    assert [job.id for job in results[2]] == [also_fine.id]  # type: ignore[union-attr]
    stored = {job.task for job in await store.list_jobs(limit=10)}
    assert stored == {taken.task, "a", "b", "d"}


async def test_calls_of_one_loop_turn_run_as_one() -> None:
    runs: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        runs.append(items)
        if 13 in items:
            raise ValueError("unlucky")
        return [2 * item for item in items]

    coalescer: Coalescer[int, int] = Coalescer(double)
    results = await asyncio.gather(
        coalescer.submit([1, 2]),
        coalescer.submit([13]),
        coalescer.submit([3]),
        return_exceptions=True,
    )
    assert results[0] == [2, 4] and results[2] == [6]
    assert isinstance(results[1], ValueError)
    assert runs == [[1, 2, 13, 3], [1, 2], [13], [3]]  # together, then alone after a failure
    assert await coalescer.submit([5]) == [10]  # a later turn: a run of its own
    assert runs[-1] == [5]
