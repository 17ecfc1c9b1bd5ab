"""A progress bar for a wait the user would otherwise sit through blind (``tqdm``, on stderr):
drawn on a terminal only, and only once the wait has lasted ``DELAY_S``."""

from __future__ import annotations

import sys
from typing import Any

DELAY_S = 2.0  # a shorter wait needs no bar


def wait_bar(what: str, total: float, unit: str = "B") -> Any:
    """A ``tqdm`` bar over ``total`` units (bytes by default), a context manager; ``update(n)``
    as the work goes. Nothing is drawn when stderr is not a terminal (a pipe, a log file)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit=unit, unit_scale=True, unit_divisor=1024,
                delay=DELAY_S, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)
