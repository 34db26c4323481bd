"""How the PostgreSQL store connects: a refusal (no such database) fails at once and an
outage (starting up, shutting down, no answer) is waited for, whatever the language of the
server's messages; and a host that never answers costs ``connect_timeout``, not the
operating system's TCP timeout.

The language tests run a PostgreSQL server of their own (``initdb`` in a temporary
directory) whose messages are in Russian: the shared test server's are in English, and
``lc_messages`` cannot be changed for the messages a server sends before a session exists.
They are skipped where the server's programs or its Russian messages are not installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import psycopg
import pytest

from backlane.exceptions import StoreError
from backlane.stores.postgres import PostgresStore
from tests.services import POSTGRES_URL

pytestmark = pytest.mark.anyio


def _server_programs() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl``, if this machine has them."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        folder = found.stdout.strip()
        if found.returncode == 0 and os.path.exists(os.path.join(folder, "initdb")):
            return folder
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return os.path.dirname(initdb)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PASSWORD_ROLE = "backlane_pw"
"""A role of the test's server that must give a password."""


@dataclass
class Cluster:
    """A PostgreSQL server of the test's own, speaking Russian."""

    bindir: str
    data: str
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, os.path.join(self.bindir, "pg_ctl"), "-D", self.data, *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        # lc_messages C.UTF-8 (not "C") lets gettext follow LANGUAGE, set for the server
        # only: no other locale need be installed.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
            f"{self.data} -c lc_messages=C.UTF-8 -c fsync=off"
        )
        self.pg_ctl("-o", options, "-l", os.path.join(self.data, "log"), "-w", "start")


@pytest.fixture(scope="module")
def russian() -> Iterator[Cluster]:
    bindir = _server_programs()
    if bindir is None:
        pytest.skip("needs PostgreSQL's server programs (initdb, pg_ctl) to run a server")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run a server")
        as_user = ["runuser", "-u", "postgres", "--", "env", "LANGUAGE=ru"]
    else:
        as_user = ["env", "LANGUAGE=ru"]
    home = tempfile.mkdtemp(prefix="backlane-pg-")
    data = os.path.join(home, "data")
    if as_user[0] == "runuser":
        os.chown(home, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(bindir, data, _free_port(), as_user)
    try:
        initdb = [os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres"]
        subprocess.run([*as_user, *initdb, "--no-sync"], check=True, capture_output=True)
        hba = os.path.join(data, "pg_hba.conf")
        with open(hba, encoding="utf-8") as rules:
            trusting = rules.read()
        with open(hba, "w", encoding="utf-8") as rules:  # the first rule that fits decides
            rules.write(f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n{trusting}")
        cluster.start()
        with psycopg.connect(cluster.url, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'secret'")
        try:
            psycopg.connect(cluster.url.replace("/postgres", "/no_such_database"))
        except psycopg.OperationalError as exc:
            if "FATAL" in str(exc):
                pytest.skip("this PostgreSQL has no Russian messages installed")
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


async def test_a_refusal_in_another_language_fails_at_once(russian: Cluster) -> None:
    """The server says "ВАЖНО:  база данных ... не существует": no English word to match,
    yet a refusal all the same, and no outage to wait out."""
    store = PostgresStore(russian.url.replace("/postgres", "/no_such_database_backlane"))
    started = time.monotonic()
    with pytest.raises(StoreError, match="no_such_database_backlane") as caught:
        await store.open()
    assert time.monotonic() - started < 1.5
    assert "FATAL" not in str(caught.value)  # the message really is not in English


async def test_a_password_the_url_does_not_give_fails_at_once(
    russian: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server asks for a password and libpq has none ("fe_sendauth: no password
    supplied", libpq's own words, no error from the server): a refusal too."""
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    store = PostgresStore(russian.url.replace("postgres@", f"{PASSWORD_ROLE}@"))
    started = time.monotonic()
    with pytest.raises(StoreError, match="password"):
        await store.open()
    assert time.monotonic() - started < 1.5


async def test_a_server_shutting_down_in_another_language_is_waited_for(
    russian: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server shutting down (SQLSTATE 57P03, "система баз данных останавливается") is
    an outage: the store tries again for a few seconds before giving up."""
    holder = psycopg.connect(russian.url)  # keeps a smart shutdown from ending
    try:
        russian.pg_ctl("-m", "smart", "-W", "stop")
        for _ in range(100):  # until the server turns new sessions away
            if psycopg.pq.PGconn.ping(russian.url.encode()) == psycopg.pq.Ping.REJECT:
                break
            await anyio.sleep(0.05)
        else:
            pytest.fail("the server did not start shutting down")
        caught = await _waited_for(PostgresStore(russian.url))
        assert "FATAL" not in str(caught)
        # A failover list: this server shutting down, the next one answering but turned
        # away by libpq itself (not read-only). That is the failover retries exist for;
        # the ping, which the second server answers, once made it a refusal at once.
        other = urlsplit(POSTGRES_URL)  # the suite's own server: a primary, never read-only
        hosts = f"127.0.0.1:{russian.port},{other.hostname}:{other.port or 5432}"
        query = "?target_session_attrs=read-only"
        await _waited_for(
            PostgresStore(f"postgresql://{other.username}@{hosts}{other.path}{query}")
        )
        # the same list given by libpq's variables, which the URL does not show
        with monkeypatch.context() as variables:  # (pg_ctl below must not see them)
            variables.setenv("PGHOST", f"127.0.0.1,{other.hostname}")
            variables.setenv("PGPORT", f"{russian.port},{other.port or 5432}")
            await _waited_for(PostgresStore(f"postgresql://{other.username}@{other.path}{query}"))
    finally:
        holder.close()
        russian.pg_ctl("-w", "stop")  # ends once the session above is gone
        russian.start()


async def _waited_for(store: PostgresStore) -> StoreError:
    """The error ``store.open()`` raises after trying again for a few seconds, as it does
    for an outage (a refusal fails at once)."""
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL") as caught:
        await store.open()
    assert 1.5 < time.monotonic() - started < 8.0
    return caught.value


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port where connections are taken (by the kernel) and never answered, as at a
    server that hangs or a host behind a firewall that drops packets."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # never accepted, never answered
        yield listener.getsockname()[1]


async def test_a_server_that_never_answers_costs_connect_timeout(silent_port: int) -> None:
    """Each connect waits ``connect_timeout`` (the URL's here; 10 s otherwise), and the
    store stops trying after a few seconds: it gives up within that plus one timeout,
    saying so, instead of waiting once per try."""
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{silent_port}/test?connect_timeout=2")
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"no answer within connect_timeout \(2 s\)"):
        await store.open()
    assert 1.9 < time.monotonic() - started < 9.0
