"""The device's time for each training step, for the re-tuner (``adapt=True``).

A GPU step runs after the host has launched it: the host's time between batches is the
launch time (27 ms for ResNet-50 on an H200), not the step (54 ms). A CUDA event is recorded
on the current stream as a batch is handed over and another as the next one is asked for;
the GPU's time between the two is its time for that step (or the launch time, when the GPU is
faster than the host). Pairs are read once both have completed (``Event.query()``), never
by synchronising, so the loop is not slowed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

PENDING_MAX = 1024  # pairs kept unread at most (a GPU far behind the host)


class DeviceSteps:
    """Completed device seconds of the steps so far (``totals()``).

    Args:
        event: makes a timing event (default ``torch.cuda.Event(enable_timing=True)``);
            it must have ``record()``, ``query()`` and ``elapsed_time(end)`` in ms.
    """

    def __init__(self, event: Callable[[], Any] | None = None) -> None:
        if event is None:
            import torch

            def event() -> Any:
                return torch.cuda.Event(enable_timing=True)

        self._event = event
        self._start: Any = None
        self._pending: deque[tuple[Any, Any]] = deque(maxlen=PENDING_MAX)
        self._done_s = 0.0
        self._done = 0

    def handed(self) -> None:
        """A batch was handed to the loop: its step starts on the device after this."""
        self._start = self._event()
        self._start.record()

    def asked(self) -> None:
        """The loop asks for the next batch: what it launched for the step is queued."""
        if self._start is None:
            return
        end = self._event()
        end.record()
        self._pending.append((self._start, end))
        self._start = None

    def totals(self) -> tuple[float, int]:
        """(device seconds, steps) of every step whose events have completed."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._done_s += start.elapsed_time(end) / 1e3
            self._done += 1
        return self._done_s, self._done


def device_steps(device: Any) -> DeviceSteps | None:
    """A ``DeviceSteps`` when ``device`` is a CUDA device torch can use, else None."""
    if device is None:
        return None
    import torch

    try:
        kind = torch.device(device).type
    except (TypeError, RuntimeError):
        return None
    if kind != "cuda" or not torch.cuda.is_available():
        return None
    return DeviceSteps()
