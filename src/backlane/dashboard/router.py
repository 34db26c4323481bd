"""The dashboard's routes: pages, actions, login, assets and the metrics endpoint.

Everything hangs off one router built per lane: two dashboards in one process (two lanes,
or one lane under two prefixes) share nothing. Pages are Jinja2 templates with
autoescaping on; every asset (CSS, JavaScript) is served from this package, with a
Content-Security-Policy that allows no inline script and nothing from elsewhere.

Paths, under the prefix (``/backlane`` for ``lane.install(app, dashboard=True)``):

=================================  ==================================================
``GET /``                          overview: queues, counts, charts, workers
``GET /ui/jobs``                   jobs, filtered (``state``, ``task``, ``queue``,
                                   ``text``) and paged (``page``)
``GET /ui/jobs/{id}``              one job, live
``GET /ui/schedules``              schedules and their next fire times
``GET /ui/workers``                workers, heartbeats and held jobs
``POST /ui/jobs/{id}/retry``       and ``/cancel``, ``/delete``
``POST /ui/purge``                 remove ended jobs
``POST /ui/queues/pause``          pause or resume a queue (``queue``, ``paused``)
``POST /ui/schedules/pause``       pause or resume a schedule (``name``, ``paused``)
``GET|POST /ui/login``, ``POST /ui/logout``
``GET /ui/static/{file}``          the CSS and JavaScript (public)
``GET /metrics``                   Prometheus text format
=================================  ==================================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ..exceptions import JobNotFound
from ..jobs import TERMINAL_STATES, JobState
from . import views
from .access import TOKEN_ENV, Access

if TYPE_CHECKING:
    from ..app import Backlane

log = logging.getLogger("backlane.dashboard")

STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
MAX_FORM_BYTES = 16_384
PURGE_AGES = {"0": 0.0, "3600": 3600.0, "86400": 86400.0, "604800": 604800.0}
NOTICES = {
    "retried": "The job was queued again.",
    "not-retried": "Only a failed or cancelled job can be retried.",
    "cancelled": "The job was cancelled.",
    "cancel-asked": "The job was asked to stop; its worker will end it.",
    "not-cancelled": "The job had already ended.",
    "deleted": "The job was deleted.",
    "purged": "Ended jobs were removed.",
    "paused": "Paused.",
    "resumed": "Resumed.",
    "unknown-schedule": "No schedule by that name.",
    "logged-out": "Logged out.",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    version: str


def _load_assets() -> dict[str, _Asset]:
    folder = files("backlane.dashboard").joinpath("static")
    assets = {}
    for name, media_type in STATIC_FILES.items():
        body = folder.joinpath(name).read_bytes()
        assets[name] = _Asset(body, media_type, hashlib.sha256(body).hexdigest()[:12])
    return assets


def _normalized(prefix: str) -> str:
    prefix = prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"a prefix starts with '/', got {prefix!r}")
    return prefix


def dashboard_router(
    lane: Backlane,
    *,
    prefix: str = "/backlane",
    auth: Callable[..., Any] | None = None,
    pages: bool = True,
    metrics: bool | None = None,
) -> APIRouter:
    """The dashboard of ``lane`` as a router to include in an app (no further prefix):
    pages and actions under ``{prefix}/`` when ``pages``; Prometheus metrics at
    ``{prefix}/metrics`` when ``metrics`` is True (``ImportError`` without
    prometheus-client) or None and prometheus-client is installed.

    Access follows ``backlane.dashboard.access``: the dependency ``auth`` if given (it runs
    on every page, action and scrape, and refuses by raising), else the
    ``BACKLANE_DASHBOARD_TOKEN`` token, else loopback requests only. Raises
    ``ConfigurationError`` for a token that is too short."""
    prefix = _normalized(prefix)
    access = Access.decide(auth=auth, cookie_path=prefix + "/")
    site = _Site(lane, prefix, access)
    dependencies = [Depends(auth)] if auth is not None else []
    guarded = APIRouter(
        prefix=prefix,
        route_class=site.guarded_route(),
        dependencies=dependencies,
        include_in_schema=False,
    )
    if metrics is None:
        metrics = importlib.util.find_spec("prometheus_client") is not None
        if not metrics:
            log.warning("backlane: no metrics at %s/metrics: prometheus-client is missing", prefix)
    if metrics:
        from ..metrics import metrics_for

        metrics_for(lane)  # the registry exists before the first attempt is observed
        guarded.add_api_route("/metrics", site.metrics, methods=["GET"])
    if pages:
        guarded.add_api_route("/", site.overview, methods=["GET"])
        guarded.add_api_route("/ui/jobs", site.jobs, methods=["GET"])
        guarded.add_api_route("/ui/jobs/{job_id}", site.job, methods=["GET"])
        guarded.add_api_route("/ui/schedules", site.schedules, methods=["GET"])
        guarded.add_api_route("/ui/workers", site.workers, methods=["GET"])
        for action in ("retry", "cancel", "delete"):
            guarded.add_api_route(
                f"/ui/jobs/{{job_id}}/{action}", site.job_action(action), methods=["POST"]
            )
        guarded.add_api_route("/ui/purge", site.purge, methods=["POST"])
        guarded.add_api_route("/ui/queues/pause", site.pause_queue, methods=["POST"])
        guarded.add_api_route("/ui/schedules/pause", site.pause_schedule, methods=["POST"])
        guarded.add_api_route("/ui/logout", site.logout, methods=["POST"])
    router = APIRouter(include_in_schema=False)
    router.include_router(guarded)
    if pages:
        router.add_api_route(prefix + "/ui/login", site.login_page, methods=["GET"])
        router.add_api_route(prefix + "/ui/login", site.login, methods=["POST"])
        router.add_api_route(prefix + "/ui/static/{name}", site.static, methods=["GET"])
    return router


class _Site:
    """The handlers of one dashboard, sharing its lane, templates, assets and access rule."""

    def __init__(self, lane: Backlane, prefix: str, access: Access) -> None:
        self.lane = lane
        self.prefix = prefix
        self.access = access
        self.assets = _load_assets()
        self.minutes = views.MinuteCache()
        self.templates = Environment(
            loader=PackageLoader("backlane.dashboard", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.globals.update(
            iso=views.iso,
            seconds=_seconds,
            states=views.STATE_ORDER,
            terminal_states=[s.value for s in TERMINAL_STATES],
        )

    # -- plumbing --------------------------------------------------------------------

    def base(self, request: Request) -> str:
        """Where this dashboard lives for ``request`` (the app's root path included)."""
        return str(request.scope.get("root_path", "")) + self.prefix

    def guarded_route(self) -> type[APIRoute]:
        """A route class that lets a request through only if the access rule allows it."""
        site = self

        class GuardedRoute(APIRoute):
            def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
                handler = super().get_route_handler()

                async def guarded(request: Request) -> Response:
                    if not site.access.allowed(request):
                        return site.denied(request)
                    await site.lane.open()
                    return await handler(request)

                return guarded

        return GuardedRoute

    def denied(self, request: Request) -> Response:
        """401: the login form (token mode) or why the dashboard is closed (loopback mode)
        for a browser's GET (see ``wants_html``), JSON for anyone else."""
        headers = {"WWW-Authenticate": 'Bearer realm="backlane"', "Vary": "Accept"}
        if request.method == "GET" and wants_html(request):
            target = request.url.path
            if request.url.query:
                target += "?" + request.url.query
            return self.render(
                request, "login.html", status_code=401, headers=headers, next=target, failed=False
            )
        if self.access.mode == "token":
            detail = "log in: send Authorization: Bearer <token> (BACKLANE_DASHBOARD_TOKEN)"
        else:
            detail = (
                f"the dashboard answers only loopback requests without a token; set "
                f"{TOKEN_ENV} on the server and send Authorization: Bearer <token>"
            )
        return JSONResponse({"detail": detail}, status_code=401, headers=headers)

    def render(
        self,
        request: Request,
        template: str,
        *,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """A page, with this browser's CSRF token in its forms and the security headers."""
        csrf, new = self.access.csrf_token(request)
        base = self.base(request)
        notice = NOTICES.get(request.query_params.get("notice", ""))
        html = self.templates.get_template(template).render(
            base=base,
            csrf=csrf,
            static=lambda name: f"{base}/ui/static/{name}?v={self.assets[name].version}",
            session=self.access.mode == "token",
            mode=self.access.mode,
            token_env=TOKEN_ENV,
            notice=notice,
            request_path=request.url.path,
            **context,
        )
        # text another program stored may hold lone surrogates, which UTF-8 cannot carry
        body = html.encode("utf-8", "backslashreplace")
        response = HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
        for name, value in (headers or {}).items():
            response.headers[name] = value
        if new:
            self.access.set_csrf(response, request, csrf)
        return response

    async def form(self, request: Request) -> dict[str, str] | None:
        """The fields of a URL-encoded form POST, or None if it is not one (or too big)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return None
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return None
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return None
        return dict(pairs)

    async def checked_form(self, request: Request) -> dict[str, str] | Response:
        """The form of an action, or the 403 for a request that is not this dashboard's
        own (see ``Access.csrf_ok``)."""
        form = await self.form(request)
        if form is None:
            return self.problem(request, 400, "Send the dashboard's form (URL-encoded).")
        if not self.access.csrf_ok(request, form):
            return self.problem(
                request, 403, "This request did not come from the dashboard's own page "
                "(CSRF check failed). Reload the page and try again."
            )  # fmt: skip
        return form

    def problem(self, request: Request, status: int, message: str) -> Response:
        """An error answer with ``status`` saying ``message``: a page for a browser (see
        ``wants_html``), else JSON ``{"detail": message}`` as FastAPI's own errors are."""
        if wants_html(request):
            return self.render(
                request,
                "problem.html",
                status_code=status,
                headers={"Vary": "Accept"},
                message=message,
            )
        return JSONResponse(
            {"detail": message}, status_code=status, headers={**SECURITY_HEADERS, "Vary": "Accept"}
        )

    def back(self, request: Request, form: dict[str, str], fallback: str, notice: str) -> Response:
        """303 to the form's ``next`` page when it is one of this dashboard's, else to
        ``fallback``, with a notice from ``NOTICES``."""
        base = self.base(request)
        target = form.get("next", "")
        if not (target.startswith(base + "/") and "//" not in target and "\\" not in target):
            target = fallback
        path, _, query = target.partition("?")
        params = [(k, v) for k, v in parse_qsl(query) if k != "notice"]
        if notice:
            params.append(("notice", notice))
        query = urlencode(params)
        return RedirectResponse(f"{path}?{query}" if query else path, status_code=303)

    # -- pages -----------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        data = await views.overview(self.lane, self.minutes)
        return self.render(request, "overview.html", page="overview", data=data)

    async def jobs(self, request: Request) -> Response:
        """The job list; 422 naming the parameter and what it takes for an unknown
        ``state`` filter or a ``page`` that is no page number."""
        try:
            filters = views.JobFilters.parse(dict(request.query_params))
        except ValueError as exc:
            return self.problem(request, 422, str(exc))
        data = await views.job_list(self.lane, filters)
        return self.render(
            request,
            "jobs.html",
            page="jobs",
            data=data,
            link=lambda **changes: "?" + urlencode(filters.query(**changes)),
            purge_ages=list(PURGE_AGES),
        )

    async def job(self, request: Request, job_id: str) -> Response:
        job = await self.lane.store.get(job_id)
        if job is None:
            return self.problem(request, 404, f"No job with id {job_id}.")
        return self.render(request, "job.html", page="jobs", data=views.job_page(job))

    async def schedules(self, request: Request) -> Response:
        rows = await views.schedule_rows(self.lane)
        return self.render(request, "schedules.html", page="schedules", rows=rows)

    async def workers(self, request: Request) -> Response:
        rows = await views.worker_rows(self.lane)
        return self.render(request, "workers.html", page="workers", rows=rows)

    async def metrics(self) -> Response:
        from ..metrics import CONTENT_TYPE, exposition

        body = await exposition(self.lane)
        return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    # -- actions ---------------------------------------------------------------------

    def job_action(self, action: str) -> Callable[[Request, str], Awaitable[Response]]:
        async def act(request: Request, job_id: str) -> Response:
            form = await self.checked_form(request)
            if isinstance(form, Response):
                return form
            base = self.base(request)
            page = f"{base}/ui/jobs/{job_id}"
            if await self.lane.store.get(job_id) is None:
                return self.problem(request, 404, f"No job with id {job_id}.")
            if action == "delete":
                await self.lane.store.delete([job_id])
                self.lane.notifier.notify()
                return self.back(request, {}, f"{base}/ui/jobs", "deleted")
            try:
                if action == "retry":
                    notice = "retried" if await self.lane.retry(job_id) else "not-retried"
                else:
                    state = await self.lane.cancel(job_id)
                    notice = {
                        JobState.CANCELLED: "cancelled",
                        JobState.RUNNING: "cancel-asked",
                    }.get(state, "not-cancelled")
            except JobNotFound:
                return self.problem(request, 404, f"No job with id {job_id}.")
            return self.back(request, form, page, notice)

        return act

    async def purge(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        which = form.get("state", "expired")
        age = PURGE_AGES.get(form.get("older", "0"))
        ended = [s for s in JobState if s.terminal]
        if age is None or which not in {"expired", "ended", *(s.value for s in ended)}:
            return self.problem(request, 400, "Choose what to purge from the form's lists.")
        now = time.time()
        if which == "expired":
            await self.lane.store.purge(before=now)
        else:
            states = ended if which == "ended" else [JobState(which)]
            await self.lane.store.purge(before=now - age, states=states)
        return self.back(request, form, f"{self.base(request)}/ui/jobs", "purged")

    async def pause_queue(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        queue = form.get("queue", "").strip()
        if not queue:
            return self.problem(request, 400, "Name the queue.")
        paused = form.get("paused") == "1"
        await self.lane.store.pause_queue(queue, paused)
        self.lane.notifier.notify()
        return self.back(request, form, self.base(request) + "/", "paused" if paused else "resumed")

    async def pause_schedule(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        name = form.get("name", "")
        paused = form.get("paused") == "1"
        fallback = f"{self.base(request)}/ui/schedules"
        if name not in self.lane.schedules and name not in await self.lane.store.schedules():
            return self.back(request, form, fallback, "unknown-schedule")
        await self.lane.store.pause_schedule(name, paused)
        self.lane.notifier.notify()
        return self.back(request, form, fallback, "paused" if paused else "resumed")

    # -- login and assets ------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        target = request.query_params.get("next", self.base(request) + "/")
        if self.access.allowed(request) and self.access.mode != "dependency":
            return RedirectResponse(self.base(request) + "/", status_code=303)
        return self.render(request, "login.html", next=target, failed=False)

    async def login(self, request: Request) -> Response:
        form = await self.form(request)
        if form is None or self.access.mode != "token":
            return self.problem(request, 400, "There is no token to log in with here.")
        if not self.access.csrf_ok(request, form):
            return self.problem(request, 403, "Reload the login page and try again.")
        if not self.access.check_login(form.get("token", "")):
            return self.render(
                request, "login.html", status_code=401, next=form.get("next", ""), failed=True
            )
        response = self.back(request, form, self.base(request) + "/", "")
        self.access.start_session(response, request)
        return response

    async def logout(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        response = RedirectResponse(
            f"{self.base(request)}/ui/login?notice=logged-out", status_code=303
        )
        self.access.end_session(response, request)
        return response

    async def static(self, name: str) -> Response:
        asset = self.assets.get(name)
        if asset is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(
            asset.body,
            media_type=asset.media_type,
            headers={
                "Cache-Control": "public, max-age=86400",
                "X-Content-Type-Options": "nosniff",
            },
        )


def wants_html(request: Request) -> bool:
    """Whether ``request`` asks for a page rather than JSON: its ``Accept`` header names
    ``text/html`` (as a browser's does) with a higher quality than it gives JSON (through
    ``application/json``, else ``application/*``, else ``*/*``). No header, ``*/*`` alone,
    or JSON ranked as high: JSON."""
    qualities: dict[str, float] = {}
    for item in request.headers.get("accept", "").split(","):
        media_type, *params = (part.strip().lower() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        qualities[media_type] = max(quality, qualities.get(media_type, 0.0))
    html = qualities.get("text/html", 0.0)
    json = next(
        (qualities[t] for t in ("application/json", "application/*", "*/*") if t in qualities),
        0.0,
    )
    return html > 0 and html > json


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    from .charts import seconds_label

    return seconds_label(value)
