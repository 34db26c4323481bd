"""Real processes for the acceptance tests: a uvicorn server started, awaited, and killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD_ENV = "WEB_APP_RECORD"
"""``web_app``: path of the file every finished task appends its number to."""
SLOW_ENV = "WEB_APP_SLOW_SECONDS"
"""``web_app``: how long ``record_slow`` sleeps before it records (default 2 s)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Uvicorn:
    """``python -m uvicorn <app>`` on a free port, cwd the repository root, its output in
    ``log``. Use as a context manager: the process never outlives the ``with`` block."""

    def __init__(self, app: str, *, env: dict[str, str], log: Path, port: int | None = None):
        self.app = app
        self.env = {**os.environ, **env}
        self.log = log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 20.0) -> Uvicorn:
        """Start the server and return once it answers ``GET /ping``."""
        command = [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--no-access-log"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            self._wait_until_it_answers(self.proc, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_until_it_answers(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"uvicorn exited with {proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not answer in {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup, as a power cut would do."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def output(self) -> str:
        """What the server printed so far (all runs that shared this log)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Uvicorn:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
