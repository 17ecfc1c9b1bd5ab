"""``MultiLoader``: several named loaders in one training loop, interleaved by a strategy
(``loading.schedule``), timed per loader, resumable mid-epoch.

Each loader is held one batch ahead, so the schedule knows that a loader ended as soon as its
last batch is handed out (the stop rules count as Lightning's ``CombinedLoader``). A loader
starts its pass when first picked, so a ``sequential`` schedule does not start the second
loader's workers while the first runs.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from .._check import check_int
from .._lifecycle import Closeable, Stateful, close_if_closable
from ..errors import InvalidConfigError
from .monitor import Epochs, StallMonitor, StallReport
from .schedule import STOPS, STRATEGIES, Schedule, count_batches

_END = object()


class MultiLoader(Closeable):
    """Batches from several loaders as ``(name, batch)``, in the order a strategy sets.

    Args:
        loaders: a mapping name -> iterable of batches (a DataLoader, usually), or a list
            (named "0", "1", ... by position).
        strategy: ``"sequential"``, ``"round_robin"``, ``"alternating"`` or ``"weighted"``
            (see ``autotune.loading.schedule``).
        weights: for ``alternating`` (positive integers: the pattern) and ``weighted``
            (positive numbers: the odds); a mapping name -> weight or a list in loader order.
        stop: ``"min"``, ``"max_cycle"`` or ``"max"`` (ignored by ``sequential``).
        seed: makes ``weighted`` draws repeat (each epoch its own, from the seed).

    ``len()`` is the batches of the epoch running, else of the next one, when every loader
    has a length (``weighted`` epochs differ: each draws anew). ``report()`` is the
    ``StallMonitor`` report with each loader's batches and data time in ``loaders``.
    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch where it stopped: the
    schedule exactly, and each loader by skipping the batches it had delivered in its current
    pass (a loader must repeat its order on a fresh ``iter()``: sequential or seeded per
    epoch, like the factory's distributed sampler), or through its own ``load_state_dict``.

    Example::

        multi = autotune.MultiLoader({"images": la, "text": lb}, strategy="weighted",
                                     weights={"images": 0.7, "text": 0.3}, seed=0)
        for name, batch in multi:
            loss = models[name](batch)
    """

    def __init__(self, loaders: Mapping[str, Iterable[Any]] | Sequence[Iterable[Any]], *,
                 strategy: str = "sequential",
                 weights: Mapping[str, float] | Sequence[float] | None = None,
                 stop: str = "max_cycle", seed: int | None = None) -> None:
        self.loaders = _named(loaders)
        self.names = list(self.loaders)
        if strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy={strategy!r} must be one of "
                                     f"{', '.join(STRATEGIES)}")
        if stop not in STOPS:
            raise InvalidConfigError(f"stop={stop!r} must be one of {', '.join(STOPS)}")
        self.strategy, self.stop = strategy, stop
        self.weights = check_weights(weights, self.names, strategy)
        self.seed = check_int("seed", seed, minimum=0) if seed is not None \
            else random.SystemRandom().randrange(2**63)
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._schedule: Schedule | None = None
        self._delivered = [0] * len(self.names)  # batches of the current pass, per loader
        self._passes = [0] * len(self.names)
        self._batches = [0] * len(self.names)
        self._wait_s = [0.0] * len(self.names)
        self.monitor = StallMonitor(Epochs(self), name="multi")

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.monitor)

    def __len__(self) -> int:
        lengths = []
        for name, loader in self.loaders.items():
            try:
                lengths.append(len(loader))  # type: ignore[arg-type]  # no len(): below
            except TypeError:
                raise TypeError(f"loader {name!r} has no len(), so the MultiLoader has none"
                                ) from None
        running = self._schedule is not None and not self._schedule.finished
        return count_batches(self._new_schedule(self.epoch + (0 if running else 1)), lengths)

    @property
    def num_workers(self) -> int:
        return sum(getattr(loader, "num_workers", 0) or 0 for loader in self.loaders.values())

    def report(self) -> StallReport:
        """The monitor's report, with ``loaders``: each one's batches and data time."""
        loaders = {name: {"batches": self._batches[i], "wait_s": self._wait_s[i],
                          "wait_mean_s": self._wait_s[i] / self._batches[i]
                          if self._batches[i] else None,
                          "num_workers": getattr(self.loaders[name], "num_workers", None)}
                   for i, name in enumerate(self.names)}
        return dataclasses.replace(self.monitor.report(), loaders=loaders)

    def state_dict(self) -> dict[str, Any]:
        """Where the running epoch stands (plain data; between epochs, the epoch count)."""
        state: dict[str, Any] = {"epoch": self.epoch, "seed": self.seed,
                                 "schedule": None, "delivered": list(self._delivered)}
        if self._schedule is not None and not self._schedule.finished:
            state["schedule"] = self._schedule.state()
            state["loaders"] = {
                name: loader.state_dict() for name, loader in self.loaders.items()
                if isinstance(loader, Stateful)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next ``iter()`` continues from ``state`` (from ``state_dict``)."""
        try:
            self.epoch = int(state["epoch"])
            self.seed = int(state["seed"])
            delivered = [int(x) for x in state["delivered"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"state is not a MultiLoader.state_dict(): {exc!r}") from None
        if len(delivered) != len(self.names):
            raise InvalidConfigError(f"state has {len(delivered)} loaders, this MultiLoader "
                                     f"{len(self.names)} ({', '.join(self.names)})")
        self._resume = dict(state) if state.get("schedule") is not None else None
        if self._resume is not None:
            self.epoch -= 1  # the next iter() re-enters that epoch

    def close(self) -> None:
        """Close every loader that can be closed (their workers stop)."""
        for loader in self.loaders.values():
            close_if_closable(loader)
        self.monitor.release()

    def __repr__(self) -> str:
        return (f"MultiLoader({', '.join(self.names)}, strategy={self.strategy!r}, "
                f"stop={self.stop!r})")

    # -- one epoch -----------------------------------------------------------------------------

    def _new_schedule(self, epoch: int) -> Schedule:
        return Schedule(len(self.names), self.strategy, self.weights, self.stop,
                        seed=hash((self.seed, epoch)) & (2**63 - 1))

    def _epoch(self) -> Iterator[tuple[str, Any]]:
        self.epoch += 1
        schedule = self._schedule = self._new_schedule(self.epoch)
        iterators: list[Iterator[Any] | None] = [None] * len(self.names)
        ahead: list[Any] = [_END] * len(self.names)
        skip = [0] * len(self.names)
        resume, self._resume = self._resume, None
        if resume is not None:
            schedule.restore(resume["schedule"])
            for name, loader_state in (resume.get("loaders") or {}).items():
                loader = self.loaders[name]
                if not isinstance(loader, Stateful):
                    raise InvalidConfigError(
                        f"the state holds loader {name!r}'s own state, and this MultiLoader's "
                        f"{name!r} ({type(loader).__name__}) has no load_state_dict()")
                loader.load_state_dict(loader_state)
            stateful = set(resume.get("loaders") or {})
            for i, name in enumerate(self.names):
                if schedule.started[i] and schedule.live[i]:
                    skip[i] = 0 if name in stateful else resume["delivered"][i]
                    iterators[i] = self._begin(i, skip[i], ahead)
            self._delivered = list(resume["delivered"])
        else:
            self._delivered = [0] * len(self.names)
        while (pick := schedule.pick()) is not None:
            index, new_pass = pick
            if new_pass:
                iterators[index] = self._begin(index, 0, ahead)
                self._delivered[index] = 0
            batch = ahead[index]
            if batch is _END:
                schedule.ended(index)
                continue
            ahead[index] = self._fetch(index, iterators[index])
            if ahead[index] is _END:
                schedule.ended(index)
            self._delivered[index] += 1
            self._batches[index] += 1
            yield self.names[index], batch

    def _begin(self, index: int, skip: int, ahead: list[Any]) -> Iterator[Any]:
        """A new pass of loader ``index``, ``skip`` batches in, one batch held ahead."""
        start = time.perf_counter()
        iterator = iter(self.loaders[self.names[index]])
        for _ in range(skip):
            if next(iterator, _END) is _END:
                break
        self._passes[index] += 1
        self._wait_s[index] += time.perf_counter() - start
        ahead[index] = self._fetch(index, iterator)
        return iterator

    def _fetch(self, index: int, iterator: Iterator[Any] | None) -> Any:
        start = time.perf_counter()
        batch = next(iterator, _END) if iterator is not None else _END
        self._wait_s[index] += time.perf_counter() - start
        return batch


def _named(loaders: Any) -> dict[str, Iterable[Any]]:
    if isinstance(loaders, Mapping):
        named = {str(k): v for k, v in loaders.items()}
        if len(named) != len(loaders):
            raise InvalidConfigError("loaders= has names that are the same as strings")
    elif isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)):
        named = {str(i): v for i, v in enumerate(loaders)}
    else:
        raise InvalidConfigError(f"loaders={loaders!r} must be a mapping name -> loader or a "
                                 "list of loaders")
    if not named:
        raise InvalidConfigError("loaders= is empty: give at least one loader")
    for name, loader in named.items():
        if not hasattr(loader, "__iter__"):
            raise InvalidConfigError(f"loaders[{name!r}]={loader!r} is not iterable")
    return named


def check_weights(weights: Any, names: list[str], strategy: str) -> list[float]:
    """Weights in loader order, checked for the strategy (1 each when it takes none)."""
    if strategy in ("sequential", "round_robin"):
        if weights is not None:
            raise InvalidConfigError(f"weights= applies to 'alternating' and 'weighted', not "
                                     f"strategy={strategy!r}: leave it out")
        return [1.0] * len(names)
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        missing, extra = set(names) - set(map(str, weights)), set(map(str, weights)) - set(names)
        if missing or extra:
            raise InvalidConfigError(
                f"weights= names {sorted(map(str, weights))} must match the loaders' "
                f"{sorted(names)} (missing {sorted(missing)}, unknown {sorted(extra)})")
        values = [weights[name] if name in weights else weights[int(name)] for name in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise InvalidConfigError(f"weights={weights!r} has {len(values)} values for "
                                     f"{len(names)} loaders")
    for name, value in zip(names, values):
        integral = isinstance(value, int) and not isinstance(value, bool)
        if strategy == "alternating" and (not integral or value < 1):
            raise InvalidConfigError(f"weights[{name!r}]={value!r}: 'alternating' takes whole "
                                     "numbers >= 1 (how many batches in each round)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or value == float("inf"):
            raise InvalidConfigError(f"weights[{name!r}]={value!r} must be a number > 0")
    return [float(v) for v in values]
