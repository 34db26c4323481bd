"""The ``backlane`` command: run workers, and look after jobs from a shell.

::

    backlane worker MODULE:ATTR [--concurrency N] [--threads N] [--processes N] [--queues a,b]
    backlane jobs | show ID | retry ID | cancel ID | purge --older-than 7d | counts

The commands that look after jobs find the store through ``--url URL`` or
``--app MODULE:ATTR``, else ``BACKLANE_URL``, else ``sqlite:///./backlane.db``. Output is
a table for people and JSON (``--json``) for scripts.

Exit codes: 0 done; 1 the store could not do it (unknown id, a store error, a worker
process that failed); 2 the command line was wrong (a bad duration, a ``MODULE:ATTR`` that
cannot be imported or is not a lane, a bad URL); ``backlane retry`` also 3 (the job is not
failed or cancelled) and 4 (its key is held by an active job).
"""

from __future__ import annotations

import importlib
import importlib.util

from ._app import cli, load_lane
from .jobs import parse_duration

__all__ = ["cli", "load_lane", "main", "parse_duration"]

# Each command group lives in its own module and registers itself on ``cli``; a group whose
# module is absent from this build is simply not offered.
for _group in ("worker", "jobs", "schedules", "migrate", "demo", "dashboard"):
    if importlib.util.find_spec(f"{__name__}.{_group}") is not None:
        importlib.import_module(f"{__name__}.{_group}")


def main() -> None:
    """Entry point of the ``backlane`` console script and of ``python -m backlane``."""
    cli(prog_name="backlane")
