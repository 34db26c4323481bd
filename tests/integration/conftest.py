from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.recorder import RECORD
from tests.services import KINDS, store_url


@pytest.fixture(params=KINDS)
def lane_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh store of every kind (Redis and PostgreSQL: a namespace of its own
    on the real server)."""
    with store_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_record() -> Iterator[None]:
    RECORD.clear()
    yield
    RECORD.clear()
