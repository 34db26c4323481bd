"""Arguments are validated against the signature and survive the JSON round trip."""

import dataclasses
import enum
import functools
import uuid
import warnings
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest

from backlane import Backlane, InvalidArguments, NotImportable, TaskContext
from backlane.exceptions import TaskError, UnknownTask
from backlane.tasks import ArgumentCodec, import_name, resolve_import_name


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class User(pydantic.BaseModel):
    email: pydantic.EmailStr
    name: str


@dataclasses.dataclass
class Point:
    x: int
    y: int


def everything(
    path: Path, when: datetime, ident: uuid.UUID, amount: Decimal, colour: Colour,
    user: User, point: Point, /, *rest: int, flag: bool = False, **extra: str,
) -> dict[str, int]:  # fmt: skip
    return {}


def test_rich_types_round_trip() -> None:
    codec = ArgumentCodec(everything, "everything")
    when = datetime(2026, 3, 29, 1, 30, tzinfo=timezone.utc)
    ident = uuid.uuid4()
    user = User(email="a@example.com", name="Ann")
    payload = codec.encode(
        (Path("/tmp/x.txt"), when, ident, Decimal("1.10"), Colour.BLUE, user, Point(1, 2), 7, 8),
        {"flag": True, "note": "hi"},
    )
    assert isinstance(payload, str) and "pickle" not in payload
    args, kwargs = codec.decode(payload)
    assert args == [Path("/tmp/x.txt"), when, ident, Decimal("1.10"), Colour.BLUE, user,
                    Point(1, 2), 7, 8]  # fmt: skip
    assert kwargs == {"flag": True, "note": "hi"}
    assert type(args[3]) is Decimal and type(args[6]) is Point


def collects(a: int, b: int = 2, *rest: int, c: int = 3, **extra: int) -> list[object]:
    return [a, b, list(rest), c, extra]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1,), {}),
        ((1, 5), {}),
        ((1, 5, 6, 7), {}),  # *rest after parameters given by position
        ((1, 5, 6), {"c": 9, "z": 4}),
        ((), {"a": 1, "b": 5}),
        ((1,), {"c": 9}),  # b left to its default, c by keyword
        ((), {"b": 5, "a": 1, "y": 0}),
    ],
)
def test_the_task_receives_the_arguments_as_given(
    args: tuple[int, ...], kwargs: dict[str, int]
) -> None:
    codec = ArgumentCodec(collects, "collects")
    decoded_args, decoded_kwargs = codec.decode(codec.encode(args, kwargs))
    assert collects(*decoded_args, **decoded_kwargs) == collects(*args, **kwargs)


def with_context_first(ctx: TaskContext, a: int, b: int = 2) -> list[object]:
    return [ctx, a, b]


def test_parameters_after_the_context_reach_the_task_beside_it() -> None:
    codec = ArgumentCodec(with_context_first, "with_context_first")
    args, kwargs = codec.decode(codec.encode((1, 5), {}))
    kwargs[codec.context_param or ""] = "the context"  # as the worker adds it
    assert with_context_first(*args, **kwargs) == ["the context", 1, 5]


def context_before_rest(a: int, ctx: TaskContext, *rest: int) -> None:
    raise NotImplementedError


def context_by_position_only(ctx: TaskContext, /, a: int) -> None:
    raise NotImplementedError


def test_a_parameter_the_worker_fills_must_be_one_it_can_pass_by_keyword() -> None:
    # The worker passes TaskContext and dependencies by keyword: before *rest, every job
    # with extra positional arguments failed ("got multiple values for argument 'ctx'").
    with pytest.raises(TaskError, match=r"'ctx' .* cannot come before \*rest: put it after"):
        ArgumentCodec(context_before_rest, "context_before_rest")
    with pytest.raises(TaskError, match="'ctx' .* cannot be positional-only"):
        ArgumentCodec(context_by_position_only, "context_by_position_only")


def test_a_parameter_type_that_json_cannot_hold_is_refused_when_the_task_is_made() -> None:
    import io

    def takes_file(f: io.BytesIO) -> None:
        raise NotImplementedError

    with pytest.raises(TaskError, match=r"task 'mod:takes_file': parameter 'f': .*BytesIO"):
        ArgumentCodec(takes_file, "mod:takes_file")


def test_mismatch_names_task_parameter_and_problem() -> None:
    codec = ArgumentCodec(everything, "mod:everything")
    with pytest.raises(InvalidArguments) as caught:
        codec.encode((Path("x"), "not a date", uuid.uuid4(), "1", "green",
                      {"email": "nope", "name": "x"}, Point(1, 2)), {})  # fmt: skip
    message = str(caught.value)
    assert "task 'mod:everything'" in message
    assert "parameter 'when'" in message
    assert "parameter 'colour'" in message
    assert "parameter 'user.email'" in message
    locs = [e["loc"] for e in caught.value.errors()]
    assert ["when"] in locs and ["user", "email"] in locs


def test_wrong_arity_is_refused() -> None:
    codec = ArgumentCodec(everything, "everything")
    with pytest.raises(InvalidArguments, match="missing a required argument"):
        codec.encode((Path("x"),), {})


def test_unannotated_object_that_is_not_json_is_refused() -> None:
    def takes(thing):  # type: ignore[no-untyped-def]
        return thing

    codec = ArgumentCodec(takes, "takes")
    with pytest.raises(InvalidArguments, match="parameter 'thing'.*JSON"):
        codec.encode((object(),), {})


def test_result_encoded_from_return_annotation() -> None:
    def returns() -> datetime:
        raise NotImplementedError

    codec = ArgumentCodec(returns, "returns")
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert codec.decode_result(codec.encode_result(when)) == when


def test_a_result_that_does_not_match_its_annotation_is_kept_and_refused_when_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def counts() -> int:
        raise NotImplementedError

    def pairs() -> list[int]:
        raise NotImplementedError

    codec = ArgumentCodec(counts, "mod:counts")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic's own serializer warning stays quiet
        stored = codec.encode_result("many")
    assert stored == '"many"'  # kept: failing the job would run its task again
    assert "task 'mod:counts' returned str, which does not match" in caplog.text
    with pytest.raises(TaskError, match=r"result of task 'mod:counts' does not match"):
        codec.decode_result(stored)
    caplog.clear()
    lenient = ArgumentCodec(pairs, "mod:pairs")
    assert lenient.decode_result(lenient.encode_result((1, 2))) == [1, 2]
    assert caplog.text == ""  # a tuple for a list reads back fine: nothing to say


def module_level(x: int) -> int:
    return x


async def sends(x: int) -> None:
    raise NotImplementedError


def test_plain_function_is_named_by_import_path() -> None:
    assert import_name(module_level) == "tests.unit.test_codec:module_level"
    assert resolve_import_name("tests.unit.test_codec:module_level") is module_level


def test_functions_another_process_cannot_find_are_refused() -> None:
    def nested() -> None: ...

    with pytest.raises(NotImportable, match="lambda"):
        import_name(lambda: None)
    with pytest.raises(NotImportable, match="inside another function"):
        import_name(nested)
    main_func = type(module_level)(module_level.__code__, {"__name__": "__main__"}, "main_func")
    main_func.__module__ = "__main__"
    with pytest.raises(NotImportable, match="__main__"):
        import_name(main_func)
    with pytest.raises(NotImportable, match="not a plain function"):
        import_name(print)
    with pytest.raises(NotImportable, match="pass module_level itself, with all its arguments"):
        import_name(functools.partial(module_level, 1))
    with pytest.raises(NotImportable, match=r"write add_task\(sends, arg, ...\), not"):
        import_name(sends(1))  # called by mistake: the coroutine is closed, not left unawaited


def test_workers_refuse_to_import_what_is_not_a_task() -> None:
    for name in ["os:system", "subprocess:run", "builtins:eval", "nonsense", "tests.unit.nope:x"]:
        with pytest.raises(UnknownTask):
            resolve_import_name(name)
    with pytest.raises(UnknownTask, match="not a function defined"):
        resolve_import_name("tests.unit.test_codec:pytest")


def test_two_lanes_do_not_share_tasks() -> None:
    a, b = Backlane("memory://"), Backlane("memory://")

    @a.task(name="only-in-a")
    def f() -> None: ...

    assert "only-in-a" in a.tasks and "only-in-a" not in b.tasks
    assert a.store is not b.store
