"""Run a call that may never return (user code) without hanging the caller."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import AutotuneError

T = TypeVar("T")


def run_bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()``, run in a daemon thread; ``AutotuneError`` naming ``what`` after
    ``timeout_s`` (the thread is left behind: it cannot be stopped). Its exception is
    re-raised here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="autotune-bounded", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise AutotuneError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
