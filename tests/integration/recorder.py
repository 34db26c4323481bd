"""Importable task functions for the integration tests; each records what it did."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import anyio


@dataclass
class Record:
    events: list[tuple[str, str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, label: str) -> None:
        with self.lock:
            self.events.append((what, label, time.monotonic()))

    def labels(self, what: str = "end") -> list[str]:
        with self.lock:
            return [label for kind, label, _ in self.events if kind == what]

    def clear(self) -> None:
        with self.lock:
            self.events.clear()


RECORD = Record()


async def slow_async(label: str, seconds: float = 0.05) -> str:
    RECORD.add("start", label)
    await anyio.sleep(seconds)
    RECORD.add("end", label)
    return label


def slow_sync(label: str, seconds: float = 0.05) -> str:
    RECORD.add("start", label)
    time.sleep(seconds)
    RECORD.add("end", label)
    return label


def failing(label: str) -> None:
    RECORD.add("start", label)
    RECORD.add("end", label)
    raise RuntimeError(f"{label} failed on purpose")


def note(label: str) -> None:
    RECORD.add("end", label)


RESOURCE: dict[str, str] = {}
"""What an app's lifespan sets up and tears down, as a database pool would be."""


async def uses_resource(label: str, seconds: float = 0.0) -> None:
    RECORD.add("start", f"{label}:{RESOURCE.get('pool', 'missing')}")
    await anyio.sleep(seconds)
    RECORD.add("end", f"{label}:{RESOURCE.get('pool', 'missing')}")
