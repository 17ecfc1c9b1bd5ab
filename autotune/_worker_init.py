"""What runs at the start of every worker process: gc.freeze, thread budget, the user's hook.

Seeding is torch's: each worker's ``random``, numpy global RNG and torch start from the
loader's base seed + worker id. With a factory seed, each sample is also seeded from
(seed, epoch, index) before it is made (``loading.seeding``), whatever worker makes it.
On the ground floor because ``LoaderConfig.dataloader_kwargs`` hands it out.

A class rather than a closure so that it pickles under spawn and forkserver.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from threadpoolctl import threadpool_limits  # imported here so forked workers inherit it

_limits: list[Any] = []  # keeps threadpoolctl's limiter alive for the worker's lifetime


class WorkerInit:
    """``worker_init_fn`` for autotune's loaders.

    Freezes what the worker inherited out of the garbage collector's reach, sizes native
    thread pools to ``threads`` (``limit_threads``), then calls ``user_fn``.
    """

    def __init__(self, *, threads: int | None = None,
                 user_fn: Callable[[int], Any] | None = None) -> None:
        self.threads = threads
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        # Objects inherited from the parent go to the permanent generation, so this
        # worker's garbage collector never walks them: walking writes to their headers,
        # and every page written is copied (memory would grow with the parent's heap).
        gc.freeze()
        if self.threads is not None:
            limit_threads(self.threads)
        if self.user_fn is not None:
            self.user_fn(worker_id)

    def __repr__(self) -> str:
        return f"WorkerInit(threads={self.threads}, user_fn={self.user_fn!r})"


def limit_threads(threads: int) -> None:
    """Size BLAS pools to ``threads``; keep OpenMP and torch at the one thread torch gives workers.

    GNU OpenMP is not fork-safe: a forked worker that raises torch's or OpenMP's thread
    count deadlocks in its first parallel region (seen with torch 2.13). BLAS pools
    (OpenBLAS, MKL) may grow.
    """
    import torch

    _limits.append(threadpool_limits(limits={"blas": threads, "openmp": 1}))
    torch.set_num_threads(1)
