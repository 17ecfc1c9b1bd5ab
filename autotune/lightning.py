"""Lightning integration: ``AutotuneDataModule``, a ``LightningDataModule`` whose loaders
come from ``OptimalDataLoaderFactory`` (optional: ``pip install 'autotune[lightning]'``).

``import autotune`` never imports Lightning; only ``import autotune.lightning`` does. It uses
``lightning.pytorch`` when installed, else ``pytorch_lightning``: the Trainer must come from
the same package (Lightning refuses a mix of the two).
"""

from __future__ import annotations

import functools
from typing import Any

from ._check import check_int
from .errors import InvalidConfigError
from .loading.builder import TunedDataLoader
from .loading.factory import OptimalDataLoaderFactory
from .loading.splits import DEFAULT_SPLITS, split_dataset

try:
    from lightning.pytorch import LightningDataModule
except ImportError as first:
    try:
        from pytorch_lightning import LightningDataModule  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("autotune.lightning needs Lightning (lightning.pytorch or "
                          "pytorch_lightning). Fix: pip install 'autotune[lightning]'") from first

__all__ = ["AutotuneDataModule"]

_SPLITS = ("train", "val", "test")


class AutotuneDataModule(LightningDataModule):
    """Train, validation and test loaders from the factory, for ``Trainer.fit/validate/test``.

    Give the splits (``train=``, ``val=``, ``test=``), or one ``dataset=`` that is split
    reproducibly (the same split on every run and every rank, ``split_dataset``). Only the
    hooks of the splits present are defined, as ``LightningDataModule.from_datasets`` does:
    without ``val`` Lightning skips validation, without ``test`` ``Trainer.test`` says so.

    The workload is measured once per dataset (once in all with ``dataset=``) and reused by
    every loader Lightning asks for (it asks again for each fit, validate and test).
    Under DDP the factory already gives each rank its share (a ``DistributedSampler`` that
    reshuffles every epoch for training; in-order, unpadded shards for validation and test,
    so each sample counts once), and Lightning keeps these loaders: it adds a sampler only
    where none is a ``DistributedSampler``. ``teardown`` stops the loaders' workers.

    Args:
        train, val, test: map-style or iterable datasets, one per split (each optional).
        batch_size: samples per batch (per rank) for every loader, >= 1.
        dataset: one map-style dataset to split instead of passing the splits.
        splits: fractions for train, val and test (default ``(0.8, 0.1, 0.1)``; ``None``
            or 0 leaves a split out); only with ``dataset=``.
        seed: the split's permutation seed; only with ``dataset=``.
        factory: the ``OptimalDataLoaderFactory`` (default: the process-wide one).
        **loader_keywords: what ``create_training_loader`` takes (``has_augmentation``,
            ``profile_key``, ``num_workers``, ``collate_fn``, ...), given to every loader.

    Attributes:
        datasets: ``{"train": ..., "val": ..., "test": ...}``, ``None`` for a missing split.

    Example::

        import lightning.pytorch as pl
        from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
        from autotune.lightning import AutotuneDataModule

        data = AutotuneDataModule(dataset=RandomDataset(32, 640), batch_size=64,
                                  splits=(0.8, 0.2, None))
        pl.Trainer(max_epochs=2).fit(BoringModel(), datamodule=data)  # or devices=2, "ddp"
    """

    def __init__(self, train: Any = None, val: Any = None, test: Any = None, *,
                 batch_size: int, dataset: Any = None, splits: Any = None, seed: int = 0,
                 factory: OptimalDataLoaderFactory | None = None, **loader_keywords: Any) -> None:
        super().__init__()
        given = [f"{name}=" for name, data in zip(_SPLITS, (train, val, test)) if data is not None]
        if dataset is not None and given:
            raise InvalidConfigError(
                f"AutotuneDataModule got dataset= and {', '.join(given)}: pass either one "
                "dataset= (with splits=) or the splits train=, val=, test=, not both")
        if dataset is None and not given:
            raise InvalidConfigError(
                "AutotuneDataModule got no data: pass train= (and val=, test=), or "
                "dataset= with splits=")
        if dataset is None and splits is not None:
            raise InvalidConfigError(
                f"splits={splits!r} applies to dataset= only: pass dataset= instead of "
                f"{', '.join(given)}, or drop splits=")
        check_int("batch_size", batch_size, minimum=1)
        if factory is not None and not isinstance(factory, OptimalDataLoaderFactory):
            raise InvalidConfigError(
                f"factory={factory!r} must be an autotune.OptimalDataLoaderFactory or None")
        if dataset is not None:
            train, val, test = split_dataset(
                dataset, DEFAULT_SPLITS if splits is None else splits, seed=seed)
        self.datasets = dict(zip(_SPLITS, (train, val, test)))
        self.batch_size = batch_size
        self.loader_keywords = loader_keywords
        self._factory, self._whole = factory, dataset
        self._workloads: dict[str, Any] = {}
        self._loaders: dict[str, TunedDataLoader] = {}
        for name, data in self.datasets.items():
            if data is not None:  # a hook only for a split that exists
                setattr(self, f"{name}_dataloader", functools.partial(self._loader, name))

    @property
    def factory(self) -> OptimalDataLoaderFactory:
        """The factory the loaders come from (made when first needed: under DDP, per rank)."""
        if self._factory is None:
            self._factory = OptimalDataLoaderFactory.default()
        return self._factory

    def teardown(self, stage: str) -> None:
        """Stop the worker processes of the loaders made here (iterating again restarts them)."""
        for loader in self._loaders.values():
            loader.close()

    def _loader(self, name: str) -> TunedDataLoader:
        keywords = dict(self.loader_keywords)
        if keywords.get("workload") is None:
            keywords["workload"] = self._workload(name, keywords)
        data = self.datasets[name]
        if name == "train":
            loader = self.factory.create_training_loader(data, self.batch_size, **keywords)
        else:
            loader = self.factory.create_validation_loader(data, self.batch_size, **keywords)
        old, self._loaders[name] = self._loaders.get(name), loader
        if old is not None:
            old.close()
        return loader

    def _workload(self, name: str, keywords: dict[str, Any]) -> Any:
        """One measurement per dataset: of the whole ``dataset=``, else of this split."""
        key = "dataset" if self._whole is not None else name
        if key not in self._workloads:
            data = self._whole if self._whole is not None else self.datasets[name]
            self._workloads[key] = self.factory._measure_once(data, keywords)
        return self._workloads[key]
