"""``backlane dashboard``: serve a lane's dashboard on its own, with uvicorn."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from ..exceptions import ConfigurationError
from ._app import LogLevel, _configure_logging, _fail, _redact, cli, load_lane

log = logging.getLogger("backlane.cli")


@cli.command()
def dashboard(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:ATTR",
            help="The lane: a Backlane, or a FastAPI app with one installed.",
            show_default=False,
        ),
    ],
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Anything but loopback needs BACKLANE_DASHBOARD_TOKEN."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8001,
    prefix: Annotated[
        str, typer.Option(help="Path to serve it under, e.g. /backlane (default: the root).")
    ] = "",
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Logging level, to stderr.")
    ] = LogLevel.info,
) -> None:
    """Serve the lane's dashboard, metrics and status API; no worker, no scheduler.

    Without BACKLANE_DASHBOARD_TOKEN it listens only on a loopback address (127.0.0.1,
    localhost, ::1) and answers only requests made there directly; with a token it may
    listen anywhere and asks every request for the token. It refuses to start on another
    address without a token (exit code 2).
    """
    from ..dashboard.access import TOKEN_ENV, is_loopback_host, token_from_environment

    try:
        token = token_from_environment()
    except ConfigurationError as exc:
        _fail(str(exc), code=2)
    if token is None and not is_loopback_host(host):
        _fail(
            f"refusing to serve the dashboard on {host}, which is not a loopback address, "
            f"without a token: set {TOKEN_ENV} to a long random secret (at least 16 "
            "characters), or listen on 127.0.0.1",
            code=2,
        )
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        raise typer.BadParameter(
            "start it with '/' and do not end it with one, e.g. /backlane", param_hint="'--prefix'"
        )
    try:
        import uvicorn
    except ImportError:
        _fail("the standalone dashboard needs uvicorn: pip install uvicorn", code=2)
    lane = load_lane(target)
    _configure_logging(log_level.value)
    from ..dashboard import create_app

    app = create_app(lane, prefix=prefix)
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "dashboard of %s on http://%s:%d%s/ (%s)",
        _redact(lane.url),
        shown,
        port,
        prefix,
        "token required" if token else "loopback only, no token",
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level.value,
        proxy_headers=False,
        server_header=False,
    )
