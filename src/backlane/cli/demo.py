"""``backlane demo``: serve the reference service, every example of the background-tasks
guide, on this machine with nothing to set up."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from ._app import LogLevel, _configure_logging, _fail, _redact, cli

log = logging.getLogger("backlane.cli")

_NEEDS = ("uvicorn", "jinja2", "multipart", "email_validator", "aiosmtplib", "aiosmtpd")


@cli.command()
def demo(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            file_okay=False,
            help="Folder for everything the service keeps (created if missing).",
        ),
    ] = Path("backlane-demo"),
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Logging level, to stderr.")
    ] = LogLevel.info,
) -> None:
    """Serve the demo: the guide's examples, a home page to try them, live job states.

    Jobs are stored in DATA_DIR/jobs.db unless BACKLANE_URL names a store; one worker runs
    inside the server. Mail goes to BACKLANE_SMTP_HOST if set, else to a local SMTP server
    started on a free loopback port, whose mail /demo/mailbox shows. Ctrl-C stops it
    gracefully.
    """
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        _fail(
            f"the demo needs {', '.join(missing)}: pip install 'backlane[demo]'",
            code=2,
        )
    import uvicorn

    from ..email import MailSink

    _configure_logging(log_level.value)
    folder = data_dir.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # Every part of the service, and every worker it starts, reads its settings from here.
    os.environ["BACKLANE_DEMO_DATA_DIR"] = str(folder)
    sink: MailSink | None = None
    if not os.environ.get("BACKLANE_SMTP_HOST"):
        sink = MailSink(folder / "mailbox.jsonl").start()
        os.environ["BACKLANE_SMTP_HOST"] = sink.host
        os.environ["BACKLANE_SMTP_PORT"] = str(sink.port)
        os.environ["BACKLANE_DEMO_LOCAL_SMTP"] = "1"
    else:
        os.environ["BACKLANE_DEMO_LOCAL_SMTP"] = "0"
    try:
        from ..demo import create_app

        app = create_app()
        lane = app.state.backlane
        smtp = f"{os.environ['BACKLANE_SMTP_HOST']}:{os.environ.get('BACKLANE_SMTP_PORT', '')}"
        log.info(
            "backlane demo on http://%s:%d  (data %s; jobs %s; mail %s%s)",
            host,
            port,
            folder,
            _redact(lane.url),
            smtp.rstrip(":"),
            ", the local sink: see /demo/mailbox" if sink is not None else "",
        )
        uvicorn.run(app, host=host, port=port, log_level=log_level.value, access_log=False)
    finally:
        if sink is not None:
            sink.stop()
