"""Pure judgements on an epoch drawn ahead and on a dataset the workers copied.

A loader that runs across epochs draws the next epoch while the loop takes this one's last
batches. torch would draw it at ``iter()``, from the state at that moment: the lengths, the
sampler's parameters, its epoch and random source. ``why_stale`` compares what was recorded
when the epoch was drawn with the same reads at ``iter()``: any difference and the epoch is
drawn again. Persistent workers hold a copy of the dataset made when they started;
``changed`` names what differs between that copy's summary and the dataset now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class EpochInputs:
    """What decides one epoch's order, read just before it is drawn (``loading.inputs``).

    ``random`` is the state of the random source the sampler draws from (its generator, or
    torch's global one), as bytes; None: it draws from none. ``params``: the sampler's and
    batch sampler's own parameters (weights, indices, seed, batch size, ...) as comparable
    summaries; ``lengths``: the dataset's, the sampler's and the batch sampler's.
    """

    lengths: tuple[int | None, ...]
    params: tuple[tuple[str, Any], ...]
    random: bytes | None = None


def why_stale(drawn: EpochInputs, now: EpochInputs, *, expected: bytes | None) -> str | None:
    """Why the epoch drawn with ``drawn`` is not the one torch would draw ``now`` (None: it
    is). ``expected``: the random source's state if nothing but the loader used it since the
    draw (the loader's own draws hidden or accounted for)."""
    if drawn.lengths != now.lengths:
        return f"the lengths changed since it was drawn: {drawn.lengths} -> {now.lengths}"
    before = dict(drawn.params)
    for name, value in now.params:
        if before.get(name) != value:
            return f"the sampler's {name} changed since it was drawn"
    if now.random != expected:
        return "its random generator was reseeded or used since it was drawn"
    return None


def changed(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The attributes whose summary differs (added and removed ones included), sorted."""
    return sorted(name for name in set(before) | set(now) if before.get(name, _NONE)
                  != now.get(name, _NONE))


_NONE = object()
