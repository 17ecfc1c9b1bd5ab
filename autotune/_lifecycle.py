"""The lifecycle every runtime wrapper shares: ``close()``, and ``with`` that calls it; and
the resume protocol some of them follow (``Stateful``, torchdata's and Lightning's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Self, runtime_checkable


class Closeable:
    """A wrapper whose ``with`` block ends with ``close()`` (subclasses define ``close``)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@runtime_checkable
class Stateful(Protocol):
    """What resumes mid-epoch: ``state_dict()`` gives plain data, ``load_state_dict(state)``
    makes the next ``iter()`` go on from it (every loader the factory returns)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def close_if_closable(obj: Any) -> None:
    """Close what can be closed: a wrapped loader may be any iterable."""
    closer = getattr(obj, "close", None)
    if callable(closer):
        closer()
