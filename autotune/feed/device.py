"""Feed the accelerator one batch ahead: ``DeviceLoader`` copies batch n+1 to the device while
the step runs on batch n, so the step does not wait for the host-to-device copy.

Only a copy from pinned (page-locked) memory is asynchronous; from pageable memory torch stages
it while the host waits (correct, not overlapped), so the loader should pin (``pin_memory=True``,
which autotune's factory sets for CUDA where it pays). The copy runs on a side CUDA stream to
overlap the step's kernels; it is correct because the step's stream waits for it, each
copied tensor is marked as used by the step's stream (``record_stream``: the caching allocator
does not hand its memory to a later copy before the step that read it is done), and each copy
waits for the steps before the one in progress (memory they freed, in batch objects that
move themselves too), never for the step in progress. On the CPU batches pass through; other
devices (``mps``, ``meta``) get a synchronous ``.to(device)``.

A ``transform`` (normalise, augment, decode on the GPU) runs on each batch once it is on the
device, on a thread of its own that keeps one batch ahead: batch n+1 is fetched, copied and
transformed (on CUDA on the side stream, an event marking its end) while the loop runs step
n, and the host time the transform takes (launching kernels, a decoder's calls) is not the
loop's. Batches arrive in order; an error (the loader's, the transform's) reaches the loop
after the batches before it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch

from .._check import check_bool
from .._lifecycle import Closeable, Stateful, close_if_closable
from ..errors import InvalidConfigError
from ..system.cuda import canonical_device

_END = object()
JOIN_S = 60.0  # how long a pass that ends waits for its transform thread's fetch
log = logging.getLogger(__name__)
_DEVICE_FIX = 'pass a torch.device or a string such as "cuda", "cuda:1", "cpu" or "mps"'


def move_to(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it on ``device``, its structure and types kept: mappings
    (a ``dict`` if the type cannot be rebuilt), lists, tuples, namedtuples, dataclasses (frozen
    and ``init=False`` fields too); other objects with a ``.to()`` (custom batch classes,
    dataclasses too) move themselves; anything else (``str``, numbers, numpy arrays,
    ``None``) comes back as it is.
    """
    return _move(batch, torch.device(device), non_blocking, None)


def _move(obj: Any, device: torch.device, non_blocking: bool, made: list | None) -> Any:
    """``move_to``; appends each CUDA tensor it creates to ``made`` (for ``record_stream``)."""
    if isinstance(obj, torch.Tensor):
        out = obj.to(device, non_blocking=non_blocking)
        if made is not None and out is not obj and out.is_cuda:
            made.append(out)
        return out
    if isinstance(obj, Mapping):
        items = {key: _move(value, device, non_blocking, made) for key, value in obj.items()}
        if type(obj) is dict:
            return items
        try:  # like torch's pin_memory: a copy keeps extra state (a default_factory)
            if isinstance(obj, MutableMapping):
                clone = copy.copy(obj)
                clone.update(items)
                return clone
            rebuilt: Any = type(obj)
            return rebuilt(items)
        except (TypeError, ValueError):
            return items
    if isinstance(obj, (list, tuple)):
        values = [_move(value, device, non_blocking, made) for value in obj]
        if type(obj) is list:
            return values
        if isinstance(obj, tuple) and hasattr(obj, "_make"):  # a namedtuple
            return obj._make(values)
        try:
            return type(obj)(values)
        except (TypeError, ValueError):
            return tuple(values) if isinstance(obj, tuple) else values
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) \
            and not callable(getattr(obj, "to", None)):  # one with its own .to() moves itself
        # a copy, not a new __init__: frozen classes, init=False fields and __post_init__ work
        new = copy.copy(obj)
        for field in dataclasses.fields(obj):
            if hasattr(obj, field.name):
                value = _move(getattr(obj, field.name), device, non_blocking, made)
                object.__setattr__(new, field.name, value)
        return new
    to = getattr(obj, "to", None)
    if callable(to) and not isinstance(obj, type):
        try:
            return to(device, non_blocking=non_blocking)
        except TypeError:  # a .to() without the keyword
            return to(device)
    return obj


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj`` (mappings, lists, tuples, dataclasses), for ``record_stream``."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name, None))


def check_device(device: Any) -> torch.device:
    """``device`` (a ``torch.device`` or a string) as a ``torch.device`` this machine has."""
    if not isinstance(device, (str, torch.device)):
        raise InvalidConfigError(f"device={device!r} is a {type(device).__name__}: {_DEVICE_FIX}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidConfigError(f"device={device!r} is not a torch device: {_DEVICE_FIX}") \
            from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidConfigError(
                f"device={device!r} but torch.cuda.is_available() is False (no CUDA device, or "
                f"torch {torch.__version__} was built without CUDA): pass device=\"cpu\"")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InvalidConfigError(f"device={device!r} but this machine has {count} CUDA "
                                     f"device(s): pass an index below {count}")
        return canonical_device(parsed)  # cuda:N: one spelling, one cache entry per GPU
    return parsed


class DeviceLoader(Closeable):
    """Batches of ``loader`` on ``device``, the next one already copying during the step.

    Each ``iter()`` is a fresh pass over ``loader``. On CUDA batch n+1's copy is issued on a
    side stream before batch n is yielded; on the CPU the loader's own batches are yielded;
    elsewhere each batch is moved when asked for. ``len()`` and other attributes (``dataset``,
    ``batch_size``, ``autotune_config``) are the loader's.

    Args:
        loader: any iterable of batches, typically a ``DataLoader``; tensors in dicts, lists,
            tuples, namedtuples and dataclasses are moved (see ``move_to``). Give it
            ``pin_memory=True`` for CUDA: only a pinned batch copies while the step runs.
        device: a ``torch.device`` or a string: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"``.
        non_blocking: issue CUDA copies asynchronously (from pinned memory).
        transform: called on each batch once it is on ``device``; what it returns is
            yielded. It runs on a thread of the loader's own, one batch ahead (on CUDA on the
            copy's side stream), in order; what it raises reaches the loop in its place.

    Example::

        loader = factory.create_training_loader(dataset, batch_size=64)
        with DeviceLoader(loader, "cuda") as batches:
            for epoch in range(3):
                for inputs, targets in batches:  # already on the GPU
                    loss = criterion(model(inputs), targets)
    """

    def __init__(self, loader: Iterable[Any], device: torch.device | str, *,
                 non_blocking: bool = True,
                 transform: Callable[[Any], Any] | None = None) -> None:
        self.loader = loader
        self.device = check_device(device)
        self.non_blocking = check_bool("non_blocking", non_blocking)
        if transform is not None and not callable(transform):
            raise InvalidConfigError(f"transform={transform!r} is not callable: pass a "
                                     "function of one batch, or None")
        self.transform = transform
        self._passes: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()
        self._closed = False
        self._held = 0  # batches the loader gave that the consumer has not received yet
        self._fetching = threading.Lock()  # a fetch and its count, against state_dict()
        self._pass: object = None  # the pass whose batches _held counts (with a transform)

    def __iter__(self) -> Iterator[Any]:
        if self.transform is not None:
            for earlier in list(self._passes):  # its thread and this pass share one iterator
                earlier.close()
            batches = self._transformed()
        elif self.device.type == "cpu":
            batches = self._as_is()
        elif self.device.type == "cuda":
            batches = self._ahead()
        else:
            batches = self._moved()
        self._passes.add(batches)
        self._closed = False
        return batches

    def _as_is(self) -> Generator[Any, None, None]:
        yield from self.loader  # a generator all the same: close() can end it

    def _moved(self) -> Generator[Any, None, None]:
        for batch in self.loader:
            yield _move(batch, self.device, False, None)

    def _transformed(self) -> Generator[Any, None, None]:
        """Batches made (fetched, moved, transformed) one ahead on a thread of their own."""
        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        batches = iter(self.loader)
        made: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        slot = threading.Semaphore(1)  # one batch made ahead of the one the loop holds
        stop = threading.Event()
        taken: list[Any] = [None]  # CUDA: an event after the steps before the batch in use
        this = object()  # this pass: a maker of an earlier one counts nothing here
        with self._fetching:
            self._held, self._pass = 0, this

        def make() -> None:
            try:
                if side is not None:
                    torch.cuda.set_device(device)  # a new thread is on GPU 0: not a context there
                while slot.acquire() and not stop.is_set():
                    with self._fetching:
                        batch = next(batches, _END)
                        if batch is not _END and self._pass is this:
                            self._held += 1  # handed by the loader, not received yet
                    if stop.is_set():
                        return  # the pass ended while this batch was fetched
                    if batch is _END:
                        made.put(("end", None))
                        return
                    made.put(("batch", self._made(batch, side, device, taken[0])))
            except BaseException as exc:  # the loop gets it after the batches before it
                made.put(("error", exc))

        maker = threading.Thread(target=make, name="autotune-device-loader", daemon=True)
        maker.start()
        ending = True  # a pass that ends, or is left: the maker is waited for
        try:
            while True:
                kind, value = made.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                _host, moved, ready, tensors = value  # _host: alive until its copy is waited on
                if ready is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(ready)
                    for tensor in tensors:
                        tensor.record_stream(current)
                    taken[0] = torch.cuda.Event()
                    taken[0].record(current)  # the steps before this batch's: queued
                with self._fetching:
                    self._held -= 1
                slot.release()
                yield moved
        except BaseException as exc:
            ending = isinstance(exc, GeneratorExit)  # Ctrl-C or an error: no wait for the maker
            raise
        finally:
            stop.set()
            slot.release()  # a maker waiting for room sees the stop
            # the loader's iterator is not shared with a maker still fetching (a persistent
            # loader's next pass resets that same iterator); at most one batch's wait
            if ending:
                maker.join(timeout=JOIN_S)
            if ending and maker.is_alive():
                log.warning("the DeviceLoader's transform thread did not end within %.0f s "
                            "(its loader is still fetching a batch)", JOIN_S)

    def _made(self, batch: Any, side: Any, device: torch.device,
              taken: Any = None) -> tuple[Any, Any, Any, list]:
        """``batch`` moved to ``device`` and transformed; on CUDA on ``side``, with the event
        that marks its end and the tensors the step's stream will use. ``taken``: an event
        after the steps before the batch the loop holds; the copy waits for those (memory
        they freed, in objects that move themselves too), not for the step in progress."""
        assert self.transform is not None
        if side is None:
            return batch, self.transform(_move(batch, device, False, None)), None, []
        tensors: list[torch.Tensor] = []
        if taken is not None:
            side.wait_event(taken)
        with torch.cuda.stream(side):
            moved = self.transform(_move(batch, device, self.non_blocking, tensors))
            tensors += [t for t in _tensors(moved) if t.is_cuda]
            ready = torch.cuda.Event()
            ready.record(side)
        return batch, moved, ready, tensors

    def _ahead(self) -> Generator[Any, None, None]:
        device = self.device
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        side = torch.cuda.Stream(device)
        batches = iter(self.loader)
        ahead, error = self._copy(batches, side, device), None
        while ahead is not None:
            _host, moved, made = ahead  # _host: alive until its copy is waited on, and past it
            current = torch.cuda.current_stream(device)
            current.wait_stream(side)  # only batch n's copy is queued on the side stream yet
            for tensor in made:
                tensor.record_stream(current)
            try:
                ahead = self._copy(batches, side, device)  # batch n+1 copies during step n
            except Exception as exc:  # deliver batch n first, then what fetching n+1 raised
                ahead, error = None, exc
            self._held = 1 if ahead is not None else 0
            yield moved
        self._held = 0
        if error is not None:
            raise error

    def _copy(self, batches: Iterator[Any], side: torch.cuda.Stream,
              device: torch.device) -> tuple[Any, Any, list[torch.Tensor]] | None:
        """Fetch the next batch and issue its copy on ``side``; ``None`` at the end."""
        batch = next(batches, _END)
        if batch is _END:
            return None
        # called before batch n is handed over: this waits for the steps before step n (what
        # they freed, in objects that move themselves too), never for step n itself
        side.wait_stream(torch.cuda.current_stream(device))
        made: list[torch.Tensor] = []
        with torch.cuda.stream(side):
            moved = _move(batch, device, self.non_blocking, made)
        return batch, moved, made

    def state_dict(self) -> dict[str, Any]:
        """The loader's state as the consumer stands (the batch copying ahead is not counted
        as received): ``{"version": 1, "loader": loader.state_dict()}``."""
        if not isinstance(self.loader, Stateful):
            raise InvalidConfigError(f"state_dict(): the loader {type(self.loader).__name__} "
                                     "has none to resume from")
        with self._fetching:  # not while a batch is being fetched
            held = self._held
            loader: Any = self.loader  # the factory's loaders take ``unreceived``
            inner = loader.state_dict(unreceived=held) if held else loader.state_dict()
        return {"version": 1, "loader": inner}

    def load_state_dict(self, state: Any) -> None:
        """The loader resumes from ``state["loader"]`` at the next ``iter()``."""
        if not isinstance(state, Mapping) or "loader" not in state:
            raise InvalidConfigError(f"state={state!r:.80} is not a DeviceLoader.state_dict(): "
                                     "pass the dict that state_dict() returned")
        if not isinstance(self.loader, Stateful):
            raise InvalidConfigError(f"load_state_dict(): the loader "
                                     f"{type(self.loader).__name__} cannot resume")
        self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        """End every pass in progress (dropping the batch held ahead), then call the loader's
        ``close()`` if it has one. Idempotent; iterating again afterwards starts a new pass."""
        for batches in list(self._passes):
            batches.close()
        if not self._closed:
            self._closed = True
            close_if_closable(self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError like torch's if none

    def __getattr__(self, name: str) -> Any:
        # only for what this object lacks; a half-built or unpickling one has no loader yet
        if name.startswith("__") or "loader" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.loader, name)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_passes", "_fetching")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _passes=weakref.WeakSet(), _fetching=threading.Lock())

    def __repr__(self) -> str:
        transform = "" if self.transform is None else f", transform={self.transform!r}"
        return (f"DeviceLoader({type(self.loader).__name__}, device={str(self.device)!r}"
                f"{transform})")
