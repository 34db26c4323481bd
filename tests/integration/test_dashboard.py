"""The dashboard in-process, on every store: its pages show what the store holds, its
filters and pages narrow it, its actions change it, and nothing a job carries is ever
rendered as markup."""

from __future__ import annotations

import html
import importlib.util
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backlane import Backlane, Job, JobState
from backlane.dashboard import create_app, dashboard_router
from backlane.dashboard.views import MAX_PAGE, PAGE_SIZE
from backlane.fastapi import install

LOCAL = "http://127.0.0.1:8000"
HTML = {"accept": "text/html"}
EVIL = "<script>window.__pwned = 1</script><img src=x onerror=alert(1)>"
NOW = time.time()


def remember(text: str) -> str:
    return text


def ended(state: JobState, **changes: Any) -> Job:
    job = Job(
        task=f"{__name__}:remember",
        payload='{"text":"hello"}',
        state=state,
        attempts=1,
        created_at=NOW - 30,
        run_at=NOW - 30,
        started_at=NOW - 20,
        finished_at=NOW - 10,
        keep_until=NOW + 3600,
    )
    return job.copy(**changes)


def stored(lane: Backlane, client: TestClient, jobs: list[Job]) -> list[Job]:
    return client.portal.call(lane.store.enqueue, jobs)  # type: ignore[union-attr]


@pytest.fixture
def lane(lane_url: str) -> Iterator[Backlane]:
    yield Backlane(lane_url, retries=0)


@pytest.fixture
def client(lane: Backlane) -> Iterator[TestClient]:
    app = FastAPI()
    install(lane, app, workers=0, dashboard=True)
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no CSRF field"
    return found.group(1)


def post(client: TestClient, path: str, **fields: str) -> Any:
    page = client.get("/backlane/ui/jobs", headers=HTML).text  # it always has a form
    fields.setdefault("csrf", csrf_of(page))
    return client.post(path, data=fields, headers={"origin": LOCAL}, follow_redirects=False)


def test_every_page_answers_with_what_the_store_holds(lane: Backlane, client: TestClient) -> None:
    failed = ended(
        JobState.FAILED,
        error={"type": "ValueError", "message": "bad input", "traceback": "Traceback: line 1"},
    )
    done = ended(JobState.SUCCEEDED, result='{"rows": 3}', queue="exports")
    waiting = ended(JobState.QUEUED, started_at=None, finished_at=None, keep_until=None)
    stored(lane, client, [failed, done, waiting])

    overview = client.get("/backlane/", headers=HTML)
    assert overview.status_code == 200
    assert "exports" in overview.text and "default" in overview.text
    assert "<svg" in overview.text  # the charts, drawn server-side
    assert 'href="/backlane/ui/jobs?queue=exports&amp;state=succeeded"' in overview.text

    listing = client.get("/backlane/ui/jobs", headers=HTML).text
    for job in (failed, done, waiting):
        assert f"/backlane/ui/jobs/{job.id}" in listing

    page = client.get(f"/backlane/ui/jobs/{failed.id}", headers=HTML).text
    assert "ValueError" in page and "bad input" in page and "Traceback: line 1" in page
    assert f"/backlane/jobs/{failed.id}/events" in page  # the live progress source
    assert "/retry" in page
    page = client.get(f"/backlane/ui/jobs/{done.id}", headers=HTML).text
    assert "&#34;rows&#34;: 3" in page or "&quot;rows&quot;: 3" in page

    assert client.get("/backlane/ui/schedules", headers=HTML).status_code == 200
    assert client.get("/backlane/ui/workers", headers=HTML).status_code == 200
    assert client.get("/backlane/ui/jobs/0123456789abcdef", headers=HTML).status_code == 404


def test_pages_forbid_inline_script_and_framing(client: TestClient) -> None:
    response = client.get("/backlane/", headers=HTML)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert "<script>" not in response.text  # our own script comes from a file
    css = client.get(re.search(r'href="([^"]+\.css[^"]*)"', response.text).group(1))  # type: ignore[union-attr]
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_nothing_a_job_carries_is_rendered_as_markup(lane: Backlane, client: TestClient) -> None:
    job = ended(
        JobState.FAILED,
        payload='{"text":"' + EVIL.replace('"', '\\"') + '"}',
        task=f"{__name__}:remember",
        queue="q<b>x</b>",
        error={"type": "<i>Boom</i>", "message": EVIL, "traceback": EVIL},
        attempts=2,
        attempt_history=[
            {"attempt": 1, "outcome": EVIL, "error": {"type": "<i>Boom</i>", "message": EVIL}},
            {"attempt": 2, "outcome": "failed", "error": {"type": "<i>Boom</i>", "message": EVIL}},
        ],
    )
    stored(lane, client, [job])
    pages = [
        client.get("/backlane/", headers=HTML).text,
        client.get("/backlane/ui/jobs", headers=HTML).text,
        client.get(f"/backlane/ui/jobs?text={EVIL[:20]}", headers=HTML).text,
        client.get(f"/backlane/ui/jobs/{job.id}", headers=HTML).text,
    ]
    for page in pages:
        assert "<script>window" not in page
        assert "<img src=x" not in page
        assert "<b>x</b>" not in page and "<i>Boom</i>" not in page
    assert "&lt;script&gt;window.__pwned" in pages[3]


def test_a_job_page_shows_what_python_cannot_read_or_send(
    lane: Backlane, client: TestClient
) -> None:
    """Arguments nested deeper than Python's JSON reader goes, and a result holding a lone
    surrogate (both written by another program): the job page answered 500."""
    deep = "[" * 100_000 + "]" * 100_000
    job = ended(JobState.SUCCEEDED, payload=deep, result='"odd \\ud800 text"')
    stored(lane, client, [job])
    page = client.get(f"/backlane/ui/jobs/{job.id}", headers=HTML)
    assert page.status_code == 200
    assert "[[[[" in page.text and "odd \\ud800 text" in page.text
    reply = client.get(f"/backlane/jobs/{job.id}")
    assert reply.status_code == 200
    assert reply.json()["result"] == "odd \ud800 text"


def test_the_job_page_lists_every_attempt(lane: Backlane, client: TestClient) -> None:
    record = {"started_at": NOW - 60, "ended_at": NOW - 59, "outcome": "retried"}
    job = ended(
        JobState.SUCCEEDED,
        attempts=3,
        result='"ok"',
        attempt_history=[
            {**record, "attempt": 1, "error": {"type": "ConnectionError", "message": "refused"}},
        ],
    )
    stored(lane, client, [job])
    page = client.get(f"/backlane/ui/jobs/{job.id}", headers=HTML).text
    rows = re.findall(r'<tr data-outcome="([^"]+)">\s*<td>(\d+)</td>', page)
    assert rows == [("retried", "1"), ("lease expired", "2"), ("succeeded", "3")]
    assert '<strong class="mono">ConnectionError</strong>: ' in page
    assert '<span class="error-message">refused</span>' in page


def test_the_list_filters_by_state_task_queue_and_text(lane: Backlane, client: TestClient) -> None:
    a = ended(JobState.SUCCEEDED, payload='{"text":"needle in a haystack"}')
    b = ended(JobState.FAILED, queue="mail")
    c = ended(JobState.SUCCEEDED, task="other:task")
    stored(lane, client, [a, b, c])

    def shown(query: str) -> set[str]:
        page = client.get(f"/backlane/ui/jobs?{query}", headers=HTML).text
        return set(re.findall(r"/backlane/ui/jobs/([0-9a-f]{32})", page))

    assert shown("") == {a.id, b.id, c.id}
    assert shown("state=failed") == {b.id}
    assert shown("queue=mail") == {b.id}
    assert shown("task=other%3Atask") == {c.id}
    assert shown("text=NEEDLE") == {a.id}
    assert shown("state=succeeded&task=other%3Atask") == {c.id}
    assert shown("state=") == {a.id, b.id, c.id}  # an empty state filters nothing


@pytest.mark.parametrize("state", ["bogus", "FAILED", "ended", "<b>x</b>"])
def test_an_unknown_state_filter_is_refused(lane: Backlane, client: TestClient, state: str) -> None:
    """It was ignored: the list showed every job, as if the filter had matched them all."""
    stored(lane, client, [ended(JobState.FAILED), ended(JobState.SUCCEEDED)])
    response = client.get("/backlane/ui/jobs", params={"state": state}, headers=HTML)
    assert response.status_code == 422
    page = response.text
    assert re.findall(r"/backlane/ui/jobs/([0-9a-f]{32})", page) == []
    assert f"Unknown state {state!r}" in html.unescape(page)
    assert "choose one of " + ", ".join(s.value for s in JobState) in page
    assert "<b>x</b>" not in page  # shown escaped


def test_the_list_is_paged(lane: Backlane, client: TestClient) -> None:
    jobs = [ended(JobState.SUCCEEDED, created_at=NOW - i) for i in range(PAGE_SIZE + 5)]
    stored(lane, client, jobs)
    first = client.get("/backlane/ui/jobs?state=succeeded", headers=HTML).text
    assert 'rel="next"' in first and 'rel="prev"' not in first
    second = client.get("/backlane/ui/jobs?state=succeeded&page=2", headers=HTML).text
    assert 'rel="prev"' in second and 'rel="next"' not in second
    ids_first = set(re.findall(r"/backlane/ui/jobs/([0-9a-f]{32})", first))
    ids_second = set(re.findall(r"/backlane/ui/jobs/([0-9a-f]{32})", second))
    assert len(ids_first) == PAGE_SIZE and len(ids_second) == 5
    assert ids_first | ids_second == {job.id for job in jobs}
    assert "page=2" in first and "state=succeeded" in first
    assert client.get("/backlane/ui/jobs?page=", headers=HTML).status_code == 200  # the first
    last = client.get(f"/backlane/ui/jobs?page={MAX_PAGE}", headers=HTML)
    assert last.status_code == 200  # past the last job: an empty list, no error
    assert re.findall(r"/backlane/ui/jobs/([0-9a-f]{32})", last.text) == []


@pytest.mark.parametrize(
    "page", ["abc", "0", "-1", "1.5", "2e3", " 2", "+2", "1_0", "٣", str(MAX_PAGE + 1), "9" * 50]
)
def test_a_page_that_is_no_page_number_is_refused(
    lane: Backlane, client: TestClient, page: str
) -> None:
    """It was read as page 1 (and one past the last page number as the last), so a bad
    link showed the newest jobs as if they were the page asked for."""
    stored(lane, client, [ended(JobState.SUCCEEDED)])
    response = client.get("/backlane/ui/jobs", params={"page": page}, headers=HTML)
    assert response.status_code == 422
    assert re.findall(r"/backlane/ui/jobs/([0-9a-f]{32})", response.text) == []
    message = html.unescape(response.text)
    assert f"Invalid page {page[:100]!r}: page is a whole number from 1 to {MAX_PAGE}" in message


@pytest.mark.parametrize(
    "accept",
    [
        None,  # a script that sends no preference
        "*/*",
        "application/json",
        "application/json, text/html",  # JSON ranked as high as a page
        "text/html;q=0.5, application/json",
        "text/html;q=0.5, */*",
        "text/html;q=0",
    ],
)
def test_a_json_client_gets_problems_as_json(
    lane: Backlane, client: TestClient, accept: str | None
) -> None:
    """Every problem was an HTML page, whatever the client asked for."""
    headers = {"accept": accept} if accept is not None else {}
    if accept is None:
        client.headers.pop("accept", None)
    unknown = client.get("/backlane/ui/jobs?state=bogus", headers=headers)
    assert unknown.status_code == 422
    assert unknown.headers["content-type"] == "application/json"
    states = ", ".join(s.value for s in JobState)
    assert unknown.json() == {"detail": f"Unknown state 'bogus': choose one of {states}."}
    page = client.get("/backlane/ui/jobs?page=abc", headers=headers)
    assert (page.status_code, page.json()) == (
        422,
        {"detail": f"Invalid page 'abc': page is a whole number from 1 to {MAX_PAGE}."},
    )
    missing = client.get("/backlane/ui/jobs/0123456789abcdef", headers=headers)
    assert (missing.status_code, missing.json()) == (
        404,
        {"detail": "No job with id 0123456789abcdef."},
    )
    assert "accept" in missing.headers["vary"].lower()
    action = client.post("/backlane/ui/purge", headers={**headers, "origin": LOCAL})
    assert (action.status_code, action.json()) == (
        400,
        {"detail": "Send the dashboard's form (URL-encoded)."},
    )


@pytest.mark.parametrize(
    "accept",
    [
        "text/html",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a browser's
        "text/html, application/json;q=0.9",
    ],
)
def test_a_browser_gets_problems_as_pages(client: TestClient, accept: str) -> None:
    response = client.get("/backlane/ui/jobs?page=0", headers={"accept": accept})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("text/html")
    assert "Invalid page &#39;0&#39;" in response.text and "<nav>" in response.text


def test_actions_retry_cancel_delete_and_purge(lane: Backlane, client: TestClient) -> None:
    failed = ended(JobState.FAILED, error={"type": "E", "message": "m", "traceback": ""})
    waiting = ended(JobState.QUEUED, started_at=None, finished_at=None, keep_until=None)
    old = ended(JobState.SUCCEEDED, finished_at=NOW - 90_000)
    fresh = ended(JobState.SUCCEEDED)
    stored(lane, client, [failed, waiting, old, fresh])

    def state(job: Job) -> JobState | None:
        found = client.portal.call(lane.store.get, job.id)  # type: ignore[union-attr]
        return None if found is None else found.state

    reply = post(client, f"/backlane/ui/jobs/{failed.id}/retry")
    assert reply.status_code == 303
    assert reply.headers["location"] == f"/backlane/ui/jobs/{failed.id}?notice=retried"
    assert state(failed) is JobState.QUEUED
    assert post(client, f"/backlane/ui/jobs/{waiting.id}/cancel").status_code == 303
    assert state(waiting) is JobState.CANCELLED
    notice = post(client, f"/backlane/ui/jobs/{fresh.id}/retry").headers["location"]
    assert notice.endswith("notice=not-retried")
    assert post(client, f"/backlane/ui/jobs/{waiting.id}/delete").status_code == 303
    assert state(waiting) is None
    assert post(client, "/backlane/ui/purge", state="succeeded", older="86400").status_code == 303
    assert state(old) is None and state(fresh) is JobState.SUCCEEDED
    assert post(client, "/backlane/ui/purge", state="everything", older="0").status_code == 400
    assert post(client, "/backlane/ui/jobs/0123456789abcdef/retry").status_code == 404


def test_pausing_a_queue_and_a_schedule(lane: Backlane, client: TestClient) -> None:
    reply = post(client, "/backlane/ui/queues/pause", queue="mail", paused="1")
    assert reply.status_code == 303
    assert client.portal.call(lane.store.paused_queues) == {"mail"}  # type: ignore[union-attr]
    assert "paused" in client.get("/backlane/", headers=HTML).text
    post(client, "/backlane/ui/queues/pause", queue="mail", paused="0")
    assert client.portal.call(lane.store.paused_queues) == set()  # type: ignore[union-attr]

    location = post(client, "/backlane/ui/schedules/pause", name="nope", paused="1")
    assert location.headers["location"].endswith("notice=unknown-schedule")


def test_schedules_show_their_next_fire_time(tmp_path: Any) -> None:
    lane = Backlane(f"sqlite:///{tmp_path}/s.db")

    @lane.every(3600, name="hourly")
    def hourly() -> None: ...

    app = create_app(lane)
    with TestClient(app, base_url=LOCAL) as client:
        page = client.get("/ui/schedules", headers=HTML).text
        assert "hourly" in page and "every 1:00:00" in page
        next_slot = (int(time.time()) // 3600 + 1) * 3600
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(next_slot))
        assert f'datetime="{stamp}+00:00"' in page
        page = client.get("/ui/jobs", headers=HTML).text
        reply = client.post(
            "/ui/schedules/pause",
            data={"name": "hourly", "paused": "1", "csrf": csrf_of(page)},
            headers={"origin": LOCAL},
            follow_redirects=False,
        )
        assert reply.status_code == 303
        records = client.portal.call(lane.store.schedules)  # type: ignore[union-attr]
        assert records["hourly"].paused


def test_a_schedule_due_beyond_the_calendar_is_listed(tmp_path: Any) -> None:
    lane = Backlane(f"sqlite:///{tmp_path}/s.db")

    @lane.every(timedelta(days=3_000_000), name="rare")  # next slot: year 10183
    def rare() -> None: ...

    with TestClient(create_app(lane), base_url=LOCAL) as client:
        page = client.get("/ui/schedules", headers=HTML)
    assert page.status_code == 200 and "rare" in page.text


def test_times_beyond_the_calendar_are_shown_as_none(lane: Backlane, client: TestClient) -> None:
    """A job due beyond year 9999 (stored by another program, or before delays were
    bounded), as the status API shows it with its time as null: the list and its page
    answered 500."""
    far = ended(JobState.QUEUED, run_at=1e300, started_at=None, finished_at=None)
    ancient = ended(JobState.FAILED, finished_at=-1e15, error={"type": "E", "message": "m"})
    stored(lane, client, [far, ancient])
    for path in (
        "/backlane/ui/jobs",
        f"/backlane/ui/jobs/{far.id}",
        f"/backlane/ui/jobs/{ancient.id}",
    ):
        page = client.get(path, headers=HTML)
        assert page.status_code == 200, path
    assert 'datetime=""' not in page.text


def test_workers_show_their_heartbeats_and_held_jobs(lane: Backlane, client: TestClient) -> None:
    from backlane.stores.base import WorkerRecord

    job = ended(JobState.RUNNING, finished_at=None, keep_until=None, worker_id="w-1")
    stored(lane, client, [job])
    record = WorkerRecord(
        id="host:1:abc", started_at=NOW - 60, seen_at=time.time(), concurrency=4, jobs=(job.id,)
    )
    client.portal.call(lane.store.beat, record)  # type: ignore[union-attr]
    page = client.get("/backlane/ui/workers", headers=HTML).text
    assert "host:1:abc" in page and f"/backlane/ui/jobs/{job.id}" in page and "1 / 4" in page


def test_two_dashboards_in_one_process_never_see_each_other(tmp_path: Any) -> None:
    first, second = Backlane("memory://"), Backlane(f"sqlite:///{tmp_path}/b.db")
    app = FastAPI()
    app.include_router(dashboard_router(first, prefix="/one"))
    app.include_router(dashboard_router(second, prefix="/two"))
    mine = Job(task=f"{__name__}:remember", payload='{"text":"mine"}', created_at=NOW)
    theirs = Job(task=f"{__name__}:remember", payload='{"text":"theirs"}', created_at=NOW)

    async def fill() -> None:
        await first.open()
        await second.open()
        await first.store.enqueue([mine])
        await second.store.enqueue([theirs])

    anyio.run(fill)
    try:
        with TestClient(app, base_url=LOCAL) as client:
            one = client.get("/one/ui/jobs", headers=HTML).text
            two = client.get("/two/ui/jobs", headers=HTML).text
        assert mine.id in one and theirs.id not in one
        assert theirs.id in two and mine.id not in two
        assert 'href="/two/ui/jobs"' in two and "/one/" not in two
    finally:
        anyio.run(second.close)


def test_the_standalone_app_serves_at_the_root(lane: Backlane) -> None:
    with TestClient(create_app(lane), base_url=LOCAL) as client:
        assert client.get("/", headers=HTML).status_code == 200
        assert client.get("/jobs/0123456789abcdef").status_code == 404  # the status API
        if importlib.util.find_spec("prometheus_client") is not None:
            assert client.get("/metrics").status_code == 200


def test_the_charts_read_settled_minutes_once() -> None:
    from backlane.dashboard.views import MinuteCache

    lane = Backlane("memory://")
    now = (time.time() // 60) * 60 + 30
    old = [ended(JobState.SUCCEEDED, finished_at=now - 600) for _ in range(3)]
    recent = [ended(JobState.FAILED, finished_at=now - 20)]
    outside = [ended(JobState.SUCCEEDED, finished_at=now - 4000)]
    cache = MinuteCache()

    async def go() -> None:
        await lane.store.enqueue([*old, *recent, *outside])
        first = await cache.last_hour(lane.store, now)
        assert [(b.start, b.succeeded, b.failed) for b in first] == [
            ((now // 60) * 60 - 600, 3, 0),
            ((now // 60) * 60, 0, 1),
        ]
        asked: list[float] = []
        original = lane.store.stats

        async def spy(*, since: float, width: float) -> Any:
            asked.append(since)
            return await original(since=since, width=width)

        lane.store.stats = spy  # type: ignore[method-assign]
        await lane.store.enqueue([ended(JobState.SUCCEEDED, finished_at=now - 10)])
        second = await cache.last_hour(lane.store, now + 5)
        assert asked == [(now // 60) * 60 - 120]  # only the minutes not yet settled
        assert [(b.succeeded, b.failed) for b in second] == [(3, 0), (1, 1)]

    anyio.run(go)
