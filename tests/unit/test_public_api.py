"""The public surface is exactly what __all__ says (STYLE rule 2)."""

import backlane
import backlane.fastapi
import backlane.testing


def test_public_names_are_pinned() -> None:
    assert backlane.__all__ == [
        "Backlane", "BacklaneError", "ConfigurationError", "DriverMissing",
        "InvalidArguments", "Job", "JobFailed", "JobHandle", "JobNotFound", "JobState",
        "NotImportable", "ResultTimeout", "Retry", "RetryPolicy", "Settings", "StoreError",
        "Task", "TaskCall", "TaskContext", "TaskError", "UnknownTask", "__version__",
    ]  # fmt: skip
    for name in backlane.__all__:
        assert hasattr(backlane, name), name
    assert backlane.fastapi.__all__ == [
        "BackgroundTasks", "DurableBackgroundTasks", "TaskArgumentsRejected", "install",
    ]  # fmt: skip
    assert backlane.testing.__all__ == ["drain", "drain_sync"]


def test_errors_form_one_tree() -> None:
    for name in [
        "ConfigurationError", "DriverMissing", "InvalidArguments", "JobFailed", "JobNotFound",
        "NotImportable", "ResultTimeout", "StoreError", "TaskError", "UnknownTask",
    ]:  # fmt: skip
        assert issubclass(getattr(backlane, name), backlane.BacklaneError), name
    assert not issubclass(backlane.Retry, backlane.BacklaneError)  # a signal, not an error


def test_drop_in_is_not_starlettes_class() -> None:
    from starlette.background import BackgroundTasks as StarletteBackgroundTasks

    assert not issubclass(backlane.fastapi.DurableBackgroundTasks, StarletteBackgroundTasks)


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("backlane").joinpath("py.typed").is_file()
