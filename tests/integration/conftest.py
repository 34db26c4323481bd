from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.recorder import RECORD


@pytest.fixture(params=["memory", "sqlite"])
def lane_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/lane.db"


@pytest.fixture(autouse=True)
def fresh_record() -> Iterator[None]:
    RECORD.clear()
    yield
    RECORD.clear()
