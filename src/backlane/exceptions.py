"""Errors raised by backlane.

Every error backlane raises on its own account derives from one root::

    BacklaneError
    ├── ConfigurationError      a setting or URL backlane cannot use
    │   └── DriverMissing       the store's driver is not installed (names the extra)
    ├── TaskError               a task that cannot be registered or found
    │   ├── NotImportable       a function another process could not import by name
    │   └── UnknownTask         a job names a task this process does not know
    ├── InvalidArguments        arguments that do not fit the task's signature (also a ValueError)
    ├── JobNotFound             no job has this id
    ├── JobFailed               awaited a result of a job that failed or was cancelled
    ├── ResultTimeout           a result did not arrive in time (also a TimeoutError)
    ├── StoreError              the store could not do what was asked
    └── PermanentMailError      (backlane.email) a mail no retry can deliver
        ├── MailRefused         every recipient refused it for good
        ├── MailPartlyRefused   some recipients took it, others refused it
        ├── MailNotAccepted     the login, the sender or the message refused for good
        └── MailNotSupported    the server lacks STARTTLS, a certificate that verifies, AUTH
                                or SMTPUTF8

Driver errors (sqlite3, redis, psycopg) are mapped to ``StoreError`` where they enter.
Signals a task raises to steer its own run (``Retry``) are not errors and live in
``backlane.retry``.
"""

from __future__ import annotations

from typing import Any


class BacklaneError(Exception):
    """Root of every error backlane raises on its own account."""


class ConfigurationError(BacklaneError):
    """A setting or URL backlane cannot use."""


class DriverMissing(ConfigurationError):
    """The driver a store needs is not installed."""


class TaskError(BacklaneError):
    """A task that cannot be registered or found."""


class NotImportable(TaskError):
    """A function that another process could not import by its name."""


class UnknownTask(TaskError):
    """A job names a task that this process cannot find."""


class InvalidArguments(BacklaneError, ValueError):
    """Arguments that do not fit a task's signature; nothing was stored.

    ``errors()`` lists one entry per problem: ``{"loc": [...], "msg": ..., "type": ...}``,
    as pydantic and FastAPI do.
    """

    def __init__(self, task: str, errors: list[dict[str, Any]]) -> None:
        self.task = task
        self._errors = errors
        super().__init__(self.describe(task, errors))

    def errors(self) -> list[dict[str, Any]]:
        """One entry per problem found."""
        return list(self._errors)

    @staticmethod
    def describe(task: str, errors: list[dict[str, Any]]) -> str:
        """The message: the task, then each parameter and what is wrong with it."""
        parts = []
        for err in errors:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "")
            parts.append(f"parameter '{loc}': {err['msg']}" if loc else str(err["msg"]))
        return f"task '{task}' refused its arguments: " + "; ".join(parts)


class JobNotFound(BacklaneError, LookupError):
    """No job has this id."""


class JobFailed(BacklaneError):
    """The awaited job ended failed or cancelled; ``error`` holds what it recorded."""

    def __init__(self, job_id: str, state: str, error: dict[str, Any] | None) -> None:
        self.job_id = job_id
        self.state = state
        self.error = error or {}
        detail = f": {self.error.get('type')}: {self.error.get('message')}" if error else ""
        super().__init__(f"job {job_id} ended {state}{detail}")


class ResultTimeout(BacklaneError, TimeoutError):
    """The job did not finish within the time given."""


class StoreError(BacklaneError):
    """The store could not carry out an operation."""
