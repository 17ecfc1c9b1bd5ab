"""autotune: hardware-aware settings and an autotuner for PyTorch DataLoaders.

    hw = autotune.probe_hardware()
    factory = autotune.OptimalDataLoaderFactory()
    loader = factory.create_training_loader(dataset, batch_size=64)
    print(loader.autotune_config.explain())
"""

from .config import GroupConfig, LoaderConfig
from .loading.datasets import AugmentedDataset, StandardizedDataset, compute_stats
from .errors import (AutotuneError, DataFileError, DatasetError, InvalidConfigError,
                     ProfileError, WorkerCrashError, WorkerSafetyError)
from .loading.builder import TunedDataLoader
from .loading.device import DeviceLoader
from .loading.factory import OptimalDataLoaderFactory
from .loading.multi import MultiLoader
from .sources.chunk_sampler import ChunkShuffleSampler
from .sources.hdf5 import HDF5Dataset
from .sources.sharding import ShardedIterable, shard_iterable
from .system.hardware import (CpuInfo, DistributedInfo, GpuInfo, HardwareInfo, HostInfo, MemoryInfo,
                       probe_hardware)
from .policy.rules import DatasetHints
from .loading.safety import check_worker_safety, copy_on_read_risks
from .measure.trial import Trial
from .tuning.result import MultiTuningResult, TuningResult
from .tuning.adapt import AdaptiveLoader
from .tuning.group import MultiAutotuner
from .tuning.tuner import Autotuner
from .measure.workload import WorkloadProfile, measure_workload
from .monitor import StallMonitor, StallReport

create_dataloaders = OptimalDataLoaderFactory.create_dataloaders  # on the default factory

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLoader",
    "AugmentedDataset",
    "AutotuneError",
    "Autotuner",
    "ChunkShuffleSampler",
    "CpuInfo",
    "DataFileError",
    "DatasetError",
    "DatasetHints",
    "DeviceLoader",
    "DistributedInfo",
    "GpuInfo",
    "GroupConfig",
    "HDF5Dataset",
    "HardwareInfo",
    "HostInfo",
    "InvalidConfigError",
    "LoaderConfig",
    "MemoryInfo",
    "MultiAutotuner",
    "MultiLoader",
    "MultiTuningResult",
    "OptimalDataLoaderFactory",
    "ProfileError",
    "ShardedIterable",
    "StallMonitor",
    "StallReport",
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
    "create_dataloaders",
    "measure_workload",
    "probe_hardware",
    "shard_iterable",
]
