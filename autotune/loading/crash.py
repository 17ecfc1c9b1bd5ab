"""A crashed DataLoader worker, named: which worker, which signal, and the likely fix.

torch says only "DataLoader worker (pid 123) is killed by signal: Killed."; each common cause
(the out-of-memory killer, a /dev/shm too small, a native library crashing) has its own fix.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Sequence
from typing import Any

from ..errors import AutotuneError, WorkerCrashError

# torch's two texts: the SIGCHLD handler's (DataLoader.cpp, "killed by signal: Killed." or
# "exited unexpectedly with exit code 1.") and _try_get_data's ("pid(s) 1, 2) exited ...").
_TORCH_CRASH = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by "
                          r"signal: ([^.]+)\.|exited unexpectedly(?: with exit code (\d+))?)")
_SIGNAL_NAMES = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
_SIGNAL_NUMBERS = {s.value: s.name for s in signal.Signals}
_FIXES = {
    "SIGKILL": "That is most likely the kernel's out-of-memory killer (check `dmesg` or the "
               "container's memory limit). Fix: lower num_workers or prefetch_factor, or the "
               "batch size, or give the job more memory",
    "SIGBUS": "That is most likely /dev/shm too small for the batches in flight (Docker's "
              "default is 64 MB). Fix: `docker run --shm-size=8g` or `--ipc=host`, or lower "
              "num_workers, prefetch_factor or the batch size",
    "SIGSEGV": "A native library crashed in the worker. Fix: run with num_workers=0 to see "
               "the traceback in the main process",
}
_OTHER_FIX = "Fix: run with num_workers=0 to see the error in the main process"
DYING_WAIT_S = 0.5  # how long a worker whose pipe broke may take to be seen dead


class CrashNamingIterator:
    """torch's DataLoader iterator, except that a worker crash raises ``WorkerCrashError``.

    Everything else (other errors included) passes through to the wrapped iterator.
    """

    def __init__(self, iterator: Any, num_workers: int, prefetch_factor: int | None) -> None:
        self._iterator = iterator
        self._settings = f"num_workers={num_workers}, prefetch_factor={prefetch_factor}"
        self._closed = False

    def __iter__(self) -> CrashNamingIterator:
        return self

    def close(self) -> None:
        """Stop the workers now (torch's own orderly shutdown); ``next()`` then says so."""
        self._closed = True
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __next__(self) -> Any:
        if self._closed:  # torch would end the epoch early without a word
            raise AutotuneError("this DataLoader was closed (loader.close() or the end of its "
                                "`with` block) while this epoch was running; call iter(loader) "
                                "for a new epoch with fresh workers")
        try:
            return next(self._iterator)
        except (RuntimeError, OSError, EOFError) as exc:
            message = self._crash_message(exc)
            if message is None:
                raise
            raise WorkerCrashError(message) from exc

    def _crash_message(self, exc: BaseException) -> str | None:
        """Ours when a worker died, else None.

        An OSError or EOFError comes instead of torch's error when a batch the worker sent
        before dying cannot be read (its file descriptors went with it) and torch has not yet
        seen the worker end; torch's SIGCHLD handler may then raise while we look.
        """
        workers = getattr(self._iterator, "_workers", ())
        try:
            if isinstance(exc, RuntimeError):
                return explain_crash(str(exc), workers, self._settings)
            if str(exc).startswith("Caught "):  # a sample's own error, re-raised by torch
                return None
            pid = _dead_worker(workers, wait_s=DYING_WAIT_S)
            if pid is None:
                return None
            return explain_crash(f"DataLoader worker (pid {pid}) exited unexpectedly", workers,
                                 self._settings)
        except RuntimeError as late:  # from torch's SIGCHLD handler
            return explain_crash(str(late), workers, self._settings)

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str) -> Any:
        if name == "_iterator":  # not yet set
            raise AttributeError(name)
        return getattr(self._iterator, name)


def explain_crash(torch_message: str, workers: Sequence[Any], settings: str) -> str | None:
    """Our message for torch's worker-crash error, or None when it is not one.

    ``workers`` are torch's worker processes (their index is the worker id); when torch's
    message does not say how a worker ended, its exit code does.
    """
    found = _TORCH_CRASH.match(torch_message)
    if found is None:
        return None
    pids, signal_text, exit_code = found.groups()
    pid = int(pids.split(",")[0])
    worker_id, code = _worker(workers, pid)
    name = _SIGNAL_NAMES.get(signal_text or "")
    if signal_text is None and code:  # torch did not say how it ended; the OS knows
        name = _SIGNAL_NUMBERS.get(-code) if code < 0 else None
        exit_code = exit_code or (str(code) if code > 0 else None)
    if name or signal_text:
        how = f"was killed by {name or repr(signal_text)}"
    else:
        how = f"exited with code {exit_code}" if exit_code else "exited unexpectedly"
    who = "DataLoader worker" + (f" {worker_id}" if worker_id is not None else "")
    return f"{who} (pid {pid}) {how} ({settings}). {_FIXES.get(name or '', _OTHER_FIX)}"


def _dead_worker(workers: Sequence[Any], wait_s: float) -> int | None:
    """The pid of a worker that has ended, or ends within ``wait_s``; None if all live on."""
    deadline = time.monotonic() + wait_s
    while True:
        ended = [pid for pid, code in _exit_codes(workers).values() if code is not None]
        if ended:
            return ended[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _worker(workers: Sequence[Any], pid: int) -> tuple[int | None, int | None]:
    """(worker id, exit code) of the worker process with this pid, if torch still has it."""
    for worker_id, (worker_pid, code) in _exit_codes(workers).items():
        if worker_pid == pid:
            return worker_id, code
    return None, None


def _exit_codes(workers: Sequence[Any]) -> dict[int, tuple[int, int | None]]:
    """{worker id: (pid, exit code or None while it runs)}; empty once torch closed them."""
    try:
        return {i: (process.pid, process.exitcode) for i, process in enumerate(workers)}
    except ValueError:  # a closed multiprocessing.Process
        return {}
