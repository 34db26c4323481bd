"""The systems ``benchmarks/compare.py`` runs side by side: one module per peer.

Each ``with_<library>.py`` holds that library's app, the benchmark's tasks and its
recommended set-up (``PEER``); ``web_*.py`` are the guide's exercise apps. This file only
lists them, so the orchestrator can read it without any peer installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class System:
    name: str
    module: str
    venv: str
    """``backlane`` (the project's own environment) or a section of requirements-peers.txt."""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def postgres(self) -> bool:
        """Whether it keeps its jobs in PostgreSQL (its database is made anew for it)."""
        return self.name in ("backlane-postgres", "saq-pg", "procrastinate")


SYSTEMS = [
    System("backlane-sqlite", "with_backlane", "backlane", {"BENCH_BACKLANE_STORE": "sqlite"}),
    System("backlane-redis", "with_backlane", "backlane", {"BENCH_BACKLANE_STORE": "redis"}),
    System("backlane-postgres", "with_backlane", "backlane", {"BENCH_BACKLANE_STORE": "postgres"}),
    System("celery", "with_celery", "main"),
    System("arq", "with_arq", "redis5"),
    System("rq", "with_rq", "main"),
    System("dramatiq", "with_dramatiq", "main"),
    System("saq", "with_saq", "redis5", {"BENCH_SAQ_STORE": "redis"}),
    System("saq-pg", "with_saq", "redis5", {"BENCH_SAQ_STORE": "postgres"}),
    System("taskiq", "with_taskiq", "main"),
    System("huey", "with_huey", "main", {"BENCH_HUEY_STORE": "redis"}),
    System("huey-sqlite", "with_huey", "main", {"BENCH_HUEY_STORE": "sqlite"}),
    System("procrastinate", "with_procrastinate", "main"),
]


@dataclass(frozen=True)
class WebApp:
    """One set-up of the guide's exercise: a uvicorn app and, if any, its worker command."""

    name: str
    app: str
    venv: str
    env: dict[str, str] = field(default_factory=dict)
    workers: str = ""
    """``celery`` or ``backlane``: start that library's worker processes beside the app."""
    durable: bool = True
    quick: bool = True
    """Part of ``--quick`` runs too."""


WEB_APPS = [
    WebApp("BackgroundTasks", "peers.web_fastapi:app", "backlane", durable=False),
    WebApp(
        "Celery", "peers.web_celery:app", "main", {"BENCH_CELERY_RESULTS": "1"}, workers="celery"
    ),
    WebApp(
        "backlane-sqlite (embedded)",
        "peers.web_backlane:app",
        "backlane",
        {"BENCH_BACKLANE_STORE": "sqlite", "BENCH_EMBEDDED": "1"},
        quick=False,
    ),
    WebApp(
        "backlane-sqlite",
        "peers.web_backlane:app",
        "backlane",
        {"BENCH_BACKLANE_STORE": "sqlite"},
        workers="backlane",
    ),
    WebApp(
        "backlane-redis",
        "peers.web_backlane:app",
        "backlane",
        {"BENCH_BACKLANE_STORE": "redis"},
        workers="backlane",
    ),
    WebApp(
        "backlane-postgres",
        "peers.web_backlane:app",
        "backlane",
        {"BENCH_BACKLANE_STORE": "postgres"},
        workers="backlane",
    ),
]
