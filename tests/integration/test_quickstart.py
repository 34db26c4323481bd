"""The README's example service works as the README says."""

import importlib
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient


def test_quickstart_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKLANE_URL", f"sqlite:///{tmp_path}/quick.db")
    monkeypatch.setenv("QUICKSTART_OUTBOX", str(tmp_path / "outbox"))
    quickstart = importlib.reload(importlib.import_module("examples.quickstart"))
    with TestClient(quickstart.app) as client:
        reply = client.post("/send-notification/ann@example.com")
        assert reply.status_code == 200
        status_url = reply.json()["status"]
        report = client.post("/reports", params={"rows": 100}).json()
        assert client.post("/send-notification/not-an-email").status_code == 422
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = [client.get(u).json()["state"] for u in (status_url, report["status"])]
            if states == ["succeeded", "succeeded"]:
                break
            time.sleep(0.02)
        assert states == ["succeeded", "succeeded"]
        done = client.get(report["status"]).json()
    log = (tmp_path / "outbox" / "notifications.log").read_text()
    assert log == "notification for ann@example.com: some notification\n"
    assert done["result"] == {"rows": 100, "total": 5050}
    assert done["progress"] == 1.0 and done["message"] == "100 of 100 rows"
