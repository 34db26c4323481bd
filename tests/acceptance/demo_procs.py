"""Real processes for the demo's acceptance tests: ``backlane demo`` itself, a separate
SMTP server (aiosmtpd's own command, delivering into a Maildir), and ``backlane retry``.

Each runs from the repository root with its output in a file, in its own process group,
and never outlives the ``with`` block that started it.
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from tests.acceptance._procs import REPO_ROOT, free_port

T = TypeVar("T")
ENDED = frozenset({"succeeded", "failed", "cancelled", "discarded"})


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``BACKLANE_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKLANE_")}
    env.update(settings)
    return env


def wait_until(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """The first true value ``check()`` returns; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


class Process:
    """A command started in its own process group, its output appended to ``log``."""

    def __init__(self, command: list[str], *, env: dict[str, str], log: Path) -> None:
        self.command = command
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to the whole group if it has not exited in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it started, e.g. /compute

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class DemoServer(Process):
    """``python -m backlane demo --port P --data-dir D`` with ``env``; ``client`` talks to
    it over real HTTP."""

    def __init__(self, data_dir: Path, *, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        command = [sys.executable, "-m", "backlane", "demo", "--port", str(self.port)]
        command += ["--data-dir", str(data_dir), "--log-level", "warning"]
        super().__init__(command, env=env, log=log)
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

    def __enter__(self) -> DemoServer:
        self.start()
        try:
            wait_until("the demo answers", self._answers, timeout=30.0)
        except BaseException:
            self.stop()
            raise AssertionError(f"the demo did not start:\n{self.output()}") from None
        return self

    def _answers(self) -> bool:
        if not self.running():
            raise AssertionError(f"the demo exited:\n{self.output()}")
        try:
            return self.client.get("/demo/jobs").status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.client.close()
        self.stop()

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.client.get(f"/backlane/jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        found: dict[str, Any] = reply.json()
        return found

    def ended(self, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """The job's status once it has ended."""

        def ended() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["state"] in ENDED else None

        return wait_until(f"job {job_id} ended", ended, timeout)

    def accepted(self, reply: httpx.Response) -> dict[str, Any]:
        """The reply body, checked: a 200 naming its jobs and their status links."""
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        assert body["url"] == f"/backlane/jobs/{body['job_id']}"
        assert all(link["url"] == f"/backlane/jobs/{link['id']}" for link in body["jobs"])
        return body

    def all_succeed(self, reply: httpx.Response, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Every job the reply names, once ended, each checked to have succeeded."""
        body = self.accepted(reply)
        jobs = [self.ended(link["id"], timeout) for link in body["jobs"]]
        assert [job["state"] for job in jobs] == ["succeeded"] * len(jobs), jobs
        return jobs

    def mailbox(self) -> list[dict[str, Any]]:
        reply = self.client.get("/demo/mailbox", headers={"Accept": "application/json"})
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        found: list[dict[str, Any]] = reply.json()
        return found

    def mail_to(self, address: str) -> list[dict[str, Any]]:
        return [mail for mail in self.mailbox() if mail["to"] == address]


class SmtpServer(Process):
    """aiosmtpd's own server on ``127.0.0.1:port``, delivering into the Maildir ``maildir``;
    stopped and started again on the same port."""

    def __init__(self, maildir: Path, *, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.maildir = maildir
        command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.port}"]
        command += ["-c", "aiosmtpd.handlers.Mailbox", str(maildir)]
        super().__init__(command, env=clean_env(), log=log)

    def start(self) -> None:
        super().start()
        wait_until("the SMTP server listens", self._listens, timeout=20.0)

    def _listens(self) -> bool:
        if not self.running():
            raise AssertionError(f"the SMTP server exited:\n{self.output()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def messages(self) -> list[tuple[str, str, str]]:
        """``(to, subject, body)`` of every message delivered so far."""
        if not self.maildir.exists():
            return []
        box = mailbox.Maildir(self.maildir, create=False)
        found = []
        for message in box:
            payload = message.get_payload(decode=True)
            body = payload.decode() if isinstance(payload, bytes) else str(payload)
            found.append((str(message["To"]), str(message["Subject"]), body))
        return found


def backlane_cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """``python -m backlane ARGS`` on the store ``url`` (as ``BACKLANE_URL``)."""
    return subprocess.run(
        [sys.executable, "-m", "backlane", *args],
        cwd=REPO_ROOT,
        env=clean_env(BACKLANE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
