"""``MultiAutotuner`` on real loaders: a group tuned as one loop, stored under one key,
applied by ``create_training_loaders``; the CLI on a target that returns several datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from autotune import (DeviceLoader, GroupConfig, InvalidConfigError, LoaderConfig, MultiAutotuner,
                      OptimalDataLoaderFactory, probe_hardware)
from autotune.tuning.trial import run_group_trial
from autotune.profiles import ProfileEntry, load_profile, save_entry

from datasets import Indexed, Sleepy
from test_tuner import _cli  # the CLI in a subprocess, with tests/ importable

HERE = Path(__file__).parent
WEIGHTS = {"io": 1, "cpu": 1}


def pair():
    return {"io": Sleepy(size=512, seconds=0.002), "cpu": Indexed(512)}


def test_a_pair_tuned_as_one_is_one_entry_the_factory_applies(tmp_path):
    result = MultiAutotuner(pair(), 16, strategy="weighted", weights=WEIGHTS, budget_s=8,
                            max_workers=4).run()
    assert set(result.best.members) == {"io", "cpu"}
    assert [t.phase for t in result.trials[:2]] == ["baseline", "rules"]
    assert all(t.ok and isinstance(t.config, GroupConfig) for t in result.trials)
    assert all(w <= 4 for t in result.trials for w in t.config.workers().values())
    assert result.best_samples_per_s > 0 and result.key == "Sleepy+Indexed"
    assert "chosen: io" in result.table()

    path = result.save(tmp_path)
    raw = yaml.safe_load(path.read_text())
    assert raw["schema_version"] == 2  # a group entry needs a reader that knows members
    entry = load_profile(path).loaders["Sleepy+Indexed"]
    assert entry.settings == {} and set(entry.members) == {"io", "cpu"}
    assert entry.measured["strategy"] == "weighted"
    assert entry.measured["shares"] == {"io": 0.5, "cpu": 0.5}

    factory = OptimalDataLoaderFactory(profile_dir=tmp_path, seed=0)
    multi = factory.create_training_loaders(pair(), 16, strategy="weighted", weights=WEIGHTS,
                                            seed=0)
    try:
        for name, loader in multi.loaders.items():
            config = loader.autotune_config
            assert config.num_workers == result.best.members[name].num_workers
            assert config.source == "profile"
            assert f"loader {name!r} of the group" in config.reasons["num_workers"]
        names = [name for name, _ in zip((n for n, _ in multi), range(6))]
        assert set(names) <= {"io", "cpu"}
    finally:
        multi.close()


def test_a_group_trial_hands_the_consumer_named_batches_and_counts_samples():
    seen = []
    config = GroupConfig(members={"io": LoaderConfig(num_workers=1, prefetch_factor=2,
                                                     persistent_workers=True),
                                  "cpu": LoaderConfig()})
    trial = run_group_trial(pair(), 8, config, strategy="round_robin", weights=None, seed=0,
                            phase="test", window_s=0.5, hang_s=10,
                            consumer=lambda item: seen.append((item[0], len(item[1]))))
    assert trial.ok, trial.error
    assert {name for name, _ in seen} == {"io", "cpu"} and {n for _, n in seen} == {8}
    # samples/s counts samples, not (name, batch) pairs: 8 a batch at most this many batches
    assert trial.samples_per_s >= 8 * 0.5 * len(seen) / (trial.window_s * 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "sequential"}, "one loader at a time"),
    ({"strategy": "zigzag"}, "strategy='zigzag' must be one of"),
    ({"strategy": "weighted", "weights": {"io": 1}}, "must match the loaders"),
    ({"strategy": "round_robin", "budget_s": 0}, "budget_s"),
    ({"strategy": "round_robin", "step_time_s": 0.1, "train_step": print}, "not both"),
    ({"strategy": "round_robin", "max_workers": -1}, "max_workers"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        MultiAutotuner(pair(), 8, **kwargs)


def test_an_empty_dataset_is_named():
    with pytest.raises(InvalidConfigError, match=r"datasets\['cpu'\]: len\(dataset\)=0"):
        MultiAutotuner({"io": Sleepy(), "cpu": Indexed(0)}, 8, strategy="round_robin")


def test_one_dataset_and_torchrun_are_refused(monkeypatch):
    with pytest.raises(InvalidConfigError, match=r"tune it with autotune\.Autotuner"):
        MultiAutotuner({"io": Sleepy()}, 8, strategy="round_robin")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # a whole torchrun environment (half of one is not read)
    with pytest.raises(InvalidConfigError, match="without torchrun"):
        MultiAutotuner(pair(), 8, strategy="round_robin")


def _entry(members, strategy="weighted"):
    return ProfileEntry(members={name: {"num_workers": w} for name, w in members.items()},
                        measured={"samples_per_s": 100.0, "strategy": strategy,
                                  "shares": {name: 0.5 for name in members}})


def test_an_entry_for_other_loaders_or_one_loader_is_not_applied(tmp_path):
    hw = probe_hardware()
    save_entry(hw, "other", _entry({"a": 3, "b": 1}), tmp_path)
    save_entry(hw, "single", ProfileEntry(settings={"num_workers": 3}), tmp_path)
    factory = OptimalDataLoaderFactory(profile_dir=tmp_path, measure=False)
    for key, words in (("other", "was tuned for loaders ['a', 'b']"),
                       ("single", "holds one loader's settings")):
        with pytest.warns(UserWarning, match=words.replace("[", r"\[")):
            multi = factory.create_training_loaders(pair(), 8, strategy="weighted",
                                                    weights=WEIGHTS, profile_key=key)
        assert {loader.autotune_config.source for loader in multi.loaders.values()} == {"rules"}
        multi.close()


def test_an_entry_tuned_for_another_mix_applies_with_a_warning(tmp_path):
    save_entry(probe_hardware(), "mix", _entry({"io": 3, "cpu": 1}), tmp_path)
    factory = OptimalDataLoaderFactory(profile_dir=tmp_path, measure=False)
    with pytest.warns(UserWarning, match="tuned with strategy='weighted'"):
        multi = factory.create_training_loaders(pair(), 8, strategy="round_robin",
                                                profile_key="mix")
    assert {n: loader.num_workers for n, loader in multi.loaders.items()} == {"io": 3, "cpu": 1}
    multi.close()
    with pytest.warns(UserWarning, match="runs one at a time"):
        multi = factory.create_training_loaders(pair(), 8, profile_key="mix")
    assert {loader.autotune_config.source for loader in multi.loaders.values()} == {"rules"}
    multi.close()


def test_cli_tunes_a_mapping_as_one_loop_and_show_lists_it(tmp_path):
    result = _cli("tune", str(HERE / "datasets.py") + ":make_pair", "--batch-size", "16",
                  "--strategy", "weighted", "--weights", "io=1,cpu=1", "--budget-s", "6",
                  "--max-workers", "2", "--profile-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["key"] == "Sleepy+Busy" and set(data["best"]) == {"io", "cpu"}
    assert data["strategy"] == "weighted" and data["trials"]
    assert set(load_profile(data["profile"]).loaders["Sleepy+Busy"].members) == {"io", "cpu"}
    shown = _cli("show", "--profile-dir", str(tmp_path), cwd=tmp_path)
    assert "Sleepy+Busy: a group of 2 loaders" in shown.stdout and "    io: " in shown.stdout


@pytest.mark.parametrize("target, args, code, words", [
    ("make_pair", (), 1, "pass --strategy"),
    ("make_small", ("--strategy", "weighted"), 1, "are for several datasets"),
    ("make_pair", ("--strategy", "weighted", "--weights", "io:1"), 2, "NAME=WEIGHT"),
    ("make_pair", ("--strategy", "weighted", "--weights", "io=1"), 1, "must match"),
])
def test_cli_group_mistakes_are_one_line(target, args, code, words, tmp_path):
    result = _cli("tune", f"{HERE / 'datasets.py'}:{target}", "--batch-size", "8", *args,
                  "--profile-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == code and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.yaml"))  # nothing written


def test_device_wraps_each_loader_and_adapt_is_refused():
    factory = OptimalDataLoaderFactory(measure=False, seed=0)
    multi = factory.create_training_loaders(pair(), 8, strategy="round_robin", device="cpu",
                                            num_workers=0)
    try:
        assert all(isinstance(loader, DeviceLoader) for loader in multi.loaders.values())
        (name, batch), _ = next(iter(multi)), None
        assert name == "io" and batch.shape[0] == 8 and batch.device.type == "cpu"
    finally:
        multi.close()
    with pytest.raises(InvalidConfigError, match="adapt= is not supported"):
        factory.create_training_loaders(pair(), 8, strategy="round_robin", adapt=True)
    with pytest.raises(InvalidConfigError, match="device="):
        factory.create_training_loaders(pair(), 8, strategy="round_robin", device=3)
