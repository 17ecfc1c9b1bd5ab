"""Lightning integration (optional: ``pip install 'autotune[lightning]'``):
``AutotuneDataModule``, a ``LightningDataModule`` whose loaders come from
``OptimalDataLoaderFactory``, and ``StallMonitorCallback``, which tells whether a
``Trainer``'s training is input-bound (``StallMonitor`` for a loop Lightning owns).

``import autotune`` never imports Lightning; only ``import autotune.lightning`` does. It uses
``lightning.pytorch`` when installed, else ``pytorch_lightning``: the Trainer must come from
the same package (Lightning refuses a mix of the two).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from ._check import check_int
from .errors import InvalidConfigError
from .factory.factory import TRAINING_ONLY, OptimalDataLoaderFactory
from .feed.monitor import DEFAULT_LOG_EVERY_S, StallMonitor, StallReport
from .loading.builder import TunedDataLoader
from .sources.splits import DEFAULT_SPLITS, split_dataset

try:
    from lightning.pytorch import Callback, LightningDataModule
except ImportError as first:
    try:
        # the same API under its older name
        from pytorch_lightning import (  # type: ignore[assignment]  # the same API
            Callback, LightningDataModule)
    except ImportError:
        raise ImportError("autotune.lightning needs Lightning (lightning.pytorch or "
                          "pytorch_lightning). Fix: pip install 'autotune[lightning]'") from first

__all__ = ["AutotuneDataModule", "StallMonitorCallback"]

log = logging.getLogger(__name__)

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
    The loaders have ``state_dict()``, so ``Trainer.fit(ckpt_path=...)`` resumes mid-epoch;
    bit for bit (augmentations included) with a seeded factory
    (``factory=OptimalDataLoaderFactory(seed=0)``: ``seed=`` here seeds only the split).

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
            evaluation = {k: v for k, v in keywords.items() if k not in TRAINING_ONLY}
            loader = self.factory.create_validation_loader(data, self.batch_size, **evaluation)
        old, self._loaders[name] = self._loaders.get(name), loader
        if old is not None:
            old.close()
        return loader

    def _workload(self, name: str, keywords: dict[str, Any]) -> Any:
        """One measurement per dataset: of the whole ``dataset=``, else of this split."""
        key = "dataset" if self._whole is not None else name
        if key not in self._workloads:
            data = self._whole if self._whole is not None else self.datasets[name]
            self._workloads[key] = self.factory.pipeline.measure_once(data, keywords)
        return self._workloads[key]


class StallMonitorCallback(Callback):
    """Is a ``Trainer``'s training input-bound? What ``StallMonitor`` reports for a plain
    loop, for the loop Lightning owns: how long training waits for each batch against the
    time it spends on the batch (the step).

    The step runs from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
    backward, optimizer). The wait for a batch runs from the previous batch's
    ``on_train_batch_end`` (or the epoch's start) to its ``on_train_batch_start``: Lightning
    fetches the batch and moves it to the device there, so that is the input wait, and it
    also holds Lightning's own per-batch bookkeeping (loggers, schedulers: about half a
    millisecond, so a step of a few milliseconds shows some stall). Validation runs (at an
    epoch's end or mid-epoch) count neither way, nor does anything after
    ``on_train_epoch_end`` (epoch-end checkpoints); a checkpoint Lightning saves right after a
    mid-epoch validation counts as waiting. Lightning makes the first epoch's iterator before
    the epoch starts, so starting its workers is not counted (later epochs' starts are). With
    ``training_step(dataloader_iter)`` the step fetches its own batches and the wait is not
    seen.

    Every rank times itself; only global rank 0 logs: the periodic summary (logger
    ``autotune.monitor``) and, at ``on_train_end``, the final one (logger
    ``autotune.lightning``, INFO). Nothing is checkpointed: a resumed run is timed from the
    resume on. ``teardown`` releases NVML and leaves the trainer's loader open.

    Args:
        name: a label for logs and reports.
        log_every_s: a one-line summary at most this often while training; ``None`` for none.
        device: where the step runs, for GPU utilisation through NVML. Default: the
            trainer's device (``trainer.strategy.root_device``).

    Attributes:
        monitor: the ``StallMonitor`` the hooks feed (``monitor.history()`` for a plot).

    Example::

        import lightning.pytorch as pl
        from autotune.lightning import StallMonitorCallback

        callback = StallMonitorCallback()
        trainer = pl.Trainer(max_epochs=2, callbacks=[callback])
        trainer.fit(model, train_loader)
        print(callback.report())   # stall_fraction, verdict, suggestion, ...
    """

    def __init__(self, *, name: str | None = "train",
                 log_every_s: float | None = DEFAULT_LOG_EVERY_S, device: Any = None) -> None:
        super().__init__()
        self.monitor = StallMonitor([], name=name, device=device, log_every_s=log_every_s)
        self._device = device
        self._in_pass = False  # between on_train_epoch_start and on_train_epoch_end
        self._wait_start: float | None = None  # when the loop began waiting for a batch
        self._validating = False  # a validation run inside a pass: counted neither way

    def report(self) -> StallReport:
        """What training did so far (``StallMonitor.report``)."""
        return self.monitor.report()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        monitor = self.monitor
        if self._device is None and monitor.clock.passes == 0:  # now the device is known
            self.monitor = StallMonitor([], name=monitor.name, log_every_s=monitor.log_every_s,
                                        device=trainer.strategy.root_device)
            monitor.release()  # its NVML handle, if a report opened one
        if not trainer.is_global_zero:
            self.monitor.log_every_s = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        now = time.perf_counter()
        loader = _train_loader(trainer)
        if loader is not None:  # report().num_workers reads it
            self.monitor.iterable = loader
        self._begin(now)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if not self._in_pass:  # resumed mid-epoch: Lightning skips on_train_epoch_start
            self._begin(now)
        start = self._wait_start if self._wait_start is not None else now
        self.monitor.waited(start, now, True)  # the step begins now
        self._wait_start = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._in_pass:
            self._wait_start = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._in_pass and not self._validating:
            self._pause(time.perf_counter())
            self._validating = True

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._validating:
            self._validating = False
            self._wait_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._end(time.perf_counter())

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end(time.perf_counter())  # the running step ends here

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.monitor.clock.passes:
            log.info("autotune stall %s", self.report().summary())

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Release NVML. The loader stays open (it is the trainer's) and stays the monitor's
        for ``report().num_workers``."""
        self.monitor.release()

    def _begin(self, now: float) -> None:
        self._end(now)  # a pass whose end was not seen
        self.monitor.began(now, now)
        self._in_pass, self._wait_start, self._validating = True, now, False

    def _end(self, now: float) -> None:
        if self._in_pass:
            self._pause(now)
            self._in_pass = self._validating = False

    def _pause(self, now: float) -> None:
        """Close the running step (or the wait so far): what follows counts neither way."""
        start = self._wait_start if self._wait_start is not None else now
        self.monitor.waited(start, now, False)
        self._wait_start = None


def _train_loader(trainer: Any) -> Any:
    """The trainer's one training loader, or None (not made yet, or several)."""
    loader = getattr(trainer, "train_dataloader", None)
    for combined in ("iterables", "loaders"):  # a CombinedLoader (Lightning 1.x gives one)
        loader = getattr(loader, combined, loader)
    return loader if isinstance(getattr(loader, "num_workers", None), int) else None
