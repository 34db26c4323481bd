"""Importable functions for the schedule tests."""

RUNS: list[str] = []


def tick() -> None:
    RUNS.append("tick")


def needs_argument(x: int) -> None:
    RUNS.append(str(x))
