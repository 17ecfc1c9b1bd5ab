"""Every error autotune raises on purpose.

    AutotuneError                       root: ``except autotune.AutotuneError`` catches all
    ├── InvalidConfigError(ValueError)  a setting or argument has a value that cannot work
    ├── ProfileError                    a profile or its directory cannot be read or written,
    │                                   or a profile is malformed or from a newer schema
    ├── DatasetError                    the dataset raised, or did not return in time, while
    │                                   autotune measured it
    ├── WorkerCrashError(RuntimeError)  a factory loader's worker process died mid-epoch
    └── WorkerSafetyError               workers could not receive the dataset (spawn/forkserver)

Messages name the parameter (or file and field), show the value and say the fix.
"""

from __future__ import annotations


class AutotuneError(Exception):
    """Root of every error the package raises on purpose."""


class InvalidConfigError(AutotuneError, ValueError):
    """A setting or argument has a value that cannot work."""


class ProfileError(AutotuneError):
    """A profile file cannot be used; the message names the file and the field."""

    def __init__(self, path: object, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.field = field
        where = f"{self.path}: field {field!r}" if field else self.path
        super().__init__(f"{where}: {problem}")


class DatasetError(AutotuneError):
    """The dataset raised while autotune was measuring it; names the index."""

    def __init__(self, index: int, original: BaseException) -> None:
        self.index = index
        self.original = original
        super().__init__(
            f"dataset[{index}] raised {type(original).__name__}: {original}"
        )


class WorkerCrashError(AutotuneError, RuntimeError):
    """A loader's worker process died; names the worker, the signal and the likely fix.

    A ``RuntimeError`` like torch's own error, so existing ``except RuntimeError`` still works.
    """


class WorkerSafetyError(AutotuneError):
    """What a worker needs cannot be sent to it under this start method; names the path."""

    def __init__(self, path: str, problem: str, context: str) -> None:
        self.path = path
        super().__init__(
            f"{path} {problem}, so workers started with {context!r} cannot receive it. "
            "Fix: define it with `def` at module level (or functools.partial of one), "
            "or pass multiprocessing_context='fork' where the platform has it")
