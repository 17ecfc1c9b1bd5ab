"""autotune: hardware-aware settings and an autotuner for PyTorch DataLoaders.

    hw = autotune.probe_hardware()
    factory = autotune.OptimalDataLoaderFactory()
    loader = factory.create_training_loader(dataset, batch_size=64)
    print(loader.autotune_config.explain())
"""

from .config import GroupConfig, LoaderConfig
from .errors import (AutotuneError, DataFileError, DatasetError, InvalidConfigError,
                     ProfileError, WorkerCrashError, WorkerSafetyError)
from .factory.factory import OptimalDataLoaderFactory
from .feed.adaptive import AdaptiveLoader
from .feed.device import DeviceLoader
from .feed.monitor import StallMonitor, StallReport
from .feed.multi import MultiLoader
from .loading.builder import TunedDataLoader
from .loading.safety import check_worker_safety, copy_on_read_risks
from .measure.workload import measure_workload
from .policy.rules import DatasetHints
from .records import (CpuInfo, DistributedInfo, GpuInfo, HardwareInfo, HostInfo, MemoryInfo, Trial,
                      WorkloadProfile)
from .sources.chunk_sampler import ChunkShuffleSampler
from .sources.datasets import AugmentedDataset, StandardizedDataset, compute_stats
from .sources.hdf5 import HDF5Dataset
from .sources.images import ImageFolder
from .sources.sharding import ShardedIterable, shard_iterable
from .system.hardware import probe_hardware
from .tuning.group import MultiAutotuner
from .tuning.result import MultiTuningResult, TuningResult
from .tuning.tuner import Autotuner

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
    "ImageFolder",
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
