"""Datasets and a script for tests/test_tune_distributed.py, run under torchrun.

As targets: ``autotune tune tests/tune_target.py:make_quick`` (or ``:make_fails_on_rank_1``).
As a script: ``torchrun --nproc_per_node 2 tests/tune_target.py OUT_DIR PROFILE_DIR [MODE]``
tunes with the Python API inside a gloo process group and writes each rank's result to
``OUT_DIR/rank<R>.json``; with MODE ``step-fails-on-rank-1`` the training step raises on
rank 1, and each rank writes the error it raised to ``OUT_DIR/rank<R>.error`` instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset


class Quick(Dataset):
    """Waits 1 ms per sample, like storage: cheap to measure, workers help a little."""

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.001)
        return torch.zeros(8)


class FailsOnRank1(Quick):
    """Fine on every rank but rank 1, where every sample raises."""

    def __getitem__(self, index: int) -> torch.Tensor:
        if os.environ.get("RANK") == "1":
            raise ValueError("this rank's storage is unreachable")
        return super().__getitem__(index)


def make_quick() -> Quick:
    return Quick()


def make_fails_on_rank_1() -> FailsOnRank1:
    return FailsOnRank1()


def step_fails_on_rank_1(batch: torch.Tensor) -> None:
    if os.environ.get("RANK") == "1":
        raise RuntimeError("out of memory in the training step")


def main(out_dir: str, profile_dir: str, mode: str = "") -> int:
    import torch.distributed as dist

    from autotune import AutotuneError, Autotuner

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    step = step_fails_on_rank_1 if mode == "step-fails-on-rank-1" else None
    try:
        try:
            result = Autotuner(Quick(), batch_size=8, budget_s=3, max_workers=2, key="quick",
                               train_step=step).run()
        except AutotuneError as exc:
            Path(out_dir, f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
            return 1
        path = result.save(profile_dir)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "settings": result.best.settings(), "samples_per_s": result.best_samples_per_s,
            "trials": len(result.trials), "local_world_size": result.local_world_size,
            "path": str(path)}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
