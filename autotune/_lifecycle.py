"""The lifecycle every runtime wrapper shares: ``close()``, and ``with`` that calls it."""

from __future__ import annotations

from typing import Any, Self


class Closeable:
    """A wrapper whose ``with`` block ends with ``close()`` (subclasses define ``close``)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_if_closable(obj: Any) -> None:
    """Close what can be closed: a wrapped loader may be any iterable."""
    closer = getattr(obj, "close", None)
    if callable(closer):
        closer()
