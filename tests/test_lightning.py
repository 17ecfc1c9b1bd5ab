"""``autotune.lightning.AutotuneDataModule`` under real Lightning Trainers (one process, and
DDP with two ranks through ``lightning_ddp_script.py``)."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch
from datasets import Indexed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_ddp_script import SIZE, SPLITS, Recorder
from test_resume import Noisy, assert_same_batches
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import autotune.factory.pipeline
from autotune import InvalidConfigError, OptimalDataLoaderFactory, TunedDataLoader
from autotune.lightning import AutotuneDataModule
from autotune.sources.samplers import ShardSampler
from autotune.sources.splits import split_dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

pytestmark = [  # Lightning's advice on worker counts (autotune chose them), torch's on pytree
    pytest.mark.filterwarnings("ignore:The '\\w+' does not have many workers"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


def quiet_trainer(**keywords) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **keywords)


def test_import_autotune_never_imports_lightning():
    code = ("import autotune, sys; "
            "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_without_lightning_the_import_error_says_the_fix(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # None: "not installed" to import
    monkeypatch.delitem(sys.modules, "autotune.lightning")
    with pytest.raises(ImportError, match=r"pip install 'autotune\[lightning\]'"):
        importlib.import_module("autotune.lightning")


def test_falls_back_to_pytorch_lightning(monkeypatch):
    legacy = pytest.importorskip("pytorch_lightning")
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(autotune, "lightning", sys.modules["autotune.lightning"])  # restored
    monkeypatch.delitem(sys.modules, "autotune.lightning")
    module = importlib.import_module("autotune.lightning")
    assert issubclass(module.AutotuneDataModule, legacy.LightningDataModule)


def test_train_only_fits_and_defines_no_other_loader():
    data = AutotuneDataModule(Indexed(32), batch_size=8, num_workers=0)
    model = Recorder()
    with pytest.warns(UserWarning, match="no `val_dataloader`. Skipping val loop"):
        quiet_trainer(max_epochs=2).fit(model, datamodule=data)
    assert [sorted(epoch) for epoch in model.train_epochs] == [list(range(32))] * 2
    assert model.train_epochs[0] != model.train_epochs[1]  # reshuffled
    assert model.val_seen == []
    assert not pl.utilities.model_helpers.is_overridden("val_dataloader", data)
    with pytest.raises(pl.utilities.exceptions.MisconfigurationException,
                       match="test_dataloader"):
        quiet_trainer().test(model, datamodule=data)


def test_one_dataset_split_fit_validate_test_measures_once(monkeypatch):
    calls = []
    measure = autotune.factory.pipeline.measure_workload
    monkeypatch.setattr(autotune.factory.pipeline, "measure_workload",
                        lambda *a, **k: calls.append(a[0]) or measure(*a, **k))
    data = AutotuneDataModule(dataset=Indexed(50), batch_size=4, seed=3)  # (0.8, 0.1, 0.1)
    train, val, test = split_dataset(Indexed(50), (0.8, 0.1, 0.1), seed=3)
    model, trainer = Recorder(), quiet_trainer(max_epochs=2)
    trainer.fit(model, datamodule=data)
    loaders = [trainer.train_dataloader, trainer.val_dataloaders]
    assert [sorted(epoch) for epoch in model.train_epochs] == [sorted(train.indices)] * 2
    assert model.val_seen == val.indices * 2  # in order, every sample, once per epoch
    trainer.validate(model, datamodule=data)
    model.val_seen = []
    trainer.test(model, datamodule=data)
    assert model.val_seen == test.indices  # Recorder's test_step records like validation_step
    assert len(calls) == 1 and len(calls[0]) == 50  # the whole dataset, once
    for loader in [*loaders, trainer.test_dataloaders]:
        assert isinstance(loader, TunedDataLoader) and loader.autotune_config is not None


def test_teardown_stops_persistent_workers():
    data = AutotuneDataModule(Indexed(16), val=Indexed(8), batch_size=4, num_workers=1,
                              persistent_workers=True)
    quiet_trainer(max_epochs=1).fit(Recorder(), datamodule=data)
    assert data._loaders["train"].persistent_workers
    assert data._loaders["train"]._iterator is None  # closed: its worker has exited


def test_given_factory_and_keywords_reach_every_loader():
    factory = OptimalDataLoaderFactory(measure=False, seed=1)
    data = AutotuneDataModule(Indexed(16), Indexed(6), batch_size=4, factory=factory,
                              num_workers=0, drop_last=False)
    assert data.factory is factory
    train, val = data.train_dataloader(), data.val_dataloader()
    assert train.num_workers == val.num_workers == 0 and train.drop_last is False
    assert train.generator is not None  # the factory's seed
    assert [b.view(-1).tolist() for b in val] == [[0, 1, 2, 3], [4, 5]]


def test_pickles_with_its_hooks_for_spawned_ranks():
    data = pickle.loads(pickle.dumps(AutotuneDataModule(Indexed(8), test=Indexed(4),
                                                        batch_size=4, num_workers=0)))
    assert [b.view(-1).tolist() for b in data.test_dataloader()] == [[0, 1, 2, 3]]
    assert not pl.utilities.model_helpers.is_overridden("val_dataloader", data)


def test_lightning_recreating_our_loader_with_its_sampler_works():
    """What Lightning does to a loader whose sampler is not a DistributedSampler."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    data = AutotuneDataModule(Indexed(16), Indexed(9), batch_size=4, num_workers=1)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        ours = data.val_dataloader()  # Lightning records the arguments while the hook runs
    sampler = DistributedSampler(ours.dataset, num_replicas=2, rank=1, shuffle=False)
    theirs = _update_dataloader(ours, sampler)
    assert type(theirs) is TunedDataLoader and theirs.sampler is sampler
    assert theirs.num_workers == 1 and theirs.worker_init_fn is ours.worker_init_fn
    with theirs:
        assert [b.view(-1).tolist() for b in theirs] == [[1, 3, 5, 7], [0]]


@pytest.mark.parametrize("keywords, fix", [
    ({"dataset": Indexed(8), "train": Indexed(8)}, "not both"),
    ({}, "no data"),
    ({"train": Indexed(8), "splits": (0.5, 0.5, None)}, "dataset= only"),
    ({"train": Indexed(8), "batch_size": 0}, "batch_size=0"),
    ({"train": Indexed(8), "factory": "fast"}, "factory='fast'"),
    ({"dataset": Indexed(8), "splits": (0.5, 0.7, None)}, "add up to"),
])
def test_bad_arguments_name_the_parameter_and_fix(keywords, fix):
    keywords.setdefault("batch_size", 4)
    with pytest.raises(InvalidConfigError, match=fix):
        AutotuneDataModule(**keywords)


# A real Trainer(strategy="ddp", devices=2): processes, gloo, no mocks.

DDP_CASES = {"workers1-lightning-sampler": ("1", "1"), "workers0-own-sampler": ("0", "0")}


@pytest.fixture(scope="module", params=sorted(DDP_CASES))
def ddp_ranks(request, tmp_path_factory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    return request.param, run_ddp(out, *DDP_CASES[request.param])


def run_ddp(out: Path, *arguments: str) -> list[dict]:
    """Every rank's record of ``lightning_ddp_script.py`` run with these arguments."""
    env = {**os.environ, "AUTOTUNE_PROFILE_DIR": str(out / "profiles"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(HERE / "lightning_ddp_script.py"), str(out), *arguments]
    with subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 too: Lightning started it
            output, _ = proc.communicate()
            pytest.fail(f"DDP run did not finish in 120 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_training_shares_are_disjoint_cover_the_split_and_reshuffle(ddp_ranks):
    case, ranks = ddp_ranks
    train_split = split_dataset(Indexed(SIZE), SPLITS, seed=0)[0].indices
    assert [r["train_split"] for r in ranks] == [train_split] * 2  # same split on both ranks
    assert [r["measured"] for r in ranks] == [["dataset"]] * 2
    for rank in ranks:  # ours kept: Lightning only adds a sampler where none is distributed
        workers = int(DDP_CASES[case][0])
        assert rank["train_loader"] == {"sampler": "EpochDistributedSampler", "kept": True,
                                        "class": "TunedDataLoader", "has_config": True,
                                        "num_workers": workers,
                                        "across": workers > 0}  # Lightning's set_epoch obeyed
    for epoch in range(2):
        zero, one = ranks[0]["train"][epoch], ranks[1]["train"][epoch]
        assert len(zero) == len(one) == len(train_split) // 2
        assert not set(zero) & set(one)
        assert sorted(zero + one) == sorted(train_split)
    for rank in ranks:
        assert rank["train"][0] != rank["train"][1]  # a new order every epoch


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_validation_counts_every_sample_once(ddp_ranks, request):
    case, ranks = ddp_ranks
    if DDP_CASES[case][1] == "1" and not issubclass(ShardSampler, DistributedSampler):
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "Lightning wraps a sampler that is not a DistributedSampler in its own and so "
            "shards autotune's shard again: ShardSampler must subclass DistributedSampler")))
    val_split = split_dataset(Indexed(SIZE), SPLITS, seed=0)[1].indices  # 9: 5 + 4
    for rank in ranks:
        assert rank["val_loader"]["sampler"] == "ShardSampler" and rank["val_loader"]["kept"]
    seen = sorted(ranks[0]["val"] + ranks[1]["val"])  # 2 validation runs
    assert seen == sorted(val_split * 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_keeps_the_chunk_sampler_of_an_hdf5_dataset(tmp_path):
    """Lightning keeps ChunkShuffleSampler (a DistributedSampler): each rank trains on its
    own share of the chunks, every sample once per epoch; validation reads one run each."""
    write = pytest.importorskip("test_hdf5").write
    write(tmp_path / "train_a.h5", 0, 100)
    write(tmp_path / "train_b.h5", 100, 60)
    write(tmp_path / "val.h5", 0, 40)
    ranks = run_ddp(tmp_path, "1", "1", str(tmp_path))
    for rank in ranks:
        assert rank["train_loader"]["sampler"] == "ChunkShuffleSampler"
        assert rank["train_loader"]["across"]
        assert rank["train_loader"]["kept"] and rank["val_loader"]["kept"]
    for epoch in range(2):
        zero, one = ranks[0]["train"][epoch], ranks[1]["train"][epoch]
        assert len(zero) == len(one) == 80  # drop_last: 20 batches of 4 per rank
        assert sorted(zero + one) == list(range(160))
    assert ranks[0]["train"][0] != ranks[0]["train"][1]
    assert ranks[0]["val"] == list(range(20)) * 2 and ranks[1]["val"] == list(range(20, 40)) * 2


def test_adapt_reaches_the_training_loader_only():
    """adapt=True under a Trainer: Lightning iterates the AdaptiveLoader like any iterable;
    validation gets a plain loader (only training re-tunes)."""
    from autotune import AdaptiveLoader

    data = AutotuneDataModule(dataset=Indexed(40), batch_size=4, splits=(0.8, 0.2, None),
                              num_workers=0, adapt=True, adapt_every=2)
    model, trainer = Recorder(), quiet_trainer(max_epochs=2)
    trainer.fit(model, datamodule=data)
    train, _ = split_dataset(Indexed(40), (0.8, 0.2, None), seed=0)[:2]
    assert isinstance(trainer.train_dataloader, AdaptiveLoader)
    assert isinstance(trainer.val_dataloaders, TunedDataLoader)
    assert [sorted(epoch) for epoch in model.train_epochs] == [sorted(train.indices)] * 2
    data.teardown("fit")


# -- mid-epoch resume: Trainer.fit(ckpt_path=) -----------------------------------------------------

# Lightning (>= 2.1) saves ``state_dict()`` of every training loader that has state_dict and
# load_state_dict into the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, on
# ``fit(ckpt_path=)``, calls ``load_state_dict`` on the new loader before its first iter().

NOISY_SIZE, NOISY_BATCH, NOISY_EPOCHS = 40, 4, 3  # 10 batches an epoch (drop_last), 30 in all
EVERY_N_STEPS, CRASH_STEP = 7, 16  # checkpoints after steps 7 (epoch 0) and 14 (epoch 1)


class SimulatedCrashError(Exception):
    """What ``NoisyRecorder`` raises at its crash step: the run stops as a killed job would."""


class NoisyRecorder(pl.LightningModule):
    """Records every batch ``training_step`` gets (a copy) with Lightning's (epoch, batch_idx);
    raises ``SimulatedCrashError`` when the global step reaches ``crash_at``."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.crash_at = crash_at
        self.batches: list[torch.Tensor] = []
        self.where: list[tuple[int, int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.crash_at is not None and self.global_step == self.crash_at:
            raise SimulatedCrashError(f"step {self.global_step}")
        self.batches.append(batch.detach().clone())
        self.where.append((self.current_epoch, batch_idx))
        return self.linear(batch[:, 1:].float()).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def noisy_data(how: str, num_workers: int) -> dict:
    """``fit``'s data keyword: the seeded factory's training loader over ``Noisy``, given as
    ``train_dataloaders=`` or through ``AutotuneDataModule(train=..., factory=...)``."""
    factory = OptimalDataLoaderFactory(measure=False, seed=0)
    if how == "loader":
        return {"train_dataloaders": factory.create_training_loader(
            Noisy(NOISY_SIZE), NOISY_BATCH, num_workers=num_workers)}
    return {"datamodule": AutotuneDataModule(train=Noisy(NOISY_SIZE), batch_size=NOISY_BATCH,
                                             factory=factory, num_workers=num_workers)}


def fit_noisy(model: NoisyRecorder, how: str, num_workers: int, *, callbacks: tuple = (),
              ckpt_path: Path | None = None) -> list[str]:
    """``Trainer.fit`` for ``NOISY_EPOCHS``; returns the warnings it gave."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=NOISY_EPOCHS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, enable_checkpointing=bool(callbacks),
                         callbacks=list(callbacks))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, **noisy_data(how, num_workers), ckpt_path=ckpt_path)
        finally:
            data = trainer.datamodule
            if data is not None:
                data.teardown("fit")
            elif trainer.train_dataloader is not None:
                trainer.train_dataloader.close()
    return [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def noisy_reference(tmp_path_factory) -> NoisyRecorder:
    """The uninterrupted run: every batch of 3 epochs, 2 workers, train_dataloaders=."""
    with pytest.MonkeyPatch.context() as patch:  # conftest's isolation is per test
        patch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
        model = NoisyRecorder()
        fit_noisy(model, "loader", 2)
    assert model.where == [(e, i) for e in range(NOISY_EPOCHS) for i in range(10)]
    epochs = [torch.cat(model.batches[10 * e:10 * e + 10]) for e in range(NOISY_EPOCHS)]
    assert len({tuple(e[:, 0].tolist()) for e in epochs}) == NOISY_EPOCHS  # reshuffled
    assert len(set(epochs[0][:, 1:].flatten().tolist())) > 40  # random draws, not constants
    return model


@pytest.mark.parametrize("how, num_workers", [("loader", 2), ("loader", 0), ("datamodule", 2)],
                         ids=["loader-2w", "loader-0w", "datamodule-2w"])
def test_fit_from_a_mid_epoch_checkpoint_goes_on_with_the_next_batch(how, num_workers, tmp_path,
                                                                     noisy_reference):
    """A run checkpoints every 7 steps (``ModelCheckpoint(every_n_train_steps=7)``) and dies at
    step 16; a new Trainer and a new loader ``fit(ckpt_path=)`` from the step-7 checkpoint (epoch
    0, batch 7) and from the step-14 one (epoch 1, batch 4) each get exactly the uninterrupted
    run's batches from there on: none replayed, none skipped, augmentations bit for bit."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=EVERY_N_STEPS,
                                  save_top_k=-1)
    crashed = NoisyRecorder(crash_at=CRASH_STEP)
    with pytest.raises(SimulatedCrashError):
        fit_noisy(crashed, how, num_workers, callbacks=(checkpoints,))
    assert_same_batches(crashed.batches, noisy_reference.batches[:CRASH_STEP])
    for step in (EVERY_N_STEPS, 2 * EVERY_N_STEPS):
        (path,) = tmp_path.glob(f"*step={step}.ckpt")
        saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]
        assert len(saved.get("combined_loader", [])) == 1, saved  # the loader's state_dict()
        assert "version" in saved["combined_loader"][0], saved
        resumed = NoisyRecorder()
        caught = fit_noisy(resumed, how, num_workers, ckpt_path=path)
        assert not [w for w in caught if "not resumable" in w], caught
        want = noisy_reference.where[step:]
        assert resumed.where == want, f"resumed from step {step}: Lightning's (epoch, batch)"
        assert_same_batches(resumed.batches, noisy_reference.batches[step:],
                            [f"resumed from step {step}: epoch {e} batch {i}" for e, i in want])
