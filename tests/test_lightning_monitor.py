"""``autotune.lightning.StallMonitorCallback`` under real Lightning Trainers: the stall it
reports against the share measured here, its verdicts, its report and its log line."""

from __future__ import annotations

import json
import logging
import time

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch
from datasets import Indexed, Sleepy
from torch.utils.data import DataLoader

from autotune import StallReport
from autotune.lightning import StallMonitorCallback

pytestmark = [  # Lightning's advice on worker counts and validation, torch's on pytree
    pytest.mark.filterwarnings("ignore:The '\\w+' does not have many workers"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

BATCH = 4


def quiet_trainer(callbacks, **keywords) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks, **keywords)


class Sleeper(pl.LightningModule):
    """A step of known length: sleeps ``step_s``, then a tiny linear layer's loss. Records the
    time its training steps took and, optionally, validates slowly."""

    def __init__(self, step_s: float, val_s: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.step_s, self.val_s = step_s, val_s
        self.step_time = 0.0

    def training_step(self, batch, batch_idx):
        start = time.perf_counter()
        time.sleep(self.step_s)
        loss = self.layer(batch.float()[:, :1]).pow(2).mean()
        self.step_time += time.perf_counter() - start
        return loss

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_s)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Span(pl.Callback):
    """The wall time of the training epochs, from their start hook to their end hook."""

    def __init__(self) -> None:
        self.wall_s = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.wall_s += time.perf_counter() - self._start


class Closable(DataLoader):
    """A loader with a ``close`` (as ``TunedDataLoader`` has) that records being closed."""

    closed = False

    def close(self) -> None:
        self.closed = True


def fit(dataset, step_s: float, *, epochs: int = 2, num_workers: int = 0, **callback_keywords):
    callback = StallMonitorCallback(**{"log_every_s": None, **callback_keywords})
    span = Span()
    model, loader = Sleeper(step_s), Closable(dataset, batch_size=BATCH, num_workers=num_workers)
    quiet_trainer([span, callback], max_epochs=epochs).fit(model, loader)
    return callback, span, model, loader


def test_stall_matches_the_share_measured_around_the_steps():
    # 4 samples x 5 ms of sleep to load a batch, a 20 ms step: about half the time waits.
    callback, span, model, loader = fit(Sleepy(size=64, seconds=0.005), 0.02)
    report = callback.report()
    assert isinstance(report, StallReport)
    assert report.steps == len(loader) * 2 == 32 and report.passes == 2
    # Measured here: the epochs' wall time less the time inside training_step. The callback
    # counts backward and the optimizer (~0.1 ms) as step and Lightning's bookkeeping
    # between batches as wait; both are small next to the 40 ms a batch takes, and 0.1
    # leaves room for a loaded machine's scheduling jitter on top.
    measured = 1 - model.step_time / span.wall_s
    assert 0.3 < measured < 0.7  # the set-up is what it is meant to be
    assert report.stall_fraction == pytest.approx(measured, abs=0.1)
    assert report.wall_s == pytest.approx(span.wall_s, rel=0.05)  # nothing lost or counted twice
    assert report.step_s >= model.step_time
    assert report.verdict == "input-bound"
    assert report.wait_p50_s == pytest.approx(4 * 0.005, abs=0.01)


def test_fast_data_and_a_long_step_is_not_input_bound():
    callback, _, _, loader = fit(Indexed(64), 0.03)
    report = callback.report()
    assert report.verdict == "not input-bound", report
    assert report.steps == len(loader) * 2
    assert report.step_p50_s == pytest.approx(0.03, abs=0.01)


def test_validation_counts_neither_way():
    callback = StallMonitorCallback(log_every_s=None)
    model = Sleeper(0.03, val_s=0.05)
    loaders = DataLoader(Indexed(32), batch_size=BATCH), DataLoader(Indexed(8), batch_size=BATCH)
    quiet_trainer([callback], max_epochs=2, val_check_interval=0.5).fit(model, *loaders)
    report = callback.report()  # validation mid-epoch and at its end: 4 x 2 x 50 ms = 0.4 s
    assert report.steps == 16 and report.passes == 2
    # counted as waiting, validation would make this ~45% input-bound; Lightning's own
    # ~1-3 ms between steps may count (5-10% of 30 ms steps on a loaded machine)
    assert report.wait_s < 0.1 and report.verdict != "input-bound", report


def test_report_is_plain_data_with_the_loaders_workers_and_the_loader_stays_open():
    callback, _, _, loader = fit(Indexed(16), 0.0, epochs=1, num_workers=1)
    data = callback.report().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["name"] == "train" and data["steps"] == 4
    assert data["num_workers"] == loader.num_workers == 1
    assert not loader.closed  # teardown released the monitor, not the trainer's loader
    assert callback.monitor.iterable is loader


def test_the_final_summary_is_logged_once_on_rank_zero(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="autotune.lightning"):
        callback, *_ = fit(Indexed(16), 0.0, epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "autotune.lightning"]
    assert lines == [f"autotune stall {callback.report().summary()}"]
    assert lines[0].startswith("autotune stall train: 8 steps, stall ")

    caplog.clear()
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    with caplog.at_level(logging.INFO, logger="autotune"):
        callback, *_ = fit(Indexed(16), 0.0, epochs=1, log_every_s=1e-6)
    assert callback.report().steps == 4  # timed, and silent: not rank 0
    assert [r for r in caplog.records if r.name.startswith("autotune")] == []
