"""Every example file in docs/ runs as the docs say, and the docs build cleanly."""

import html
import http.server
import importlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import anyio
import pytest
from fastapi.testclient import TestClient

from backlane.testing import drain

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    monkeypatch.setenv("BACKLANE_URL", f"sqlite:///{tmp_path}/docs.db")
    return importlib.reload(importlib.import_module(f"docs.examples.{name}"))


def test_dropin_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod = load("dropin", monkeypatch, tmp_path)
    mod.LOG.clear()
    with TestClient(mod.app) as client:
        reply = client.post("/send-notification/ann@example.com", params={"q": "books"})
        assert reply.status_code == 200
        deadline = time.monotonic() + 10
        while len(mod.LOG) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert mod.LOG == [
        "found query: books",
        "message to ann@example.com",
        "welcome ann@example.com",
    ]


def test_tasks_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod = load("tasks", monkeypatch, tmp_path)

    async def scenario() -> None:
        async with mod.lane:
            job = await mod.export_rows.options(key="k").enqueue("users", limit=400)
            same = await mod.export_rows.options(key="k").enqueue("users", limit=400)
            assert same.id == job.id
            session_job = await mod.count_users.enqueue()
            await drain(mod.lane)
            assert await job.result() == {"rows": 400}
            assert (await job.info()).progress == 1.0
            assert await session_job.result() is True  # the session was open while it ran

    anyio.run(scenario)


def test_lifespan_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    received: list[tuple[str, bytes]] = []

    class Hooks(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HOOKS_URL", f"http://127.0.0.1:{server.server_address[1]}")
        mod = load("lifespan", monkeypatch, tmp_path)

        async def scenario() -> None:
            async with mod.lane:
                jobs = [await mod.post_event.enqueue(name) for name in ("signed-up", "paid")]
                await drain(mod.lane)
                assert [await job.result() for job in jobs] == [204, 204]

        anyio.run(scenario)
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(received) == [
        ("/hooks", b'{"event":"paid"}'),
        ("/hooks", b'{"event":"signed-up"}'),
    ]


def test_eager_example(tmp_path: Path) -> None:
    mod = importlib.import_module("docs.examples.test_with_eager")
    mod.test_eager(tmp_path)
    mod.test_queued_then_drained(tmp_path)


def test_docs_build_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # every snippet was included, none shown as text (a Python formatter run over the
    # Markdown once turned "--8<--" into "--8 < --", which the build takes for text)
    shown = [
        str(page.relative_to(tmp_path))
        for page in (tmp_path / "site").rglob("*.html")
        if re.search(r"--8 ?< ?--", html.unescape(re.sub(r"<[^>]+>", "", page.read_text())))
    ]
    assert shown == []


def test_schedules_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod = load("schedules", monkeypatch, tmp_path)
    assert set(mod.lane.schedules) == {
        "docs.examples.schedules:nightly_report",
        "docs.examples.schedules:refresh_cache",
    }
    nightly = mod.lane.schedules["docs.examples.schedules:nightly_report"]
    assert nightly.expression == "0 3 * * * (Asia/Shanghai)" and nightly.missed == "run_once"
    every = mod.lane.schedules["docs.examples.schedules:refresh_cache"]
    assert every.next_slot(1_800_000_001) == 1_800_000_300 and every.missed == "skip"
