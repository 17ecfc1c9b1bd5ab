"""Property-based: arbitrary arguments to the CLI and the Python API end in success or one of
autotune's own errors (``AutotuneError``), never another exception, a traceback or a hang."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune import (AutotuneError, Autotuner, LoaderConfig, OptimalDataLoaderFactory,
                      measure_workload)
from autotune.cli import main

from datasets import Indexed

QUICK = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])

NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e-12, 1e300, float("nan"), float("inf"), -0.0]))
VALUES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=6),
                   st.sampled_from(["fork", "spawn", "forkserver", "thread", "cuda:0", "cpu",
                                    "meta"]))
TOKENS = st.one_of(
    st.sampled_from(["probe", "recommend", "show", "tune", "--json", "--save", "--profile-dir",
                     "--dataset-size", "--batch-size", "--augmentation", "--standardization",
                     "--validation", "--budget-s", "--key", "--step-time-s", "--max-workers",
                     "--hang-timeout-s", "--plot", "--help", "nocolon", "no_such_mod:f",
                     "datasets:Indexed", "datasets:missing", "x.py:f", "", "-", "--", "a\x00b",
                     "/proc/x", "/dev/null"]),
    NUMBERS.map(str), st.text(max_size=10))


@QUICK
@given(argv=st.lists(TOKENS, max_size=8))
def test_cli_any_argv_is_an_exit_code(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code in (0, 1, 2)
    assert "Traceback" not in err.getvalue()
    if code == 1:
        assert err.getvalue().startswith("autotune: error: ")
        assert err.getvalue().count("\n") == 1  # one line


LOADER_KEYWORDS = ("num_workers", "prefetch_factor", "pin_memory", "persistent_workers",
                   "multiprocessing_context", "worker_threads", "in_order", "drop_last",
                   "timeout", "has_augmentation", "has_standardization", "profile_key",
                   "shuffle", "workload", "adapt", "adapt_every", "device")


@QUICK
@given(batch_size=VALUES, size=st.integers(min_value=0, max_value=300),
       kwargs=st.dictionaries(st.sampled_from(LOADER_KEYWORDS), VALUES, max_size=5),
       training=st.booleans())
def test_factory_any_arguments_build_a_loader_or_raise_ours(batch_size, size, kwargs, training):
    factory = OptimalDataLoaderFactory(measure=False)
    create = factory.create_training_loader if training else factory.create_validation_loader
    try:
        loader = create(Indexed(size), batch_size, **kwargs)
    except AutotuneError:
        return
    with loader:
        assert loader.batch_size == batch_size
        if loader.num_workers == 0:  # cheap enough to check it really loads
            assert sum(len(b) for b in loader) <= size


@QUICK
@given(size=VALUES, augmentation=VALUES, standardization=VALUES, batch_size=VALUES,
       training=VALUES)
def test_get_optimal_config_any_arguments(size, augmentation, standardization, batch_size,
                                          training):
    factory = OptimalDataLoaderFactory(measure=False)
    try:
        config = factory.get_optimal_config(size, augmentation, standardization,
                                            batch_size=batch_size, training=training)
    except AutotuneError:
        return
    assert isinstance(config, LoaderConfig)
    assert config.dataloader_kwargs()["num_workers"] >= 0


@QUICK
@given(kwargs=st.dictionaries(st.sampled_from(
    ["batch_size", "budget_s", "step_time_s", "max_workers", "hang_timeout_s", "key",
     "progress"]), VALUES, max_size=4))
def test_autotuner_any_arguments_are_checked(kwargs):
    kwargs.setdefault("batch_size", 4)
    try:
        tuner = Autotuner(Indexed(16), **kwargs)
    except AutotuneError:
        return
    assert tuner.budget_s > 0 and math.isfinite(tuner.budget_s)


@QUICK
@given(samples=VALUES, max_seconds=VALUES)
def test_measure_workload_any_arguments(samples, max_seconds):
    try:
        profile = measure_workload(Indexed(8), samples, max_seconds=max_seconds)
    except AutotuneError:
        return
    assert profile.samples >= 1 and profile.sec_per_sample > 0


@QUICK
@given(settings_=st.dictionaries(st.sampled_from(
    ["num_workers", "prefetch_factor", "pin_memory", "persistent_workers",
     "multiprocessing_context", "worker_threads", "in_order", "drop_last", "timeout"]),
    VALUES, max_size=4))
def test_loader_config_any_values(settings_):
    try:
        config = LoaderConfig(**settings_)
    except AutotuneError:
        return
    assert LoaderConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("argv", [["probe", "--save", "--profile-dir", "a\x00b"],
                                  ["show", "--profile-dir", "a\x00b"]])
def test_cli_nul_in_a_path_is_one_line(argv, capsys):
    assert main(argv) == 1
    assert capsys.readouterr().err.count("\n") == 1


SPLITS = st.one_of(VALUES, st.lists(st.one_of(st.none(), NUMBERS, st.booleans()), max_size=4))


@QUICK
@given(size=st.integers(min_value=0, max_value=200), splits=SPLITS, seed=VALUES,
       batch_size=VALUES)
def test_create_dataloaders_any_splits_split_or_raise_ours(size, splits, seed, batch_size):
    factory = OptimalDataLoaderFactory(measure=False)
    try:
        loaders = factory.create_dataloaders(Indexed(size), batch_size, splits=splits,
                                             seed=seed, num_workers=0)
    except AutotuneError:
        return
    parts = [list(loader.dataset.dataset.indices) for loader in loaders if loader is not None]
    every = sum(parts, [])
    assert len(every) == len(set(every)) <= size  # disjoint
    if math.isclose(sum(float(f or 0) for f in splits), 1.0):
        assert sorted(every) == list(range(size))  # and covering when the fractions are whole
