"""autotune: hardware-aware settings and an autotuner for PyTorch DataLoaders.

    hw = autotune.probe_hardware()
    factory = autotune.OptimalDataLoaderFactory()
    loader = factory.create_training_loader(dataset, batch_size=64)
    print(loader.autotune_config.explain())
"""

from .config import LoaderConfig
from .datasets import AugmentedDataset, StandardizedDataset, compute_stats
from .errors import (AutotuneError, DatasetError, InvalidConfigError, ProfileError,
                     WorkerCrashError, WorkerSafetyError)
from .factory import OptimalDataLoaderFactory, TunedDataLoader
from .hardware import (CpuInfo, DistributedInfo, GpuInfo, HardwareInfo, HostInfo, MemoryInfo,
                       probe_hardware)
from .rules import DatasetHints
from .safety import check_worker_safety, copy_on_read_risks
from .trial import Trial
from .tuner import Autotuner, TuningResult
from .workload import WorkloadProfile, measure_workload

__version__ = "0.1.0"

__all__ = [
    "AugmentedDataset",
    "AutotuneError",
    "Autotuner",
    "CpuInfo",
    "DatasetError",
    "DatasetHints",
    "DistributedInfo",
    "GpuInfo",
    "HardwareInfo",
    "HostInfo",
    "InvalidConfigError",
    "LoaderConfig",
    "MemoryInfo",
    "OptimalDataLoaderFactory",
    "ProfileError",
    "StandardizedDataset",
    "Trial",
    "TunedDataLoader",
    "TuningResult",
    "WorkerCrashError",
    "WorkerSafetyError",
    "WorkloadProfile",
    "check_worker_safety",
    "compute_stats",
    "copy_on_read_risks",
    "measure_workload",
    "probe_hardware",
]
