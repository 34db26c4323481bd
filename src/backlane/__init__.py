"""backlane: durable background work for FastAPI.

Change one import (``from backlane.fastapi import BackgroundTasks``) and every
``add_task`` is stored before the reply, retried, observable, and run by workers on
SQLite, Redis or PostgreSQL.
"""

from .app import Backlane, Settings
from .context import TaskContext
from .exceptions import (
    BacklaneError,
    ConfigurationError,
    DriverMissing,
    InvalidArguments,
    JobFailed,
    JobNotFound,
    NotImportable,
    ResultTimeout,
    StoreError,
    TaskError,
    UnknownTask,
)
from .jobs import Job, JobHandle, JobState
from .retry import Retry, RetryPolicy
from .tasks import Task, TaskCall

__version__ = "0.1.0"

__all__ = [
    "Backlane",
    "BacklaneError",
    "ConfigurationError",
    "DriverMissing",
    "InvalidArguments",
    "Job",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobState",
    "NotImportable",
    "ResultTimeout",
    "Retry",
    "RetryPolicy",
    "Settings",
    "StoreError",
    "Task",
    "TaskCall",
    "TaskContext",
    "TaskError",
    "UnknownTask",
    "__version__",
]
