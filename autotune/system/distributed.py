"""Where this process sits among torch.distributed ranks, read live (not cached).

The process group when one is initialised, else torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``). A process alone is rank 0 of 1, and so is
one whose environment is half a torchrun job (``torchrun_problem``), with a warning. Read at
each call, because a process group is often created after the factory (Lightning does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from .._warn import warn_user

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True, kw_only=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    group: bool = False  # an initialised process group: collectives work

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_ranks(env: Mapping[str, str] | None = None) -> Ranks:
    """This process's rank, the world size and the ranks on this host.

    Args:
        env: the environment to read (default: ``os.environ``).
    """
    env = os.environ if env is None else env
    group = process_group_ready()
    problem = None if group else torchrun_problem(env)
    if problem is not None:
        _warn_once(f"{problem}: this is not read as a torchrun job, so autotune acts as rank 0 "
                   "of 1 and this process gets the whole dataset. Launch with torchrun to "
                   "split the data across ranks, or unset the variables")
        return Ranks()

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, ""))
        except ValueError:
            return default

    rank, world = number("RANK", 0), number("WORLD_SIZE", 1)
    if group:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    local_world = number("LOCAL_WORLD_SIZE", world if world > 1 and "LOCAL_RANK" in env else 1)
    return Ranks(rank=rank, world_size=max(1, world), local_rank=number("LOCAL_RANK", 0),
                 local_world_size=max(1, min(local_world, max(1, world))), group=group)


def torchrun_problem(env: Mapping[str, str]) -> str | None:
    """Why the torchrun variables in ``env`` do not describe a process of a torchrun job
    (``None``: they do, or none is set). A real job sets ``WORLD_SIZE`` with ``RANK``
    (torchrun) or ``LOCAL_RANK`` (Lightning's launcher); ``WORLD_SIZE`` alone is usually
    left over in a shell or notebook that exported it."""
    given = {name: env[name] for name in TORCHRUN_VARIABLES if name in env}
    bad = [f"{name}={value!r}" for name, value in given.items()
           if not value.strip().isdigit()]
    if bad:
        return f"{', '.join(bad)} {'is not a' if len(bad) == 1 else 'are not'} whole number"
    values = {name: int(value) for name, value in given.items()}
    world = values.get("WORLD_SIZE")
    if world is None or world == 1:
        return None
    if world < 1:
        return f"WORLD_SIZE={world} is below 1"
    if "RANK" not in values and "LOCAL_RANK" not in values:
        return f"WORLD_SIZE={world} is set without RANK or LOCAL_RANK"
    if values.get("RANK", 0) >= world:
        return f"RANK={values['RANK']} is not below WORLD_SIZE={world}"
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Once per process: the ranks are read at every loader built."""
    if message not in _warned:
        _warned.add(message)
        warn_user(message)


def process_group_ready() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


_exchanges = 0  # calls so far in this process: ranks that make the same calls pair up


def exchange(value: bytes, timeout_s: float) -> list[bytes] | None:
    """Every rank's ``value`` (indexed by rank), through the process group's key-value store;
    ``None`` when not every rank posted within ``timeout_s`` (it may never: a loader built on
    rank 0 only). Not a collective: no rank hangs on one that never calls."""
    global _exchanges
    import torch.distributed as dist

    _exchanges += 1
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    keys = [f"autotune/exchange/{_exchanges}/{r}" for r in range(world)]
    store.set(keys[rank], value)  # type: ignore[arg-type]  # bytes: the store takes both
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:  # the store's timeout error type differs across torch versions
        return None
    return [bytes(store.get(key)) for key in keys]
