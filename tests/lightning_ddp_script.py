"""A real ``Trainer(strategy="ddp", devices=2)`` on CPU (gloo) over ``AutotuneDataModule``.

    python lightning_ddp_script.py OUT_DIR NUM_WORKERS USE_DISTRIBUTED_SAMPLER(0|1) [H5_DIR]

Lightning starts rank 1 by running this script again. Each rank writes OUT_DIR/rank<r>.json:
the sample indices it trained on per epoch, the ones it validated on, and what its loaders
were (sampler classes, workers, whether Lightning kept autotune's loader). With H5_DIR the
data is ``HDF5Dataset``s of H5_DIR/train*.h5 and H5_DIR/val*.h5 (keys x and index).
"""

from __future__ import annotations

import faulthandler
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl
from datasets import Indexed

from autotune import HDF5Dataset
from autotune.lightning import AutotuneDataModule

SIZE, SPLITS, BATCH, EPOCHS = 60, (0.8, 0.15, None), 4, 2  # train 48 (24 per rank), val 9


class Recorder(pl.LightningModule):
    """A tiny model that notes every sample index it sees. Its batch norm has buffers, which
    DDP broadcasts in a forward pass: ranks must not disagree on whether they run one."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.linear = torch.nn.BatchNorm1d(1), torch.nn.Linear(1, 1)
        self.train_epochs: list[list[int]] = []
        self.val_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))

    def on_train_epoch_start(self) -> None:
        self.train_epochs.append([])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        index = _index(batch)
        self.train_epochs[-1] += index.tolist()
        x = index.view(-1, 1).float()
        return (self(x) - x).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        index = _index(batch)
        self.val_seen += index.tolist()
        self(index.view(-1, 1).float())

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _index(batch: Any) -> torch.Tensor:
    """The samples' indices: an Indexed batch, or an HDF5Dataset's (x, index)."""
    return (batch[1] if isinstance(batch, (list, tuple)) else batch).view(-1)


def describe(loader: object, ours: object) -> dict[str, object]:
    return {"sampler": type(loader.sampler).__name__, "num_workers": loader.num_workers,
            "kept": loader is ours, "class": type(loader).__name__,
            "has_config": getattr(loader, "autotune_config", None) is not None,
            "across": getattr(getattr(loader, "autotune_config", None), "prefetch_across_epochs",
                              None)}


def main() -> None:
    out, workers, use_sampler = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    warnings.simplefilter("ignore")
    if len(sys.argv) > 4:
        h5 = Path(sys.argv[4])
        data = AutotuneDataModule(
            train=HDF5Dataset(str(h5 / "train*.h5"), keys=("x", "index"), preload=False),
            val=HDF5Dataset(str(h5 / "val*.h5"), keys=("x", "index"), preload=False),
            batch_size=BATCH, num_workers=workers)
    else:
        data = AutotuneDataModule(dataset=Indexed(SIZE), splits=SPLITS, batch_size=BATCH,
                                  num_workers=workers)
    model = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
                         use_distributed_sampler=use_sampler, num_sanity_val_steps=0,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    record = {
        "rank": trainer.global_rank, "world_size": trainer.world_size,
        "train": model.train_epochs, "val": model.val_seen,
        "train_split": getattr(data.datasets["train"], "indices", None),
        "val_split": getattr(data.datasets["val"], "indices", None),
        "train_loader": describe(trainer.train_dataloader, data._loaders["train"]),
        "val_loader": describe(trainer.val_dataloaders, data._loaders["val"]),
        "measured": sorted(data._workloads),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    # a rank still running after 90 s (a run takes ~15) writes every thread's stack: the
    # test's failure message then shows where a hang waits
    faulthandler.dump_traceback_later(90, exit=False)
    main()
    faulthandler.cancel_dump_traceback_later()
