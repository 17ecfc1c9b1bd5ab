"""Epochs of a batch sampler drawn one after another, each the epoch torch would draw at
``iter()``: the engine under a loader's index stream (``loading.epochs``) and the adapting
loader's epoch order (``feed.adaptive``).

An epoch is drawn at the loop's ``iter()`` or ahead of it (while the loop takes the last
epoch's batches). What decides it is read just before its draw (``loading.inputs``), and
``check`` reads it again when the loop asks for that epoch: any difference
(``policy.epochs.why_stale``) and the epoch must be drawn again. Draws ahead never move the
generators the loop sees:

- a sampler's own generator: an epoch drawn ahead draws from a copy that starts where the
  last epoch's draws ended; the sampler's generator takes the copy's state when the epoch is
  served (``adopt``), and follows it to the epoch's end;
- torch's global generator (a sampler without one): the global state is put back after a
  draw ahead, and the draw counts only if the loop drew nothing from it before ``iter()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import BatchSampler

from ..policy.epochs import EpochInputs, why_stale
from .inputs import RandomSource, epoch_inputs, random_source


def advances_itself(sampler: Any) -> bool:
    """The factory's samplers: each ``iter()`` starts epoch ``_next_epoch``."""
    return hasattr(sampler, "_next_epoch") and hasattr(sampler, "epoch")


def epoch_state(sampler: Any) -> tuple[Any, Any]:
    return getattr(sampler, "epoch", None), getattr(sampler, "_next_epoch", None)


@dataclass
class Drawn:
    """One epoch as it was drawn."""

    inputs: EpochInputs  # read just before its draw (``random``: the state drawn from)
    after: bytes | None  # the global generator's state right after its draw
    sampler_epoch: Any  # the sampler's epoch once its iter() ran (None: it has none)
    number: int  # the loader's epoch number, the tag of its batches
    end: bytes | None = None  # an own generator's state when its last index was drawn
    generator: Any = None  # the copy of the sampler's own generator it was drawn with
    adopted: bytes | None = None  # the state the sampler's generator was given when served


class EpochDraws:
    """The epochs of ``batches`` (a batch sampler) over ``dataset``, drawn one at a time.

    ``drawn[k]``: how the k-th epoch drawn was drawn; ``first``: the loader's number of the
    first (the tag of its batches when the sampler has no epoch of its own); ``redraw``: the
    global generator's state to draw the first epoch from (a resume), the loop's put back.
    """

    def __init__(self, batches: Any, dataset: Any, *, first: int = 0,
                 redraw: bytes | None = None) -> None:
        self.batches, self.dataset, self.first = batches, dataset, first
        # the sampler (its generator, a DistributedSampler's epochs), whatever its type
        self.order: Any = batches.sampler if isinstance(batches, BatchSampler) else batches
        self.source: RandomSource | None = random_source(self.order)
        self.drawn: list[Drawn] = []
        self.state_after: tuple[Any, Any] = epoch_state(self.order)
        self._redraw = redraw
        self._internal: bytes | None = None  # the global state, draws ahead included
        self._next_base: bytes | None = None  # where an own generator's next epoch draws from
        self._current: Any = None

    @property
    def drawing(self) -> bool:
        """An epoch is being drawn (its end not reached)."""
        return self._current is not None

    def begin(self, *, ahead: bool, number: int | None = None) -> Any:
        """Start drawing the next epoch and return its first batch (None: it is empty).
        ``ahead``: before the loop asks for it (else at its ``iter()``, as torch draws);
        ``number``: the loader's number for it (default: ``first`` + epochs drawn before)."""
        k = len(self.drawn)
        source, own = self.source, None
        start_from = self._internal if ahead else self._redraw
        self._redraw = None
        hide = source is not None and source.is_global and (ahead or start_from is not None)
        if hide:
            assert source is not None
            seen = source.get()  # the loop goes on from this state
            if start_from is not None:
                source.set(start_from)
        base = source.get() if source is not None else None
        if source is not None and not source.is_global:
            if ahead and self._next_base is not None:
                base = self._next_base
            own = RandomSource.copy_of(base)  # type: ignore[arg-type]
            self.order.generator = own
        inputs = epoch_inputs(self.batches, self.order, self.dataset, base,
                              with_epoch=not advances_itself(self.order))
        try:
            self._current = iter(self.batches)
            first = next(self._current, None)  # the sampler's iter() runs here
        finally:
            if own is not None:
                assert source is not None
                self.order.generator = source.generator
        after = source.get() if source is not None and own is None else None
        if hide:
            assert source is not None
            self._internal = after
            source.set(seen)
        elif source is not None and source.is_global:
            self._internal = None
        sampler_epoch = epoch_state(self.order)[0]
        self.state_after = epoch_state(self.order)
        if number is None:
            number = self.first + k
        number = sampler_epoch if isinstance(sampler_epoch, int) else number
        self.drawn.append(Drawn(inputs, after, sampler_epoch, number, generator=own))
        if not ahead:
            self.adopt(k)
        if first is None:
            self._ended()
        return first

    def next(self) -> Any:
        """The next batch of the epoch being drawn; None once it ended."""
        if self._current is None:
            return None
        batch = next(self._current, None)
        if batch is None:
            self._ended()
        return batch

    def check(self, k: int) -> str | None:
        """Why epoch ``k``, drawn ahead, is not the one torch would draw now (None: it is,
        and it is served: the generators go where its draw at ``iter()`` leaves them)."""
        drawn, order = self.drawn[k], self.order
        if advances_itself(order) and epoch_state(order) != self.state_after:
            if order._next_epoch != drawn.sampler_epoch:
                return "set_epoch() chose another epoch"
            order.epoch, order._next_epoch = self.state_after  # served from what was drawn
        source = self.source
        now = epoch_inputs(self.batches, order, self.dataset,
                           source.get() if source is not None else None,
                           with_epoch=not advances_itself(order))
        stale = why_stale(drawn.inputs, now, expected=drawn.inputs.random)
        if stale is not None:
            return stale
        if source is not None and source.is_global and drawn.after is not None:
            source.set(drawn.after)  # as torch's draw at iter() would leave it
        self.adopt(k)
        return None

    def give_back(self, k: int) -> None:
        """Before drawing afresh: a factory sampler goes back to epoch ``k``, the first
        drawn ahead and not served, unless the caller chose one (``set_epoch``) since."""
        if len(self.drawn) > k and advances_itself(self.order) \
                and epoch_state(self.order) == self.state_after:
            self.order._next_epoch = self.drawn[k].sampler_epoch

    def adopt(self, k: int) -> None:
        """Epoch ``k`` is served: a sampler's own generator goes where its draw left the copy
        (as if drawn now), and follows it to the epoch's end."""
        drawn = self.drawn[k]
        if drawn.generator is not None and self.source is not None:
            drawn.adopted = drawn.end or drawn.generator.get_state().numpy().tobytes()
            self.source.set(drawn.adopted)

    def _ended(self) -> None:
        self._current = None
        drawn = self.drawn[-1]
        if drawn.generator is not None and self.source is not None:
            drawn.end = self._next_base = drawn.generator.get_state().numpy().tobytes()
            if drawn.adopted is not None and self.source.get() == drawn.adopted:
                drawn.adopted = drawn.end  # served and untouched: it follows the epoch's end
                self.source.set(drawn.end)
