"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
served by a real uvicorn process with an embedded worker on SQLite, and the standalone
``backlane dashboard`` command as a real process.

Seen here: a job going queued → running (the progress bar moving) → succeeded, live; a
failed job's traceback, its retry clicked, its success, and both attempts on its page; an
argument holding ``<script>`` shown as text with no script run; the metrics page parsed by
prometheus-client with job counts equal to the store's; the standalone command refusing
a non-loopback address without a token, and asking for the token when one is set.

Screenshots go to the test's temporary folder, and to ``$BACKLANE_SCREENSHOTS`` (e.g.
``docs/images``) when that is set. Skipped when ``/usr/bin/chromium`` or Playwright is
missing, failed instead when ``BACKLANE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from backlane import Backlane, JobState, TaskContext
from tests.acceptance._procs import REPO_ROOT, free_port
from tests.services import require_service

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "acceptance-token-0123456789"
EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
STEPS = 10
STEP_SECONDS = 0.35


# -- the app the uvicorn process serves ---------------------------------------------------


async def crunch(ctx: TaskContext, steps: int) -> str:
    """Reports progress ``steps`` times, a step every STEP_SECONDS."""
    for step in range(1, steps + 1):
        await anyio.sleep(STEP_SECONDS)
        await ctx.progress(step / steps, f"step {step} of {steps}")
    return f"crunched {steps}"


def flaky(flag: str) -> str:
    """Fails until the file ``flag`` exists."""
    if not Path(flag).exists():
        raise RuntimeError(f"flag {flag} is missing")
    return "flag found"


def remember(text: str) -> str:
    return text


def make_app() -> FastAPI:
    """The served app (``uvicorn --factory``): one embedded worker, the dashboard."""
    from backlane.fastapi import install

    lane = Backlane()  # BACKLANE_URL
    app = FastAPI()
    install(lane, app, workers=1, dashboard=True)

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


# -- processes and the browser ------------------------------------------------------------


class Server:
    """A process serving HTTP on 127.0.0.1, its output in a file, killed at the end."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_until_up(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                httpx.get(self.url + path, timeout=1.0)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"did not answer within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        require_service("Chromium", f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_service("Playwright", "the playwright package is missing (pip install playwright)")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[Any, str], None]:
    """``shots(page, name)`` saves a screenshot as ``name.png``."""
    folders = [tmp_path]
    if os.environ.get("BACKLANE_SCREENSHOTS"):
        folders.append(REPO_ROOT / os.environ["BACKLANE_SCREENSHOTS"])

    def take(page: Any, name: str) -> None:
        image = page.screenshot(full_page=True)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.png").write_bytes(image)

    return take


class Site:
    """The served app, and a lane in this process on the same SQLite file, used from an
    event loop on a thread of its own (Playwright's runs on this one)."""

    def __init__(self, server: Server, lane: Backlane, portal: BlockingPortal) -> None:
        self.server = server
        self.lane = lane
        self.portal = portal
        self.url = server.url + "/backlane"

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return self.portal.call(func, *args)

    def enqueue(self, func: Callable[..., Any], *args: Any) -> str:
        async def go() -> str:
            return (await self.lane.task_for(func).enqueue(*args)).id

        return str(self.call(go))

    def state(self, job_id: str) -> JobState:
        job = self.call(self.lane.store.get, job_id)
        assert job is not None
        return job.state  # type: ignore[no-any-return]

    def wait_for_state(self, job_id: str, state: JobState, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state(job_id) is not state:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {state} within {timeout}s")
            time.sleep(0.05)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    url = f"sqlite:///{tmp_path}/jobs.db"
    env = {"BACKLANE_URL": url, "BACKLANE_RETRIES": "0", "BACKLANE_POLL_MAX": "0.05"}
    env.pop("BACKLANE_DASHBOARD_TOKEN", None)
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", f"{__name__}:make_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    server = Server(command, env, tmp_path / "uvicorn.log", port)
    try:
        server.wait_until_up("/ping")
        lane = Backlane(url)
        with start_blocking_portal() as portal:
            portal.call(lane.open)
            try:
                yield Site(server, lane, portal)
            finally:
                portal.call(lane.close)
    finally:
        server.stop()


def watch(page: Any, until: Callable[[], bool], timeout: float) -> list[tuple[str, float]]:
    """(state badge, progress value) as the page shows them, every 25 ms, until ``until()``."""
    seen: list[tuple[str, float]] = []
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s; saw {seen}")
        with contextlib.suppress(Exception):  # the page reloads once the job ended
            shown = page.evaluate(
                "() => [document.querySelector('[data-field=state] .badge').textContent,"
                " document.getElementById('progress').position]"
            )
            if not seen or tuple(shown) != seen[-1]:
                seen.append((shown[0], shown[1]))
        time.sleep(0.025)
    return seen


# -- the tests ----------------------------------------------------------------------------


def test_a_job_is_followed_live_and_a_failed_one_retried(
    browser: Any, site: Site, shots: Callable[[Any, str], None], tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page, other = context.new_page(), context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # queued → running (the bar moves) → succeeded, on one open page
    site.call(site.lane.store.pause_queue, "default", True)
    job_id = site.enqueue(crunch, STEPS)
    page.goto(f"{site.url}/ui/jobs/{job_id}")
    badge = page.locator("[data-field=state] .badge")
    assert badge.text_content() == "queued"
    shots(page, "dashboard-job-queued")
    other.goto(f"{site.url}/")
    other.get_by_role("button", name="Resume").click()  # resume the queue from the overview
    other.wait_for_url("**/backlane/?notice=resumed")

    def ended() -> bool:
        return site.state(job_id) is JobState.SUCCEEDED

    half: list[bool] = []

    def shot_half_way() -> bool:
        if not half and page.evaluate("() => document.getElementById('progress').value") >= 0.5:
            half.append(True)
            shots(page, "dashboard-job-running")
        return ended()

    seen = watch(page, shot_half_way, timeout=30)
    states = [state for state, _ in seen]
    assert "running" in states, seen  # the same page showed "queued" before the resume
    moving = sorted({progress for state, progress in seen if state == "running" and progress > 0})
    assert len(moving) >= 3, f"the progress bar did not move: {seen}"
    page.wait_for_selector("#result")  # reloaded on the end event: the result shows
    assert badge.text_content() == "succeeded"
    assert f"crunched {STEPS}" in page.locator("#result").text_content()
    assert page.locator("#progress").evaluate("e => e.value") == 1

    # a failed job: its traceback, a retry clicked, its success
    flag = tmp_path / "flag"
    failed_id = site.enqueue(flaky, str(flag))
    site.wait_for_state(failed_id, JobState.FAILED)
    page.goto(f"{site.url}/ui/jobs/{failed_id}")
    assert badge.text_content() == "failed"
    traceback = page.locator("#traceback").text_content()
    assert "Traceback (most recent call last)" in traceback
    assert f"RuntimeError: flag {flag} is missing" in traceback
    shots(page, "dashboard-job-failed")
    flag.touch()
    page.get_by_role("button", name="Retry").click()
    page.wait_for_url(f"**/ui/jobs/{failed_id}?notice=retried")
    page.wait_for_selector("#result", timeout=20_000)
    assert badge.text_content() == "succeeded"
    assert "flag found" in page.locator("#result").text_content()
    assert page.locator("#traceback").count() == 0
    attempts = page.locator("#attempts tbody tr")  # the failed attempt, then the retry
    assert attempts.count() == 2
    assert attempts.nth(0).get_attribute("data-outcome") == "failed"
    assert f"RuntimeError: flag {flag} is missing" in attempts.nth(0).text_content()
    assert attempts.nth(1).get_attribute("data-outcome") == "succeeded"
    assert attempts.nth(1).locator("time").count() == 2  # started and ended

    # the overview, the list and the workers page, for the docs
    for _ in range(3):
        site.enqueue(remember, "hello")
    page.goto(f"{site.url}/")
    assert page.locator("svg.chart rect.bar.succeeded").count() >= 1
    shots(page, "dashboard-overview")
    page.goto(f"{site.url}/ui/jobs")
    shots(page, "dashboard-jobs")
    page.goto(f"{site.url}/ui/workers")
    assert page.locator("td.mono").first.text_content()  # the embedded worker's heartbeat
    shots(page, "dashboard-workers")
    assert errors == []
    context.close()


def test_an_argument_holding_script_is_shown_as_text(browser: Any, site: Site) -> None:
    job_id = site.enqueue(remember, EVIL)
    site.wait_for_state(job_id, JobState.SUCCEEDED)
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    for path in (f"/ui/jobs/{job_id}", "/ui/jobs", "/ui/jobs?text=script&state=succeeded"):
        page.goto(site.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("() => window.__pwned") is None, path
        assert page.locator("script:not([src])").count() == 0, path
    page.goto(f"{site.url}/ui/jobs/{job_id}")
    assert "<script>window.__pwned = 1</script>" in page.locator("#arguments").text_content()
    assert "<script>window.__pwned = 1</script>" in page.locator("#result").text_content()
    assert page.locator("#arguments img").count() == 0
    assert dialogs == []
    page.close()


def test_the_metrics_page_matches_the_store(site: Site) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ids = [site.enqueue(remember, str(n)) for n in range(5)]
    for job_id in ids:
        site.wait_for_state(job_id, JobState.SUCCEEDED)
    site.call(site.lane.store.pause_queue, "default", True)
    site.enqueue(remember, "waits")
    reply = httpx.get(f"{site.url}/metrics")
    assert reply.status_code == 200
    shown = {
        (sample.labels["queue"], sample.labels["state"]): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
        if sample.name == "backlane_jobs"
    }
    counts = site.call(site.lane.store.counts)
    assert shown == {
        (queue, state.value): float(by_state.get(state, 0))
        for queue, by_state in counts.items()
        for state in JobState
    }
    assert shown[("default", "succeeded")] == 5 and shown[("default", "queued")] == 1
    assert httpx.get(f"{site.url}/metrics", headers={"host": "evil.example"}).status_code == 401


def test_the_standalone_command_guards_its_address(
    browser: Any, tmp_path: Path, shots: Callable[[Any, str], None]
) -> None:
    env = {"BACKLANE_URL": f"sqlite:///{tmp_path}/jobs.db", "BACKLANE_DASHBOARD_TOKEN": ""}
    command = [sys.executable, "-m", "backlane", "dashboard", f"{__name__}:LANE"]
    refused = subprocess.run(
        [*command, "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "not a loopback address" in refused.stderr

    port = free_port()
    env["BACKLANE_DASHBOARD_TOKEN"] = TOKEN
    server = Server([*command, "--port", str(port)], env, tmp_path / "dashboard.log", port)
    try:
        server.wait_until_up("/ui/login")
        assert httpx.get(f"{server.url}/ui/jobs").status_code == 401
        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{server.url}/ui/jobs", headers=bearer).status_code == 200
        page = browser.new_page()
        page.goto(f"{server.url}/ui/workers")
        shots(page, "dashboard-login")
        page.fill("input[name=token]", "wrong-token-wrong-token")
        page.get_by_role("button", name="Log in").click()
        assert "That is not the token" in page.content()
        page.fill("input[name=token]", TOKEN)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{server.url}/ui/workers")
        assert page.get_by_role("heading", name="Workers").is_visible()
        page.close()
    finally:
        server.stop()


LANE = Backlane()
