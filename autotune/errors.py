"""Every error autotune raises on purpose.

    AutotuneError                       root: ``except autotune.AutotuneError`` catches all
    ├── InvalidConfigError(ValueError)  a setting or argument has a value that cannot work
    ├── ProfileError                    a profile or its directory cannot be read or written,
    │                                   or a profile is malformed or from a newer schema
    ├── DatasetError                    the dataset raised, or did not return in time, while
    │                                   autotune measured it
    ├── DataFileError                   a data file (HDF5) cannot be read as asked: names the
    │                                   file and the key
    ├── WorkerCrashError(RuntimeError)  a factory loader's worker process died mid-epoch
    └── WorkerSafetyError               workers could not receive the dataset (spawn/forkserver),
                                        or a stream would give every worker the same items

Messages name the parameter (or file and field), show the value and say the fix.
"""

from __future__ import annotations

from typing import Any


class AutotuneError(Exception):
    """Root of every error the package raises on purpose."""


class InvalidConfigError(AutotuneError, ValueError):
    """A setting or argument has a value that cannot work."""


class ProfileError(AutotuneError):
    """A profile file cannot be used; the message names the file and the field.

    Args:
        path: the profile file (kept as ``str``).
        field: the field that is wrong, or ``None`` for the file as a whole.
        problem: what is wrong and how to fix it.
    """

    def __init__(self, path: object, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.field = field
        where = f"{self.path}: field {field!r}" if field else self.path
        super().__init__(f"{where}: {problem}")


class DatasetError(AutotuneError):
    """The dataset raised while autotune was measuring it; names the index (for a stream,
    the item's position in the iteration).

    Args:
        index: the sample that raised (for a stream, its position in the iteration).
        original: what the dataset raised (also the ``__cause__``).
        stream: whether the dataset is a stream (the message says "item i of the stream").
    """

    def __init__(self, index: int, original: BaseException, *, stream: bool = False) -> None:
        self.index = index
        self.original = original
        what = f"item {index} of the stream" if stream else f"dataset[{index}]"
        super().__init__(f"{what} raised {type(original).__name__}: {original}")


class DataFileError(AutotuneError):
    """A data file cannot be read as asked; names the file and, where it applies, the key.

    Raised in a DataLoader worker, it reaches the main process as a ``DataFileError`` too:
    torch re-creates it from its message alone (``DataFileError(message)``), so there
    ``path`` and ``key`` are ``None`` and the message still names both.

    Args:
        path: the file (kept as ``str``); alone, the whole message (torch's re-raise).
        key: the dataset key in the file where it applies (HDF5), else ``None``.
        problem: what is wrong and how to fix it.
    """

    def __init__(self, path: object, key: str | None = None,
                 problem: str | None = None) -> None:
        if problem is None:  # one message: torch re-raising a worker's error
            self.path, self.key = None, key
            super().__init__(str(path))
            return
        self.path = str(path)
        self.key = key
        where = f"{self.path!r}, key {key!r}" if key else repr(self.path)
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return _data_file_error, (self.args[0], self.path, self.key)


def _data_file_error(message: str, path: str | None, key: str | None) -> DataFileError:
    """Unpickles a ``DataFileError`` with its fields."""
    error = DataFileError(message)
    error.path, error.key = path, key
    return error


class WorkerCrashError(AutotuneError, RuntimeError):
    """A loader's worker process died; names the worker, the signal and the likely fix.

    A ``RuntimeError`` like torch's own error, so existing ``except RuntimeError`` still works.
    """


class WorkerSafetyError(AutotuneError):
    """Workers would fail or quietly spoil the data: what they need cannot be sent to them
    under this start method (``unpicklable``, names the path), or a stream would hand every
    worker the same items."""

    @classmethod
    def unpicklable(cls, path: str, problem: str, context: str) -> WorkerSafetyError:
        error = cls(
            f"{path} {problem}, so workers started with {context!r} cannot receive it. "
            "Fix: define it with `def` at module level (or functools.partial of one), "
            "or pass multiprocessing_context='fork' where the platform has it")
        error.path = path
        return error

    path: str | None = None
