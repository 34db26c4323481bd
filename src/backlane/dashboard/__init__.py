"""The web dashboard: see and steer every job of a lane, on any store.

Embedded: ``lane.install(app, dashboard=True)`` serves it at ``/backlane/`` (the install
``prefix``), with Prometheus metrics at ``/backlane/metrics``. Standalone:
``backlane dashboard MODULE:ATTR --port 8001``, or ``create_app(lane)`` under any ASGI
server. Who may open it is decided by ``backlane.dashboard.access`` (loopback only, unless
``BACKLANE_DASHBOARD_TOKEN`` or your own dependency says otherwise).

Each call builds a new router with its own templates and state: two dashboards in one
process never see each other. Needs ``jinja2`` (and ``prometheus-client`` for metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .access import TOKEN_ENV, Access, is_local_request, is_loopback_host

try:
    from .router import dashboard_router
except ImportError as exc:  # pragma: no cover - jinja2 is a dev dependency
    if exc.name not in {"jinja2", "markupsafe"}:
        raise
    raise ImportError(
        "backlane's dashboard needs jinja2: pip install 'backlane[dashboard]' "
        "(or jinja2 and prometheus-client)"
    ) from exc

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..app import Backlane

__all__ = [
    "TOKEN_ENV",
    "Access",
    "create_app",
    "dashboard_router",
    "is_local_request",
    "is_loopback_host",
]


def create_app(
    lane: Backlane, *, auth: Callable[..., Any] | None = None, prefix: str = ""
) -> FastAPI:
    """A FastAPI app serving only ``lane``'s dashboard (at ``prefix``, default the root),
    its metrics and the status API, with no worker and no scheduler: the standalone
    dashboard. It opens the store at startup and closes it at shutdown. Access as
    ``dashboard_router``."""
    from fastapi import FastAPI

    from ..fastapi import install

    app = FastAPI(title="backlane dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    install(
        lane, app, workers=0, scheduler=False, prefix=prefix, dashboard=True, dashboard_auth=auth
    )
    return app
