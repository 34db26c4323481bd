"""Private Redis servers for the tests that stop, kill or reconfigure Redis, and a web app
on the worker acceptance lane.

``PrivateRedis`` runs its own ``redis-server`` on a free port in a folder of the test's,
append-only file on (``appendfsync everysec``), and never touches the machine's shared
Redis. ``web_app`` is the ASGI app of ``uvicorn tests.acceptance.redis_lab:web_app``:
``worker_app``'s lane with no embedded worker (``workers=0``), and one endpoint that adds
``worker_app.record`` through the drop-in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from fastapi import FastAPI

from backlane.fastapi import BackgroundTasks
from tests.acceptance import worker_app


def _free_port() -> int:
    """A free TCP port at most 55535 (Redis Cluster listens 10000 above its port too)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port <= 55535:
            return port


class PrivateRedis:
    """A ``redis-server`` of the test's own. ``start`` waits until it answers; ``kill``
    is SIGKILL (a crash: only what the server wrote to its append-only file survives),
    ``stop`` is SIGTERM (a clean shutdown)."""

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None = None,
        unix_socket: bool = False,
        tls: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.password = password
        self.socket = folder / "redis.sock" if unix_socket else None
        self.tls = tls
        self.cert = folder / "cert.pem"
        self.extra = extra
        self.log = folder / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available(*, tls: bool = False) -> bool:
        """Whether a ``redis-server`` binary (and, for TLS, ``openssl``) can be found."""
        needed = ["redis-server", "openssl"] if tls else ["redis-server"]
        return all(shutil.which(name) is not None for name in needed)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        command = ["redis-server", "--bind", "127.0.0.1"]
        if self.tls:
            self._make_certificate()
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
            command += ["--tls-ca-cert-file", str(self.cert)]
        else:
            command += ["--port", str(self.port)]
        command += ["--dir", str(self.folder), "--save", "", "--daemonize", "no"]
        command += ["--appendonly", "yes", "--appendfsync", "everysec"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.socket is not None:
            command += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        command += list(self.extra)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start:\n{self.output()}")
            time.sleep(0.02)
        return self

    @property
    def key(self) -> Path:
        return self.folder / "key.pem"

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 (its own CA)."""
        if self.cert.exists():
            return
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        command += ["-keyout", str(self.key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1"]
        command += ["-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(command, check=True, capture_output=True)

    def answers(self) -> bool:
        """Whether the server replies to PING (and has loaded its data)."""
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(
                    socket.create_connection(("127.0.0.1", self.port), timeout=1)
                )
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.cert))
                    sock = stack.enter_context(
                        context.wrap_socket(sock, server_hostname="127.0.0.1")
                    )
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(100)
                sock.sendall(b"PING\r\n")
                return sock.recv(100).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


web_app = FastAPI()
worker_app.lane.install(web_app, workers=0)


@web_app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@web_app.post("/record/{n}")
async def record(n: int, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Add one ``worker_app.record`` job (``n`` only names the request)."""
    job = background_tasks.add_task(worker_app.record, pause=0.02)
    return {"id": job.id, "n": str(n)}
