"""What a running task may ask for: its ``TaskContext`` and FastAPI-style ``Depends``.

Dependencies are resolved in the worker when the job runs, so each job gets fresh
resources (a new database session per job), and generator dependencies are closed after
the task ends.

FastAPI is never imported here: a ``Depends(...)`` marker can only exist once the task's
module has imported FastAPI, so markers are recognised through the ``fastapi.params``
module already loaded, and a worker whose tasks declare none never loads FastAPI.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import anyio


class TaskContext:
    """Handed to a task that declares a parameter annotated ``TaskContext``.

    ``job_id`` and ``attempt`` (1 for the first run) identify the run; ``progress()`` records
    how far it got; ``cancelled`` is set when someone asked the job to stop.
    """

    def __init__(
        self,
        *,
        job_id: str,
        task: str,
        attempt: int,
        queue: str,
        report: Callable[[float | None, str | None], Awaitable[None]],
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.state: Mapping[str, Any] = state if state is not None else {}
        """What the lane's lifespan yielded in this process (a pool, a client); empty
        when the lane has none."""
        self.job_id = job_id
        self.task = task
        self.attempt = attempt
        self.queue = queue
        self.cancelled = anyio.Event()
        self._report = report

    def __repr__(self) -> str:
        return f"<TaskContext {self.task} job={self.job_id} attempt={self.attempt}>"

    @property
    def cancel_requested(self) -> bool:
        """True once cancellation of this job was asked for."""
        return self.cancelled.is_set()

    async def progress(self, fraction: float | None, message: str | None = None) -> None:
        """Record progress: ``fraction`` from 0 to 1 (None keeps it unknown) and a message."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction}")
        await self._report(fraction, message)

    def progress_sync(self, fraction: float | None, message: str | None = None) -> None:
        """``progress()`` for a ``def`` task running in the worker's thread pool."""
        anyio.from_thread.run(self.progress, fraction, message)


def _depends_type() -> type | None:
    """FastAPI's ``Depends`` marker class, if FastAPI was imported (else no marker exists)."""
    params = sys.modules.get("fastapi.params")
    found = getattr(params, "Depends", None)
    return found if isinstance(found, type) else None


def dependency_of(default: Any, hint: Any) -> Any | None:
    """The ``Depends(...)`` marker of a parameter (as its default or in ``Annotated``)."""
    depends = _depends_type()
    if depends is None:
        return None
    if isinstance(default, depends):
        return default
    if typing.get_origin(hint) is typing.Annotated:
        for meta in typing.get_args(hint)[1:]:
            if isinstance(meta, depends):
                return meta
    return None


async def resolve_dependencies(
    deps: dict[str, Any],
    *,
    stack: AsyncExitStack,
    context: TaskContext,
    cache: dict[Callable[..., Any], Any] | None = None,
) -> dict[str, Any]:
    """Call each dependency (and what it depends on) and return the values by parameter
    name. Generator dependencies are entered on ``stack`` and closed when it closes."""
    cache = {} if cache is None else cache
    values: dict[str, Any] = {}
    for name, marker in deps.items():
        values[name] = await _solve(marker, stack=stack, context=context, cache=cache)
    return values


async def _solve(
    marker: Any, *, stack: AsyncExitStack, context: TaskContext, cache: dict[Any, Any]
) -> Any:
    call = marker.dependency
    if call is None:
        raise TypeError("Depends() in a task needs an explicit dependency callable")
    if marker.use_cache and call in cache:
        return cache[call]
    try:
        hints = typing.get_type_hints(call, include_extras=True)
    except Exception:
        hints = {}
    kwargs: dict[str, Any] = {}
    for param in inspect.signature(call).parameters.values():
        hint = hints.get(param.name, Any)
        sub = dependency_of(param.default, hint)
        if sub is not None:
            kwargs[param.name] = await _solve(sub, stack=stack, context=context, cache=cache)
        elif isinstance(hint, type) and issubclass(hint, TaskContext):
            kwargs[param.name] = context
        elif param.default is inspect.Parameter.empty:
            raise TypeError(
                f"dependency {getattr(call, '__qualname__', call)!r} needs parameter "
                f"{param.name!r}, which a worker cannot provide (only Depends() and "
                "TaskContext are available outside a request)"
            )
    if inspect.isasyncgenfunction(call):
        value = await stack.enter_async_context(asynccontextmanager(call)(**kwargs))
    elif inspect.isgeneratorfunction(call):
        value = stack.enter_context(contextmanager(call)(**kwargs))
    else:
        value = call(**kwargs)
        if inspect.isawaitable(value):
            value = await value
    if marker.use_cache:
        cache[call] = value
    return value
