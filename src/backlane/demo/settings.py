"""The demo's settings, from ``BACKLANE_DEMO_*`` environment variables, and the layout of
its data folder.

Everything the service writes lives under ``data_dir``, under names the server chooses::

    jobs.db        the job store (unless BACKLANE_URL names another)
    demo.db        the service's own data: users, the request log, uploads, exports
    service.log    the log the /log and /process examples append to
    mailbox.jsonl  the mail the local SMTP sink received
    uploads/       uploaded files and their processed results
    users/         one folder per registered user
    exports/       CSV exports
    tmp/           temporary files: uploads in progress; the only folder /cleanup touches
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoSettings(BaseSettings):
    """What the demo is configured with; ``backlane demo`` sets the environment from its
    options, so that every worker running the demo's tasks reads the same."""

    model_config = SettingsConfigDict(env_prefix="BACKLANE_DEMO_", extra="ignore")

    data_dir: Path = Path("backlane-demo")
    """Where the service keeps everything (made absolute)."""
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    """The largest file ``/upload`` accepts; a larger one is answered 413."""
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """The largest body any other request may have."""
    admin_email: str = "admin@example.com"
    """Who ``/register`` notifies."""
    local_smtp: bool = False
    """Set by ``backlane demo`` when it runs its own SMTP sink into ``mailbox``."""

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def jobs_url(self) -> str:
        """The job store used when ``BACKLANE_URL`` is not set."""
        return f"sqlite:///{self.data_dir / 'jobs.db'}"

    @property
    def database(self) -> Path:
        return self.data_dir / "demo.db"

    @property
    def service_log(self) -> Path:
        return self.data_dir / "service.log"

    @property
    def mailbox(self) -> Path:
        return self.data_dir / "mailbox.jsonl"

    @property
    def uploads(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def users(self) -> Path:
        return self.data_dir / "users"

    @property
    def exports(self) -> Path:
        return self.data_dir / "exports"

    @property
    def tmp(self) -> Path:
        return self.data_dir / "tmp"

    def make_dirs(self) -> None:
        """Create the data folder and its sub-folders (idempotent)."""
        for folder in (self.data_dir, self.uploads, self.users, self.exports, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
