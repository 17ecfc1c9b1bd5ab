"""Where this process sits among torch.distributed ranks, read live (not cached).

The process group when one is initialised, else torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``). A process alone is rank 0 of 1. Read at
each call, because a process group is often created after the factory (Lightning does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta


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
    """This process's rank, the world size and the ranks on this host."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, ""))
        except ValueError:
            return default

    rank, world = number("RANK", 0), number("WORLD_SIZE", 1)
    group = process_group_ready()
    if group:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    local_world = number("LOCAL_WORLD_SIZE", world if world > 1 and "LOCAL_RANK" in env else 1)
    return Ranks(rank=rank, world_size=max(1, world), local_rank=number("LOCAL_RANK", 0),
                 local_world_size=max(1, min(local_world, max(1, world))), group=group)


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
    store.set(keys[rank], value)
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:  # the store's timeout error type differs across torch versions
        return None
    return [bytes(store.get(key)) for key in keys]
