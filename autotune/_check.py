"""Argument checks shared by every public entry point: the message names the field and value.

``check_int("batch_size", 0, minimum=1)`` raises
``InvalidConfigError("batch_size=0 must be an integer >= 1")``. Booleans are not numbers
here, and NaN or infinity is never a valid count of seconds.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidConfigError


def check_int(name: str, value: Any, *, minimum: int, hint: str = "") -> int:
    """``value`` if it is an int >= ``minimum``; else ``InvalidConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name}={value!r} must be an integer >= {minimum}{hint}")
    return value


def check_seconds(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number of seconds, > 0 (or >= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InvalidConfigError(f"{name}={value!r} must be a finite number of seconds {bound}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{name}={value!r} must be True or False")
    return value


def is_stream(dataset: Any) -> bool:
    """A ``torch.utils.data.IterableDataset``: items come from ``iter()``, not by index."""
    from torch.utils.data import IterableDataset

    return isinstance(dataset, IterableDataset)


def dataset_size(dataset: Any, *, who: str) -> int | None:
    """``len(dataset)`` (>= 1), or one clear error: no ``__len__``, a failing one, or empty.

    An ``IterableDataset`` without a length is a stream of unknown size: ``None``.
    ``who`` names what needs the length, e.g. ``"the factory"``.
    """
    stream = is_stream(dataset)
    try:
        size = len(dataset)
    except (TypeError, NotImplementedError):
        if stream:
            return None
        raise InvalidConfigError(
            f"dataset of type {type(dataset).__name__} has no len(): {who} needs a "
            "map-style dataset (__len__ and __getitem__) or a "
            "torch.utils.data.IterableDataset (__iter__)") from None
    except Exception as exc:  # __len__ itself failed
        raise InvalidConfigError(f"len(dataset) raised {type(exc).__name__}: {exc}") from exc
    if size < 1:
        raise InvalidConfigError(f"len(dataset)={size}: the dataset is empty")
    return size
