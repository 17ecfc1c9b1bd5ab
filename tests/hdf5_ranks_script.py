"""Run under `torchrun --nproc_per_node 2`: the indices each rank's factory loader yields
over an HDF5Dataset (2 workers each). argv: the folder of .h5 files, the JSON to write
(rank 0 writes every rank's, gathered over gloo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import autotune


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    ds = autotune.HDF5Dataset(str(folder / "*.h5"), keys=("x", "index"), preload=False)
    factory = autotune.OptimalDataLoaderFactory(seed=5)
    seen: dict[str, object] = {}
    with factory.create_training_loader(ds, batch_size=16, num_workers=2,
                                        drop_last=False) as loader:
        seen["sampler"] = type(loader.sampler).__name__
        seen["epochs"] = [[int(i) for _, index in loader for i in index] for _ in range(2)]
    val = factory.create_validation_loader(ds, batch_size=50, num_workers=0)
    seen["val"] = [int(i) for _, index in val for i in index]
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(everyone))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
