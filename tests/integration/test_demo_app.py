"""The demo service in-process (``TestClient``, its embedded worker, a real SMTP sink on a
loopback port): each example does its work, and every hole the guide left is closed."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from backlane.cli import cli
from backlane.demo import create_app
from backlane.demo.app import prefers_json
from backlane.demo.safety import confined, csv_cell, display_name, one_line
from backlane.email import MailSink

UPLOAD_LIMIT = 64 * 1024
ENDED = {"succeeded", "failed", "cancelled", "discarded"}


@dataclass
class Demo:
    client: TestClient
    data: Path
    sink: MailSink

    def wait(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The job's status once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.client.get(f"/backlane/jobs/{job_id}").json()
            if job["state"] in ENDED:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(0.02)

    def succeeded(self, reply: Any) -> dict[str, Any]:
        """The reply was accepted and every job it names succeeded; the last job's status."""
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["url"] == f"/backlane/jobs/{body['job_id']}"
        job: dict[str, Any] = {}
        for link in body["jobs"]:
            job = self.wait(link["id"])
            assert job["state"] == "succeeded", job
        return job

    def mail_to(self, address: str) -> list[dict[str, Any]]:
        reply = self.client.get("/demo/mailbox", headers={"Accept": "application/json"})
        assert reply.status_code == 200
        return [mail for mail in reply.json() if mail["to"] == address]

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.data / "demo.db")) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Demo]:
    data = tmp_path / "data"
    with MailSink(data / "mailbox.jsonl") as sink:
        for name, value in {
            "BACKLANE_URL": f"sqlite:///{tmp_path}/jobs.db",
            "BACKLANE_DEMO_DATA_DIR": str(data),
            "BACKLANE_DEMO_LOCAL_SMTP": "1",
            "BACKLANE_DEMO_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            "BACKLANE_SMTP_HOST": sink.host,
            "BACKLANE_SMTP_PORT": str(sink.port),
            "BACKLANE_RETRIES": "1",
            "BACKLANE_BACKOFF": "0.01",
        }.items():
            monkeypatch.setenv(name, value)
        with TestClient(create_app()) as client:
            yield Demo(client, data, sink)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- pages ------------------------------------------------------------------------------


def test_home_page_shows_every_example_with_a_form(demo: Demo) -> None:
    page = demo.client.get("/")
    assert page.status_code == 200
    for path in (
        "/send-notification/{email}",
        "/send-email",
        "/register",
        "/upload",
        "/process/{item_id}",
        "/log",
        "/notify",
        "/export",
        "/cleanup",
        "/compute",
    ):
        assert f'data-path="{path}"' in page.text
    assert '<script src="/static/demo.js" defer></script>' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = demo.client.get("/static/demo.js")
    assert script.status_code == 200 and "/demo/jobs" in script.text
    assert "innerHTML" not in script.text
    assert demo.client.get("/static/demo.css").status_code == 200
    assert demo.client.get("/docs").status_code == 404  # Swagger UI would load a CDN


def test_latest_jobs_feed_lists_the_examples_jobs_not_the_request_log(demo: Demo) -> None:
    reply = demo.client.post("/log", params={"message": "hello"})
    demo.succeeded(reply)
    jobs = demo.client.get("/demo/jobs").json()["jobs"]
    assert [(j["id"], j["task"], j["state"]) for j in jobs] == [
        (reply.json()["job_id"], "append_log", "succeeded")
    ]


# -- mail -------------------------------------------------------------------------------


def test_notification_and_email_go_through_smtp_to_the_mailbox(demo: Demo) -> None:
    demo.succeeded(demo.client.post("/send-notification/ann@example.com"))
    subject = "<script>alert('x')</script>"
    reply = demo.client.post(
        "/send-email", json={"email": "cy@example.com", "subject": subject, "body": "Hi\nthere"}
    )
    job = demo.succeeded(reply)
    assert job["result"].endswith("@backlane.local>")  # the Message-ID
    assert [m["subject"] for m in demo.mail_to("ann@example.com")] == [
        "A notification from the backlane demo"
    ]
    (mail,) = demo.mail_to("cy@example.com")
    assert (mail["subject"], mail["body"]) == (subject, "Hi\nthere\n")
    assert set(mail) == {"to", "subject", "body", "received_at"}
    page = demo.client.get("/demo/mailbox", headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text
    assert subject not in page.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/send-notification/not-an-email", None),
        ("POST", "/send-email", {"email": "nobody", "subject": "s", "body": "b"}),
        ("POST", "/send-email", {"email": "a@example.com", "subject": "a\r\nBcc: x", "body": ""}),
        ("POST", "/notify", {"email": "a@", "title": "t", "content": "c"}),
        ("POST", "/register", {"email": "a@example.com", "name": "A", "password": "short"}),
        ("POST", "/register", {"email": "@example.com", "name": "A", "password": "long enough"}),
    ],
)
def test_invalid_input_is_422_and_stores_nothing(
    demo: Demo, method: str, path: str, body: dict[str, str] | None
) -> None:
    reply = demo.client.request(method, path, json=body)
    assert reply.status_code == 422, reply.text
    assert demo.client.get("/demo/jobs").json()["jobs"] == []
    assert demo.rows("SELECT * FROM users") == []


def test_notify_retries_then_fails_with_the_smtp_error(
    demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKLANE_SMTP_PORT", str(closed_port()))  # read when the job runs
    reply = demo.client.post(
        "/notify", json={"email": "dee@example.com", "title": "Report", "content": "ready"}
    )
    job = demo.wait(reply.json()["job_id"])
    assert (job["state"], job["attempts"]) == ("failed", 2)  # BACKLANE_RETRIES=1
    assert job["error"]["type"] == "aiosmtplib.errors.SMTPConnectError"
    assert "Error connecting to 127.0.0.1" in job["error"]["message"]


# -- registration, files, logs --------------------------------------------------------------


def test_register_runs_its_three_tasks_in_order(demo: Demo) -> None:
    reply = demo.client.post(
        "/register", json={"email": "bob@example.com", "name": "Bob", "password": "s3cret-pw"}
    )
    demo.succeeded(reply)
    body = reply.json()
    tasks = [link["task"].rpartition(":")[2] for link in body["jobs"]]
    assert tasks == ["send_welcome_email", "create_user_folder", "notify_admin"]
    assert body["job_id"] == body["jobs"][0]["id"]
    states = [demo.client.get(link["url"]).json() for link in body["jobs"]]
    for earlier, later in itertools.pairwise(states):
        assert earlier["finished_at"] <= later["started_at"]
    assert demo.mail_to("bob@example.com")[0]["subject"] == "Welcome to the backlane demo"
    (notice,) = demo.mail_to("admin@example.com")
    assert "bob@example.com" in notice["body"]
    user_id = body["user_id"]
    assert (demo.data / "users" / str(user_id) / "README.txt").exists()
    ((stored,),) = demo.rows("SELECT password_hash FROM users")
    assert stored.startswith("scrypt$") and "s3cret-pw" not in stored
    again = demo.client.post(
        "/register", json={"email": "bob@example.com", "name": "Bob", "password": "s3cret-pw"}
    )
    assert again.status_code == 409


def test_upload_is_stored_under_a_server_name_processed_and_downloadable(demo: Demo) -> None:
    content = b"line one\nline two\n" * 100
    reply = demo.client.post("/upload", files={"file": ("../../escape.txt", content, "text/plain")})
    job = demo.succeeded(reply)
    body = reply.json()
    upload_id = body["upload_id"]
    assert body["filename"] == "escape.txt"
    assert job["result"]["bytes"] == len(content)
    uploads = demo.data / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == [f"{upload_id}.gz"]  # original gone
    assert not (demo.data.parent / "escape.txt").exists()
    assert not any(demo.data.parent.parent.glob("escape.txt"))
    status = demo.client.get(body["status_url"]).json()
    assert status["state"] == "succeeded" and status["download_url"] == body["download_url"]
    download = demo.client.get(body["download_url"])
    assert download.status_code == 200
    assert gzip.decompress(download.content) == content
    assert 'filename="escape.txt.gz"' in download.headers["content-disposition"]
    assert demo.client.get(f"/upload/{'0' * 32}").status_code == 404
    assert demo.client.get("/upload/..%2F..%2Fetc/download").status_code in (404, 422)


def test_upload_over_the_limit_is_413_and_leaves_nothing(demo: Demo) -> None:
    too_big = b"x" * (UPLOAD_LIMIT + 1)
    reply = demo.client.post("/upload", files={"file": ("big.bin", too_big)})
    assert reply.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        boundary = b"--b0undary\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="b"\r\n\r\n'
        for _ in range(UPLOAD_LIMIT // 1024 * 4):
            yield b"y" * 1024
        yield b"\r\n--b0undary--\r\n"

    streamed = demo.client.post(
        "/upload",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    )
    assert streamed.status_code == 413
    assert list((demo.data / "uploads").iterdir()) == []
    assert list((demo.data / "tmp").iterdir()) == []
    assert demo.client.post("/log", params={"message": "m" * 2000}).status_code == 422
    assert demo.client.post("/send-email", content=b"{" * 70_000).status_code == 413


def test_process_logs_the_dependency_task_first(demo: Demo) -> None:
    reply = demo.client.post("/process/7", params={"q": "books\nforged line"})
    demo.succeeded(reply)
    ids = [link["id"] for link in reply.json()["jobs"]]
    assert reply.json()["job_id"] == ids[1]
    lines = (demo.data / "service.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "query: books\\nforged line",
        "processing item 7",
    ]
    without_query = demo.client.post("/process/8")
    assert len(without_query.json()["jobs"]) == 1


def test_log_appends_from_an_async_task(demo: Demo) -> None:
    demo.succeeded(demo.client.post("/log", params={"message": "first"}))
    demo.succeeded(demo.client.post("/log", params={"message": "second"}))
    lines = (demo.data / "service.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["first", "second"]


def test_every_request_is_logged_by_a_job(demo: Demo) -> None:
    demo.client.get("/")
    demo.client.post("/log", params={"message": "x"})
    demo.client.get("/nowhere")
    demo.client.get("/demo/jobs")  # polling: not logged
    demo.client.get("/static/demo.css")
    deadline = time.monotonic() + 10
    while len(demo.rows("SELECT * FROM requests")) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    rows = demo.rows("SELECT method, path, status FROM requests")  # jobs of any order
    assert sorted(rows) == [("GET", "/", 200), ("GET", "/nowhere", 404), ("POST", "/log", 200)]


def test_export_writes_csv_of_the_service_own_rows(demo: Demo) -> None:
    for n, name in enumerate(["Ann", "=HYPERLINK()", "Émile, Jr."]):
        reply = demo.client.post(
            "/register",
            json={"email": f"u{n}@example.com", "name": name, "password": "password1"},
        )
        assert reply.status_code == 200
    reply = demo.client.post("/export", params={"format": "csv"})
    export_id = reply.json()["export_id"]
    demo.succeeded(reply)
    status = demo.client.get(f"/export/{export_id}").json()
    assert (status["state"], status["progress"], status["result"]["rows"]) == ("succeeded", 1, 3)
    download = demo.client.get(status["download_url"])
    assert download.headers["content-type"].startswith("text/csv")
    lines = download.text.splitlines()
    assert lines[0] == "id,email,name,created_at"
    assert [line.split(",")[1] for line in lines[1:]] == [
        "u0@example.com",
        "u1@example.com",
        "u2@example.com",
    ]
    assert lines[2].split(",")[2] == "'=HYPERLINK()"  # never a formula
    assert '"Émile, Jr."' in lines[3]
    assert demo.client.post("/export", params={"format": "xlsx"}).status_code == 422
    assert demo.client.post("/export", params={"dataset": "sqlite_master"}).status_code == 422
    assert demo.client.get(f"/export/{'f' * 32}/download").status_code == 404


def test_cleanup_removes_only_old_files_in_its_own_folder(demo: Demo, tmp_path: Path) -> None:
    tmp = demo.data / "tmp"
    old = time.time() - 10 * 86400
    for name in ("old.txt", "older.bin"):
        (tmp / name).write_text("old")
        os.utime(tmp / name, (old, old))
    (tmp / "new.txt").write_text("new")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    os.utime(outside, (old, old))
    (tmp / "link-to-outside").symlink_to(outside)
    os.utime(tmp / "link-to-outside", (old, old), follow_symlinks=False)
    job = demo.succeeded(demo.client.post("/cleanup", params={"days": 7}))
    assert job["result"] == {"directory": ".", "removed": ["old.txt", "older.bin"], "kept": 1}
    assert sorted(p.name for p in tmp.iterdir()) == ["link-to-outside", "new.txt"]
    assert outside.read_text() == "keep me"


@pytest.mark.parametrize("directory", ["/etc", "..", "../uploads", "sub/../../..", "escape"])
def test_cleanup_outside_its_folder_is_422(demo: Demo, tmp_path: Path, directory: str) -> None:
    (demo.data / "tmp" / "escape").symlink_to(tmp_path)
    reply = demo.client.post("/cleanup", params={"directory": directory, "days": 0})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["query", "directory"]
    assert demo.client.get("/demo/jobs").json()["jobs"] == []


def test_compute_counts_primes_in_another_process_with_progress(demo: Demo) -> None:
    job = demo.succeeded(demo.client.post("/compute", json={"limit": 1_000_000}))
    assert job["result"] == {"limit": 1_000_000, "primes": 78_498}
    assert job["progress"] == 1.0
    assert demo.client.post("/compute", json={"limit": 10**12}).status_code == 422


def test_a_cross_site_form_cannot_post(demo: Demo) -> None:
    evil = demo.client.post(
        "/log", params={"message": "x"}, headers={"Origin": "https://evil.example"}
    )
    assert evil.status_code == 403
    same = demo.client.post(
        "/log", params={"message": "x"}, headers={"Origin": "http://testserver"}
    )
    assert same.status_code == 200


# -- the pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_name", "shown"),
    [
        ("../../escape.txt", "escape.txt"),
        ("..\\..\\win.ini", "win.ini"),
        ("..", "upload"),
        ("", "upload"),
        (None, "upload"),
        ("re\x00port\n.pdf", "report.pdf"),
        ("x" * 300, "x" * 120),
    ],
)
def test_display_name_is_text_without_folders(client_name: str | None, shown: str) -> None:
    assert display_name(client_name) == shown


def test_confined_follows_links_and_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert confined(root, ".") == root.resolve()
    assert confined(root, "inside") == (root / "inside").resolve()
    assert confined(root, str(root / "inside")) == (root / "inside").resolve()
    assert confined(root, "out/root/inside") == (root / "inside").resolve()  # back inside
    for bad in ("..", "/etc", "out", "out/other", "inside/../..", "a\x00b"):
        assert confined(root, bad) is None, bad


def test_text_for_logs_and_spreadsheets() -> None:
    assert one_line("a\nb\r\tc\u2028") == "a\\nb\\r\\tc\\u2028"
    assert one_line("é ü 漢") == "é ü 漢"
    assert [csv_cell(v) for v in ("=1+1", "+x", "-x", "@x", "ok", 3)] == [
        "'=1+1",
        "'+x",
        "'-x",
        "'@x",
        "ok",
        3,
    ]


@pytest.mark.parametrize(
    ("accept", "json"),
    [
        ("application/json", True),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
        ("*/*", False),
        ("", False),
        ("text/html;q=0.5, application/json", True),
        ("application/json;q=0.1, text/html", False),
    ],
)
def test_mailbox_answers_json_only_when_asked(accept: str, json: bool) -> None:
    assert prefers_json(accept) is json


def test_the_demo_command_is_offered_with_its_options() -> None:
    shown = CliRunner().invoke(cli, ["demo", "--help"])
    assert shown.exit_code == 0, shown.output
    for option in ("--host", "--port", "--data-dir"):
        assert option in shown.output
    refused = CliRunner().invoke(cli, ["demo", "--port", "0"])
    assert refused.exit_code == 2


def test_cleanup_also_runs_daily_on_a_cron_schedule(demo: Demo) -> None:
    import anyio

    lane = demo.client.app.state.backlane  # type: ignore[attr-defined]
    schedule = lane.schedules["daily-cleanup"]
    assert schedule.cron == "0 3 * * *" and schedule.missed == "run_once"
    tmp = demo.data / "tmp"
    stale = tmp / "stale.txt"
    stale.write_text("old")
    old = time.time() - 8 * 86400
    os.utime(stale, (old, old))
    (tmp / "fresh.txt").write_text("new")
    handle = anyio.run(schedule.task.enqueue)  # what the scheduler stores at 03:00
    job = demo.wait(handle.id)
    assert job["state"] == "succeeded", job
    assert job["result"]["removed"] == ["stale.txt"]
    assert (tmp / "fresh.txt").exists() and not stale.exists()


def test_demo_serves_the_dashboard_on_loopback(demo: Demo) -> None:
    home = demo.client.get("/")
    assert 'href="/backlane/"' in home.text
    # TestClient's server is "testserver", not loopback: the dashboard stays closed
    assert demo.client.get("/backlane/").status_code == 401
