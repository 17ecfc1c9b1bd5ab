"""Tuning under torchrun: every rank measures each trial at the same time; rank 0 decides.

The contention a loader meets in training is that of every rank on the node loading at
once, so one rank measuring alone would choose for a machine it does not have::

    rank 0 (leads)                                 other ranks (follow)
    measure the workload      -- all at once --    measure the workload
    rank 0's workload, to everyone  ------------>  (same windows, same hang limits)
    Search: measure(config) -- ("trial", ...) -->  receive the config
            run_trial              at once         run_trial
            gather every rank's Trial  <--------   send the Trial back
            combine: the slowest rank's samples/s, stall and first batch (worst rank),
                     memory and CPU of the whole node (summed per host, the busiest host)
    ("done", result) or ("failed", message) ---->  return the same result / raise

Any rank that fails while all of them work (measuring the workload, loading the dataset)
makes every rank raise one ``AutotuneError`` naming it; a failure on rank 0 while it leads
reaches the followers as the same message; nobody is left waiting in a collective. A
failed trial on any rank is a failed trial (named by rank), never chosen.

Only a process group that already exists is used (``autotune tune`` under torchrun creates
a gloo one; ``torchrun_group``); alone or in a group of one, nothing here runs. Everything
sent travels through ``broadcast_object_list``/``all_gather_object`` (pickled), which gloo
supports on the CPU. With an NCCL group those collectives use
``torch.cuda.current_device()``: set each rank's device first, as training does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from ..config import LoaderConfig
from ..errors import AutotuneError
from ..records import Trial
from ..system.distributed import current_ranks

log = logging.getLogger(__name__)

T = TypeVar("T")
RunTrial = Callable[[LoaderConfig, str, float, float], Trial]  # config, phase, window, hang

_TRIAL, _DONE, _FAILED = "trial", "done", "failed"


@dataclass(frozen=True, kw_only=True)
class RankTrial:
    """One rank's own measurement of a trial that every rank ran at once."""

    rank: int
    host: str
    trial: Trial

    def to_dict(self) -> dict[str, Any]:
        own = {k: v for k, v in self.trial.to_dict().items() if k not in ("settings", "phase")}
        return {"rank": self.rank, "host": self.host, **own}


class Team:
    """This process among the ranks of the existing process group, and the few collectives
    tuning needs. ``Team.current()`` is ``None`` outside a group of two or more ranks.

    Every rank must make the same calls in the same order (rank 0 ``measure`` and then
    ``finish`` or ``abort``, the others ``follow``).

    Args:
        rank: this process's rank in the default group.
        world_size: ranks in the default group.
        host: this machine's name: memory and CPU are summed over the ranks of one host.
    """

    def __init__(self, rank: int, world_size: int, host: str = "") -> None:
        self.rank = rank
        self.world_size = world_size
        self.host = host

    @classmethod
    def current(cls, host: str = "") -> Team | None:
        ranks = current_ranks()
        if not ranks.group or not ranks.distributed:
            return None
        return cls(ranks.rank, ranks.world_size, host)

    @property
    def leads(self) -> bool:
        return self.rank == 0

    # -- every rank works -----------------------------------------------------------

    def each(self, work: Callable[[], T]) -> T:
        """Run ``work`` on every rank at once; this rank's value once all succeeded.

        Raises:
            AutotuneError: on every rank, naming the rank(s) whose ``work`` raised.
        """
        value: Any = None
        own: Exception | None = None
        try:
            value = work()
        except Exception as exc:
            own = exc
        errors = self._gather(None if own is None else _line(own))
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            ranks = ", ".join(str(rank) for rank, _ in failed)
            which = f"rank {ranks}" if len(failed) == 1 else f"ranks {ranks}"
            raise AutotuneError(f"{which} of {self.world_size} failed: {failed[0][1]}") from own
        return cast(T, value)  # what work() returned

    def from_leader(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others pass anything)."""
        return self._broadcast(value if self.leads else None)

    def on_leader(self, work: Callable[[], T]) -> T:
        """Rank 0 runs ``work``; its value reaches every rank, or its error: rank 0 raises
        the original, the others an ``AutotuneError`` with the same message."""
        if not self.leads:
            kind, payload = self._broadcast(None)
            if kind == _FAILED:
                raise AutotuneError(payload)
            return cast(T, payload)  # what work() returned on rank 0
        try:
            value = work()
        except Exception as exc:
            self._broadcast((_FAILED, _message(exc)))
            raise
        self._broadcast((_DONE, value))
        return value

    # -- rank 0 leads, the others follow --------------------------------------------

    def measure(self, config: LoaderConfig, phase: str, window_s: float, hang_s: float,
                run: RunTrial) -> tuple[Trial, tuple[RankTrial, ...]]:
        """(Rank 0) every rank runs this trial at once: the combined Trial, and each rank's."""
        self._broadcast((_TRIAL, (config, phase, window_s, hang_s)))
        reports = self._run_and_gather(run, config, phase, window_s, hang_s)
        return combine(reports, config=config, phase=phase), reports

    def follow(self, run: RunTrial) -> Any:
        """(Other ranks) run each trial rank 0 sends until it sends the result, returned
        here; raises ``AutotuneError`` with rank 0's message if it failed."""
        while True:
            kind, payload = self._broadcast(None)
            if kind == _TRIAL:
                self._run_and_gather(run, *payload)
            elif kind == _DONE:
                return payload
            else:
                raise AutotuneError(payload)

    def finish(self, result: T) -> T:
        """(Rank 0) the followers return ``result``."""
        self._broadcast((_DONE, result))
        return result

    def abort(self, exc: BaseException) -> None:
        """(Rank 0) the followers raise ``exc``'s message instead of waiting."""
        self._broadcast((_FAILED, _message(exc)))

    # -- plumbing ---------------------------------------------------------------------

    def _run_and_gather(self, run: RunTrial, config: LoaderConfig, phase: str,
                        window_s: float, hang_s: float) -> tuple[RankTrial, ...]:
        try:
            trial = run(config, phase, window_s, hang_s)
        except Exception as exc:  # run_trial never raises; this keeps the others going
            trial = Trial(config=config, phase=phase, error=_line(exc))
        own = RankTrial(rank=self.rank, host=self.host, trial=trial)
        return tuple(self._gather(own))

    def _broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj if self.leads else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, obj)
        return boxes


def combine(reports: Sequence[RankTrial], *, config: LoaderConfig, phase: str) -> Trial:
    """One Trial for settings every rank measured at once.

    Timing is the worst rank's (training waits for the slowest): its samples/s and window,
    the longest first batch, the largest stall. Resources are the node's: peak memory and CPU
    summed over the ranks of each host, the busiest host's. Any rank's failure fails the
    trial, naming the rank.
    """
    failed = [r for r in reports if not r.trial.ok]
    memory = _node_total(reports, "peak_memory_bytes")
    if failed:
        also = ", ".join(str(r.rank) for r in failed[1:])
        more = f" (also failed on rank(s) {also})" if also else ""
        return Trial(config=config, phase=phase, peak_memory_bytes=memory,
                     error=f"rank {failed[0].rank}: {failed[0].trial.error}{more}")
    slowest = min(reports, key=lambda r: r.trial.samples_per_s or 0.0).trial
    return Trial(config=config, phase=phase, samples_per_s=slowest.samples_per_s,
                 window_s=slowest.window_s, peak_memory_bytes=memory,
                 first_batch_s=_worst(reports, "first_batch_s"),
                 stall_fraction=_worst(reports, "stall_fraction"),
                 cpu_percent=_node_total(reports, "cpu_percent"))


def _worst(reports: Sequence[RankTrial], name: str) -> Any:
    values = [v for r in reports if (v := getattr(r.trial, name)) is not None]
    return max(values) if values else None


def _node_total(reports: Sequence[RankTrial], name: str) -> Any:
    hosts: dict[str, Any] = {}
    for r in reports:
        value = getattr(r.trial, name)
        if value is not None:
            hosts[r.host] = hosts.get(r.host, 0) + value
    return max(hosts.values()) if hosts else None


@contextlib.contextmanager
def torchrun_group(backend: str = "gloo") -> Iterator[bool]:
    """A process group for the duration, when torchrun started this process (``WORLD_SIZE``
    > 1) and none exists yet; destroyed at the end, errors included (after a barrier when
    the body ended normally or with an ``AutotuneError``, which every rank raises
    together). Yields whether one was made. ``autotune tune`` runs inside it; a script
    that calls ``Autotuner`` brings its own.
    """
    ranks = current_ranks()  # torchrun's environment while no group exists
    world = ranks.world_size
    if not ranks.distributed or ranks.group:
        yield False
        return
    import torch.distributed as dist

    if not dist.is_available():
        log.warning("WORLD_SIZE=%d but this torch has no torch.distributed: tuning alone", world)
        yield False
        return
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as exc:
        raise AutotuneError(f"WORLD_SIZE={world} but joining torchrun's process group "
                            f"failed ({_line(exc)}): start it with `torchrun "
                            "--nproc_per_node N -m autotune tune ...`") from None
    try:
        yield True
    except AutotuneError:  # every rank raised it together: all of them are here
        _settle(dist)
        raise
    else:
        _settle(dist)
    finally:
        dist.destroy_process_group()


def _settle(dist: Any) -> None:
    """Wait for every rank before the group goes: a rank that closed its connections could
    cut off the last message on its way to a slower one."""
    try:
        dist.barrier()
    except Exception as exc:  # a rank is gone already: nothing left to wait for
        log.debug("final barrier: %s", exc)


def _message(exc: BaseException) -> str:
    """What the other ranks raise for rank 0's failure: autotune's own message as it is."""
    return str(exc) if isinstance(exc, AutotuneError) else f"rank 0 failed: {_line(exc)}"


def _line(exc: BaseException) -> str:
    if isinstance(exc, AutotuneError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
