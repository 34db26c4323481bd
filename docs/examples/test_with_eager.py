"""How your own tests stay as they are: eager mode runs a request's tasks right after
its response, inside the TestClient call, as Starlette does."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from backlane import Backlane
from backlane.fastapi import BackgroundTasks
from backlane.testing import drain_sync


def write_line(path: str, line: str) -> None:
    with open(path, "a") as out:
        out.write(line + "\n")


def make_app(lane: Backlane) -> FastAPI:
    app = FastAPI()
    lane.install(app)

    @app.post("/note")
    def note(path: str, text: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(write_line, path, text)
        return {"ok": "yes"}

    return app


def test_eager(tmp_path: Path) -> None:
    client = TestClient(make_app(Backlane("memory://", eager=True)))
    client.post("/note", params={"path": str(tmp_path / "x"), "text": "hello"})
    assert (tmp_path / "x").read_text() == "hello\n"  # already done


def test_queued_then_drained(tmp_path: Path) -> None:
    lane = Backlane("memory://")
    client = TestClient(make_app(lane))  # without `with`, no lifespan: no embedded worker
    client.post("/note", params={"path": str(tmp_path / "y"), "text": "later"})
    assert drain_sync(lane) == 1  # run what is queued, here and now
    assert (tmp_path / "y").read_text() == "later\n"
