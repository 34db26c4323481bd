"""Who may open the dashboard (backlane.dashboard.access), in-process: loopback only without
a token, the token when one is set, your dependency when you give one; CSRF on every
action; and the standalone command's refusal to listen elsewhere without a token."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from backlane import Backlane, ConfigurationError, Job
from backlane.cli import cli
from backlane.dashboard.access import TOKEN_ENV, is_loopback_host
from backlane.fastapi import install

HAS_PROMETHEUS = importlib.util.find_spec("prometheus_client") is not None
LOCAL = "http://127.0.0.1:8000"
HTML = {"accept": "text/html"}
TOKEN = "s3cret-token-of-some-length"


def make_client(
    base_url: str = LOCAL, auth: Callable[..., Any] | None = None
) -> tuple[Backlane, TestClient]:
    lane = Backlane("memory://")
    app = FastAPI()
    install(lane, app, workers=0, dashboard=True, dashboard_auth=auth)
    return lane, TestClient(app, base_url=base_url)


@pytest.fixture
def local() -> Iterator[TestClient]:
    _, client = make_client()
    with client:
        yield client


@pytest.fixture
def with_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _, client = make_client()
    with client:
        yield client


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.8.9.10", "localhost", "app.localhost", "::1", "[::1]", "LOCALHOST."],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.com", "", "localhost.evil"])
def test_other_hosts(host: str) -> None:
    assert not is_loopback_host(host)


def test_without_a_token_loopback_requests_are_served(local: TestClient) -> None:
    assert local.get("/backlane/", headers=HTML).status_code == 200
    assert local.get("/backlane/ui/workers").status_code == 200


@pytest.mark.parametrize(
    "base_url", ["http://10.1.2.3:8000", "http://testserver", "http://[2001:db8::1]"]
)
def test_without_a_token_other_addresses_get_401(base_url: str) -> None:
    _, client = make_client(base_url)
    with client:
        page = client.get("/backlane/", headers=HTML)
        assert page.status_code == 401
        assert TOKEN_ENV in page.text and "loopback" in page.text
        assert "<nav>" not in page.text
        api = client.get("/backlane/ui/jobs")
        assert api.status_code == 401 and TOKEN_ENV in api.json()["detail"]
        assert client.post("/backlane/ui/purge", data={"state": "ended"}).status_code == 401
        json_first = {"accept": "application/json, text/html;q=0.5"}  # names HTML, prefers JSON
        script = client.get("/backlane/ui/jobs", headers=json_first)
        assert script.status_code == 401 and TOKEN_ENV in script.json()["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "evil.example:8000"},  # DNS rebinding: a foreign name resolving to 127.0.0.1
        {"x-forwarded-for": "203.0.113.9"},  # a reverse proxy on the same host
        {"forwarded": "for=203.0.113.9"},
        {"x-real-ip": "203.0.113.9"},
        {"x-forwarded-host": "ops.example.com"},
    ],
)
def test_loopback_is_not_enough_for_a_foreign_host_or_a_proxy(
    local: TestClient, headers: dict[str, str]
) -> None:
    assert local.get("/backlane/", headers={**HTML, **headers}).status_code == 401


def test_a_token_is_asked_of_everyone_once_set(with_token: TestClient) -> None:
    page = with_token.get("/backlane/ui/jobs", headers=HTML)
    assert page.status_code == 401  # loopback included
    assert 'name="token"' in page.text and 'type="password"' in page.text
    assert with_token.get("/backlane/ui/jobs").status_code == 401
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert with_token.get("/backlane/ui/jobs", headers=bearer).status_code == 200
    assert with_token.get("/backlane/", headers={**HTML, **bearer}).status_code == 200
    wrong = {"authorization": f"Bearer {TOKEN}x"}
    assert with_token.get("/backlane/ui/jobs", headers=wrong).status_code == 401


def test_a_token_opens_the_dashboard_from_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _, client = make_client("http://10.1.2.3:8000")
    with client:
        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert client.get("/backlane/", headers={**HTML, **bearer}).status_code == 200


def test_the_login_form_sets_a_strict_httponly_session(with_token: TestClient) -> None:
    form = with_token.get("/backlane/ui/login", headers=HTML).text
    csrf = csrf_of(form)
    origin = {"origin": LOCAL}
    bad = with_token.post(
        "/backlane/ui/login", data={"token": "nope", "csrf": csrf}, headers=origin
    )
    assert bad.status_code == 401 and "not the token" in bad.text
    good = with_token.post(
        "/backlane/ui/login",
        data={"token": TOKEN, "csrf": csrf, "next": "/backlane/ui/workers"},
        headers=origin,
        follow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"] == "/backlane/ui/workers"
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/backlane/" in cookie
    assert TOKEN not in cookie
    assert with_token.get("/backlane/ui/workers", headers=HTML).status_code == 200
    page = with_token.get("/backlane/", headers=HTML).text
    out = with_token.post(
        "/backlane/ui/logout", data={"csrf": csrf_of(page)}, headers=origin, follow_redirects=False
    )
    assert out.status_code == 303
    assert with_token.get("/backlane/", headers=HTML).status_code == 401


def test_a_dashboard_in_a_mounted_app_keeps_its_login_and_forms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dashboard of an app mounted at /admin (or served with a root path) set its
    cookies for /backlane/, a path its pages are not under: the browser never sent them
    back, so logging in answered 403 and every action failed its CSRF check."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    lane = Backlane("memory://")
    admin = FastAPI()
    install(lane, admin, workers=0, dashboard=True)
    app = FastAPI()
    app.mount("/admin", admin)
    origin = {"origin": LOCAL}
    with TestClient(app, base_url=LOCAL) as client:
        csrf = csrf_of(client.get("/admin/backlane/ui/login", headers=HTML).text)
        login = client.post(
            "/admin/backlane/ui/login",
            data={"token": TOKEN, "csrf": csrf},
            headers=origin,
            follow_redirects=False,
        )
        assert login.status_code == 303 and login.headers["location"] == "/admin/backlane/"
        assert "Path=/admin/backlane/" in login.headers["set-cookie"]
        page = client.get("/admin/backlane/ui/jobs", headers=HTML)
        assert page.status_code == 200
        paused = client.post(
            "/admin/backlane/ui/queues/pause",
            data={"csrf": csrf_of(page.text), "queue": "q", "paused": "1"},
            headers=origin,
            follow_redirects=False,
        )
        assert paused.status_code == 303
        out = client.post(
            "/admin/backlane/ui/logout",
            data={"csrf": csrf_of(page.text)},
            headers=origin,
            follow_redirects=False,
        )
        assert out.status_code == 303
        assert client.get("/admin/backlane/", headers=HTML).status_code == 401


def test_login_sends_nobody_elsewhere(with_token: TestClient) -> None:
    csrf = csrf_of(with_token.get("/backlane/ui/login", headers=HTML).text)
    for target in ["https://evil.example/", "//evil.example/x", "/backlane/..//evil", "/other"]:
        reply = with_token.post(
            "/backlane/ui/login",
            data={"token": TOKEN, "csrf": csrf, "next": target},
            headers={"origin": LOCAL},
            follow_redirects=False,
        )
        assert reply.headers["location"] == "/backlane/", target


def test_a_short_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigurationError, match="at least 16"):
        make_client()


def test_your_dependency_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # ignored: the dependency decides

    def only_alice(request: Request) -> None:
        if request.headers.get("x-user") != "alice":
            raise HTTPException(status_code=403, detail="alice only")

    _, client = make_client("http://10.1.2.3:8000", auth=only_alice)
    with client:
        assert client.get("/backlane/", headers=HTML).status_code == 403
        assert client.get("/backlane/ui/jobs").status_code == 403
        alice = {**HTML, "x-user": "alice"}
        assert client.get("/backlane/", headers=alice).status_code == 200
        assert client.get("/backlane/ui/jobs", headers={"x-user": "alice"}).status_code == 200


def test_actions_need_the_pages_csrf_token_and_origin(local: TestClient) -> None:
    lane: Backlane = local.app.state.backlane  # type: ignore[attr-defined]
    (job,) = local.portal.call(  # type: ignore[union-attr]
        lane.store.enqueue, [Job(task="x:y", payload="{}")]
    )
    url = f"/backlane/ui/jobs/{job.id}/cancel"
    csrf = csrf_of(local.get("/backlane/ui/jobs", headers=HTML).text)
    assert local.post(url, headers={"origin": LOCAL}).status_code == 400  # not a form
    assert local.post(url, data={"x": "1"}, headers={"origin": LOCAL}).status_code == 403
    assert local.post(url, data={"csrf": "x" * 43}, headers={"origin": LOCAL}).status_code == 403
    cross = {"origin": "http://evil.example"}
    assert local.post(url, data={"csrf": csrf}, headers=cross).status_code == 403
    assert local.post(url, data={"csrf": csrf}, headers={"origin": "null"}).status_code == 403
    local.cookies.clear()  # a cross-site post arrives without the SameSite=Strict cookie
    assert local.post(url, data={"csrf": csrf}, headers={"origin": LOCAL}).status_code == 403
    csrf = csrf_of(local.get("/backlane/ui/jobs", headers=HTML).text)
    done = local.post(url, data={"csrf": csrf}, headers={"origin": LOCAL}, follow_redirects=False)
    assert done.status_code == 303


@pytest.mark.parametrize("header", ["origin", "referer"])
def test_an_origin_that_is_no_url_is_refused_not_a_500(local: TestClient, header: str) -> None:
    """``Origin: http://[`` (no valid URL) made every action answer 500."""
    url = "/backlane/ui/queues/pause"
    csrf = csrf_of(local.get("/backlane/ui/jobs", headers=HTML).text)
    form = {"csrf": csrf, "queue": "q", "paused": "1"}
    reply = local.post(url, data=form, headers={header: "http://["})
    assert reply.status_code == 403 and "CSRF" in reply.text


@pytest.mark.skipif(not HAS_PROMETHEUS, reason="prometheus-client is not installed")
def test_metrics_follow_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    _, client = make_client()
    with client:
        assert client.get("/backlane/metrics").status_code == 200
        assert client.get("/backlane/metrics", headers={"host": "evil.example"}).status_code == 401
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _, client = make_client("http://10.1.2.3:8000")
    with client:
        assert client.get("/backlane/metrics").status_code == 401
        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert client.get("/backlane/metrics", headers=bearer).status_code == 200


def test_a_bearer_token_needs_no_csrf_field(with_token: TestClient) -> None:
    bearer = {"authorization": f"Bearer {TOKEN}"}
    reply = with_token.post(
        "/backlane/ui/queues/pause",
        data={"queue": "mail", "paused": "1"},
        headers=bearer,
        follow_redirects=False,
    )
    assert reply.status_code == 303


def test_the_status_api_and_assets_stay_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    lane, client = make_client("http://10.1.2.3:8000")
    with client:
        (job,) = client.portal.call(  # type: ignore[union-attr]
            lane.store.enqueue, [Job(task="x:y", payload="{}")]
        )
        assert client.get(f"/backlane/jobs/{job.id}").json()["state"] == "queued"
        assert client.get("/backlane/ui/static/dashboard.js").status_code == 200
        assert client.get("/backlane/ui/static/nope.js").status_code == 404
        assert client.get("/backlane/ui/login", headers=HTML).status_code == 200


def test_dashboard_auth_without_a_dashboard_is_a_mistake() -> None:
    with pytest.raises(ConfigurationError, match="dashboard=True"):
        install(Backlane("memory://"), FastAPI(), dashboard_auth=lambda: None, metrics=False)


def test_the_command_refuses_other_addresses_without_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    runner = CliRunner()
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        result = runner.invoke(cli, ["dashboard", f"{__name__}:LANE", "--host", host])
        assert result.exit_code == 2, result.output
        assert "not a loopback address" in result.output and TOKEN_ENV in result.output
    monkeypatch.setenv(TOKEN_ENV, "short")
    result = runner.invoke(cli, ["dashboard", f"{__name__}:LANE"])
    assert result.exit_code == 2 and "at least 16" in result.output


def test_the_command_serves_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served: dict[str, Any] = {}

    def fake_run(app: Any, **options: Any) -> None:
        served.update(options, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    result = CliRunner().invoke(
        cli, ["dashboard", f"{__name__}:LANE", "--host", "0.0.0.0", "--port", "9123"]
    )
    assert result.exit_code == 0, result.output
    assert served["host"] == "0.0.0.0" and served["port"] == 9123
    assert served["app"].state.backlane is LANE


LANE = Backlane("memory://")
