"""Warnings that point at the user's line, not at autotune's internals."""

from __future__ import annotations

import os
import sys
import types
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside this package."""
    level = 2  # level 1 is this function, 2 its caller
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
