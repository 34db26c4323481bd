"""FastAPI's own background-task tutorial apps pass FastAPI's own tests (rewritten here
as in fastapi/tests/test_tutorial/test_background_tasks) with only the import changed, in
eager mode, in an app that never called install()."""

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BACKLANE_EAGER", "1")
    monkeypatch.setenv("BACKLANE_URL", "memory://")
    yield tmp_path


def load(name: str) -> ModuleType:
    return importlib.reload(importlib.import_module(f"tests.integration.fastapi_docs.{name}"))


def test_tutorial001(in_tmp: Path) -> None:
    mod = load("tutorial001")
    client = TestClient(mod.app)
    log = Path("log.txt")
    if log.is_file():
        os.remove(log)  # pragma: no cover
    response = client.post("/send-notification/foo@example.com")
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Notification sent in the background"}
    with open("./log.txt") as f:
        assert "notification for foo@example.com: some notification" in f.read()


def test_tutorial002(in_tmp: Path) -> None:
    mod = load("tutorial002")
    client = TestClient(mod.app)
    log = Path("log.txt")
    if log.is_file():
        os.remove(log)  # pragma: no cover
    response = client.post("/send-notification/foo@example.com?q=some-query")
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Message sent"}
    with open("./log.txt") as f:
        assert "found query: some-query\nmessage to foo@example.com" in f.read()


def test_tutorial001_not_eager_uses_embedded_worker(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without eager mode and without install(), the drop-in still runs the task: a worker
    starts on the app's running loop at first use."""
    monkeypatch.setenv("BACKLANE_EAGER", "0")
    mod = load("tutorial001")
    import time

    with TestClient(mod.app) as client:
        assert client.post("/send-notification/bar@example.com").status_code == 200
        log = Path("log.txt")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the task opens the file, then writes to it
            if log.is_file() and "notification for bar@example.com" in log.read_text():
                break
            time.sleep(0.02)
        assert "notification for bar@example.com" in log.read_text()
