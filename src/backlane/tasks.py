"""Tasks: a function made durable, its options, and the codec for its arguments.

Arguments are validated against the function's signature with pydantic and stored as JSON;
the worker decodes them back to the annotated types. Results are encoded the same way from
the return annotation. Nothing is pickled.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import numbers
import sys
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError
from typing_extensions import ParamSpec

from .context import TaskContext, dependency_of
from .exceptions import InvalidArguments, NotImportable, TaskError, UnknownTask
from .jobs import Job, JobHandle, JobState
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .app import Backlane

log = logging.getLogger("backlane")

P = ParamSpec("P")
R = TypeVar("R")

_ANY: TypeAdapter[Any] = TypeAdapter(Any)
_BY_POSITION = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ArgumentCodec:
    """Validates call arguments against a signature and turns them into JSON and back."""

    def __init__(self, func: Callable[..., Any], task_name: str) -> None:
        self.task_name = task_name
        signature = inspect.signature(func)
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except Exception:  # unresolvable forward references: treat as Any
            hints = {}
        self.context_param: str | None = None
        self.dependencies: dict[str, Any] = {}
        self.adapters: dict[str, TypeAdapter[Any]] = {}
        call_params = []
        self._by_position: set[str] = set()
        """Parameters the worker passes by position when given: those before any that the
        worker fills itself (``TaskContext``, dependencies), which it passes by keyword."""
        injected: str | None = None
        """The first parameter the worker fills itself, if any comes by position."""
        for param in signature.parameters.values():
            hint = hints.get(param.name, Any)
            is_context = _is_context(hint)
            dep = None if is_context else dependency_of(param.default, hint)
            if dep is not None or is_context:
                if param.kind is param.POSITIONAL_ONLY:
                    raise TaskError(
                        f"task {task_name!r}: parameter {param.name!r} is filled by the worker, "
                        "which passes it by keyword: it cannot be positional-only"
                    )
                if dep is None:
                    self.context_param = param.name
                else:
                    self.dependencies[param.name] = dep
                if param.kind is param.POSITIONAL_OR_KEYWORD and injected is None:
                    injected = param.name
                continue
            if param.kind is param.VAR_POSITIONAL and injected is not None:
                raise TaskError(
                    f"task {task_name!r}: parameter {injected!r} is filled by the worker, "
                    f"which passes it by keyword, so it cannot come before *{param.name}: "
                    f"put it after *{param.name} (keyword-only)"
                )
            if param.kind is param.POSITIONAL_OR_KEYWORD and injected is None:
                self._by_position.add(param.name)
            if param.kind is param.VAR_POSITIONAL:
                hint = list[hint]  # type: ignore[valid-type]
            elif param.kind is param.VAR_KEYWORD:
                hint = dict[str, hint]  # type: ignore[valid-type]
            self.adapters[param.name] = _adapter(
                hint, f"task {task_name!r}: parameter {param.name!r}"
            )
            call_params.append(param)
        self.call_signature = signature.replace(parameters=call_params)
        self.kinds = {p.name: p.kind for p in call_params}
        self._positional: tuple[str, ...] | None = None
        """The parameters' names in order when every one may be given by position (no
        ``*args``, ``**kwargs`` or keyword-only ones): positional arguments then need no
        ``Signature.bind``."""
        self._required = 0
        if all(p.kind in _BY_POSITION for p in call_params):
            self._positional = tuple(p.name for p in call_params)
            self._required = sum(p.default is p.empty for p in call_params)
        returns = hints.get("return", Any)
        self.result_adapter: TypeAdapter[Any] = _adapter(
            returns, f"task {task_name!r}: return annotation"
        )

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The arguments as JSON text. Raises ``InvalidArguments`` naming each problem."""
        names = self._positional
        arguments: Any
        if not kwargs and names is not None and self._required <= len(args) <= len(names):
            arguments = zip(names, args, strict=False)  # as bind gives them, only faster
        else:
            try:
                arguments = self.call_signature.bind(*args, **kwargs).arguments.items()
            except TypeError as exc:
                raise InvalidArguments(
                    self.task_name, [{"loc": [], "msg": str(exc), "type": "signature"}]
                ) from None
        errors: list[dict[str, Any]] = []
        encoded: dict[str, Any] = {}
        for name, value in arguments:
            adapter = self.adapters[name]
            try:
                encoded[name] = adapter.dump_python(adapter.validate_python(value), mode="json")
            except ValidationError as exc:
                for err in exc.errors(include_url=False, include_context=False):
                    loc = [name, *err["loc"]]
                    errors.append({"loc": loc, "msg": err["msg"], "type": err["type"]})
            except PydanticSerializationError as exc:
                errors.append(
                    {
                        "loc": [name],
                        "msg": f"cannot be stored as JSON ({exc}); annotate the parameter "
                        "with a JSON-friendly type or a pydantic model",
                        "type": "not_json",
                    }
                )
        if errors:
            raise InvalidArguments(self.task_name, errors)
        return json.dumps(encoded, separators=(",", ":"))

    def decode(self, payload: str) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments from JSON text, as the annotated types: the
        call ``func(*args, **kwargs)`` binds each parameter as ``encode`` was given it."""
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError("payload is not a JSON object")
        unknown = data.keys() - self.kinds.keys()
        if unknown:
            raise ValueError(f"payload names unknown parameter {min(unknown)!r}")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        by_position = True  # until a parameter that may come by position is left out
        for name, kind in self.kinds.items():
            if name not in data:
                if kind in _BY_POSITION:
                    by_position = False
                continue
            value = self.adapters[name].validate_python(data[name])
            if kind is inspect.Parameter.POSITIONAL_ONLY or (
                by_position and name in self._by_position
            ):
                args.append(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            else:
                kwargs[name] = value
        return args, kwargs

    def encode_result(self, value: Any) -> str:
        """The return value as JSON text. A value that does not match the return annotation
        is stored as it is, with a warning naming the task (failing the job would run the
        task again); a value JSON cannot hold raises ``PydanticSerializationError``."""
        try:
            return self.result_adapter.dump_json(value, warnings="error").decode()
        except PydanticSerializationError:
            text = self.result_adapter.dump_json(value, warnings=False).decode()
        try:
            self.result_adapter.validate_json(text)  # a tuple for a list, say: no harm done
            return text
        except ValidationError:
            pass
        log.warning(
            "task %r returned %s, which does not match its return annotation: stored as it "
            "is; handle.result() will refuse it",
            self.task_name,
            type(value).__name__,
        )
        return text

    def decode_result(self, text: str) -> Any:
        """A stored result as the annotated return type; ``TaskError`` if it does not match
        the annotation."""
        try:
            return self.result_adapter.validate_json(text)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise TaskError(
                f"the result of task {self.task_name!r} does not match its return "
                f"annotation: {first['msg']} (stored: {text[:200]})"
            ) from None


def _adapter(hint: Any, what: str) -> TypeAdapter[Any]:
    """A pydantic adapter for ``hint``, or ``TaskError`` saying ``what`` has a type that
    cannot be validated or stored as JSON."""
    try:
        return TypeAdapter(hint)
    except PydanticSchemaGenerationError:
        raise TaskError(
            f"{what}: {hint!r} cannot be validated or stored as JSON; annotate it with a "
            "JSON-friendly type (str, int, datetime, a pydantic model, a dataclass...) and "
            "pass what the task needs to rebuild the object (a path, an id)"
        ) from None


def _is_context(hint: Any) -> bool:
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return isinstance(hint, type) and issubclass(hint, TaskContext)


@dataclass(frozen=True)
class EnqueueOptions:
    """Scheduling options, kept apart from a task's own arguments."""

    delay: float | None = None
    at: datetime | None = None
    key: str | None = None
    priority: int | None = None
    queue: str | None = None
    connection: Any = None
    """A caller's database connection or session: enqueue inside its transaction."""

    def __post_init__(self) -> None:
        if self.delay is not None and self.at is not None:
            raise ValueError("give either delay= or at=, not both")
        delay = self.delay
        if delay is not None and (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or delay != delay  # NaN
            or delay in (math.inf, -math.inf)
        ):
            raise ValueError(f"delay= must be a finite number of seconds, got {delay!r}")
        if delay is not None and abs(delay) > MAX_DELAY:
            raise ValueError(
                f"delay= must be at most {MAX_DELAY:.0f} seconds (a century) either way, "
                f"got {self.delay!r}; for a time, give at= a datetime"
            )
        if self.at is not None:
            if not isinstance(self.at, datetime):
                raise TypeError(f"at= must be a datetime, got {self.at!r}")
            if self.at.tzinfo is None:
                raise ValueError("at= must be timezone-aware (e.g. datetime.now(timezone.utc))")
        if self.key is not None and not (isinstance(self.key, str) and self.key):
            raise ValueError(f"key= must be a non-empty string, got {self.key!r}")
        if self.priority is not None:
            check_priority(self.priority, "priority=")
        if self.queue is not None:
            check_name(self.queue, "queue=")


MAX_DELAY: Final = 100 * 365.25 * 86400
"""The longest ``delay=``, either way: a century (a job's times stay dates)."""

PRIORITY_RANGE: Final = (-(2**31), 2**31 - 1)
"""Priorities every store can hold (PostgreSQL keeps them in an ``integer``)."""


def check_priority(priority: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``priority`` is an int every store can hold."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {priority!r}")
    if not low <= int(priority) <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {priority}")


def check_name(name: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a non-empty string (a queue or task name)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")


_NO_OPTIONS = EnqueueOptions()


class Task(Generic[P, R]):
    """A function backlane can run in any worker process. Calling it runs it here, now;
    ``enqueue`` stores a job for a worker."""

    def __init__(
        self,
        lane: Backlane,
        func: Callable[P, R],
        *,
        name: str,
        policy: RetryPolicy,
        timeout: float | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> None:
        check_name(name, f"task {name!r}: name=")
        check_name(queue, f"task {name!r}: queue=")
        check_priority(priority, f"task {name!r}: priority=")
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0
        ):
            raise ValueError(
                f"task {name!r}: timeout= must be a number of seconds above 0 (or None for "
                f"none), got {timeout!r}"
            )
        self.lane = lane
        self.func = func
        self.name = name
        self.policy = policy
        self.timeout = timeout
        self.queue = queue
        self.priority = int(priority)
        self.is_async = inspect.iscoroutinefunction(func)
        self.codec = ArgumentCodec(func, name)
        self._plain: TaskCall[P, R] = TaskCall(self, _NO_OPTIONS)
        """This task without options: what ``enqueue`` uses."""
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def build_job(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: EnqueueOptions | None = None,
        *,
        state: JobState = JobState.QUEUED,
        now: float | None = None,
    ) -> Job:
        """A job for this call, its arguments validated and encoded (nothing stored yet)."""
        opts = options or _NO_OPTIONS
        now = time.time() if now is None else now
        run_at = now
        if opts.delay is not None:
            run_at = now + opts.delay
        elif opts.at is not None:
            run_at = opts.at.timestamp()
        return Job(
            task=self.name,
            payload=self.codec.encode(args, kwargs),
            queue=opts.queue or self.queue,
            priority=self.priority if opts.priority is None else int(opts.priority),
            state=state,
            key=opts.key,
            run_at=run_at,
            created_at=now,
        )

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Store a job running this task with these arguments; returns its handle."""
        return await self._plain.enqueue(*args, **kwargs)

    def options(
        self,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        key: str | None = None,
        priority: int | None = None,
        queue: str | None = None,
        connection: Any = None,
    ) -> TaskCall[P, R]:
        """This task with scheduling options: ``delay`` (seconds or timedelta) or ``at``
        (aware datetime), an idempotency ``key``, ``priority`` (higher first), ``queue``, and
        ``connection``: the caller's database connection (PostgreSQL store), so that the job
        exists only if the caller's transaction commits."""
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        opts = EnqueueOptions(
            delay=seconds, at=at, key=key, priority=priority, queue=queue, connection=connection
        )
        return TaskCall(self, opts)


class TaskCall(Generic[P, R]):
    """A task bound to enqueue options; ``enqueue`` stores the job."""

    def __init__(self, task: Task[P, R], options: EnqueueOptions) -> None:
        self.task = task
        self.opts = options

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Store a job running the task with these arguments; returns its handle. With a
        ``key`` already held by an unfinished job, returns that job's handle instead."""
        job = self.task.build_job(args, kwargs, self.opts)
        (stored,) = await self.task.lane.enqueue_jobs([job], connection=self.opts.connection)
        return JobHandle(self.task.lane, stored.id, stored.task)


# -- finding functions by name --------------------------------------------------------

AnyCallable = Callable[..., Any] | Callable[..., Awaitable[Any]]


def import_name(func: Callable[..., Any]) -> str:
    """The name a worker process can import ``func`` by (``module:qualname``).

    Raises ``NotImportable`` saying why, for lambdas, closures, nested functions, methods
    and functions defined in ``__main__``."""
    what = getattr(func, "__qualname__", None) or repr(func)
    how = (
        "define it at module level in an importable module, or decorate it with @lane.task; "
        "for in-process, non-durable execution use add_local_task()"
    )
    if inspect.iscoroutine(func):
        func.close()  # never to be awaited: no "never awaited" warning on top of this error
        raise NotImportable(
            f"{what!s} is a coroutine, not a function: write add_task({what}, arg, ...), "
            f"not add_task({what}(arg, ...))"
        )
    if isinstance(func, functools.partial):
        raise NotImportable(
            f"{what!s} is a functools.partial, which a worker cannot find by name: pass "
            f"{getattr(func.func, '__qualname__', 'the function')} itself, with all its "
            "arguments, to add_task or enqueue"
        )
    if not inspect.isfunction(func):
        raise NotImportable(
            f"{what!s} is not a plain function, so a worker cannot find it by name: {how}"
        )
    if func.__name__ == "<lambda>":
        raise NotImportable(f"a lambda has no name another process can import: {how}")
    if "<locals>" in func.__qualname__:
        raise NotImportable(
            f"{func.__qualname__} is defined inside another function (a closure or nested "
            f"function), so another process cannot import it: {how}"
        )
    if func.__module__ == "__main__":
        raise NotImportable(
            f"{func.__qualname__} is defined in __main__, which a worker process cannot "
            f"import: {how}"
        )
    name = f"{func.__module__}:{func.__qualname__}"
    found = _resolve(func.__module__, func.__qualname__)
    if getattr(found, "__wrapped__", found) is not func and found is not func:
        raise NotImportable(f"{name} does not lead back to the same function: {how}")
    return name


def resolve_import_name(name: str) -> Callable[..., Any]:
    """The function a ``module:qualname`` job names. Refuses anything but a plain function
    defined in that module, and anything from the standard library."""
    module, sep, qualname = name.partition(":")
    if not sep or not module or not qualname:
        raise UnknownTask(f"no task named {name!r} is registered with this lane")
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise UnknownTask(f"task {name!r} names a standard-library function; refused")
    try:
        found = _resolve(module, qualname)
    except (ImportError, AttributeError) as exc:
        raise UnknownTask(f"task {name!r} cannot be imported here: {exc}") from exc
    func = getattr(found, "func", found) if isinstance(found, Task) else found
    if not inspect.isfunction(func) or f"{func.__module__}:{func.__qualname__}" != name:
        raise UnknownTask(f"{name!r} is not a function defined in {module}; refused")
    return typing.cast(Callable[..., Any], found)


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
