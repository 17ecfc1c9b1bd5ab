"""The public names in DESIGN.md are a contract."""

from __future__ import annotations

import types

import autotune

DESIGN_NAMES = {"probe_hardware", "measure_workload", "OptimalDataLoaderFactory",
                "LoaderConfig", "AutotuneError", "InvalidConfigError", "ProfileError",
                "HDF5Dataset", "ChunkShuffleSampler"}


def test_all_is_sorted_and_complete():
    assert autotune.__all__ == sorted(autotune.__all__)
    public = {name for name in dir(autotune) if not name.startswith("_")}
    modules = {name for name in public if isinstance(getattr(autotune, name), types.ModuleType)}
    assert set(autotune.__all__) == public - modules


def test_design_names_exist():
    assert DESIGN_NAMES <= set(autotune.__all__)


def test_every_error_is_an_autotune_error():
    for name in ("InvalidConfigError", "ProfileError", "DatasetError", "WorkerCrashError",
                 "WorkerSafetyError", "DataFileError"):
        assert issubclass(getattr(autotune, name), autotune.AutotuneError)
    assert issubclass(autotune.InvalidConfigError, ValueError)
    assert issubclass(autotune.WorkerCrashError, RuntimeError)  # as torch's own error is
