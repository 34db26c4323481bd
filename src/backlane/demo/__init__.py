"""The reference service: every example of the background-tasks guide as a real, secure
app on backlane. Run it with ``backlane demo``; build it with ``create_app()``."""

from .app import create_app

__all__ = ["create_app"]
