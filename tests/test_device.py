"""The device feed: batches pass through on the CPU, every tensor in a nested batch reaches the
device with the structure kept, each pass delivers every batch once, and the lifecycle holds."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections import OrderedDict, defaultdict, namedtuple
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from autotune.errors import InvalidConfigError
from autotune.feed.device import DeviceLoader, move_to

META = torch.device("meta")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
Pair = namedtuple("Pair", "tensor label")


@dataclasses.dataclass
class Sample:
    tensor: torch.Tensor
    name: str


@dataclasses.dataclass(frozen=True)
class Frozen:
    tensor: torch.Tensor
    derived: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "derived", self.tensor * 2)


class Custom:
    """A batch class that moves itself, the way many libraries' batch objects do."""

    def __init__(self, tensor: torch.Tensor, *, moved_with: Any = None) -> None:
        self.tensor, self.moved_with = tensor, moved_with

    def to(self, device: Any, non_blocking: bool = False) -> Custom:
        return Custom(self.tensor.to(device, non_blocking=non_blocking), moved_with=non_blocking)


class OldCustom(Custom):
    def to(self, device: Any) -> OldCustom:  # type: ignore[override]  # no non_blocking
        return OldCustom(self.tensor.to(device), moved_with="plain")


class Numbers(Dataset):
    """Sample i is i: the batch's indices say which samples arrived."""

    def __init__(self, size: int = 40) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def nested(indices: list[int]) -> dict[str, Any]:
    """A batch holding every structure the device feed walks (a module-level collate_fn)."""
    x = torch.tensor(indices, dtype=torch.float32)
    return {
        "indices": list(indices), "x": x, "list": [x, "text", 3], "tuple": (x, None),
        "pair": Pair(x, "label"), "sample": Sample(x, "name"), "frozen": Frozen(x),
        "ordered": OrderedDict([("b", x), ("a", 1)]), "default": defaultdict(list, {"k": [x]}),
        "custom": Custom(x), "old": OldCustom(x), "array": np.arange(3),
    }


def assert_moved(host: Any, moved: Any, device: torch.device) -> None:
    """The contract: same structure and types, tensors on ``device`` with the same shape and
    dtype (and values, unless ``device`` is meta), everything else equal."""
    assert type(moved) is type(host)
    if isinstance(host, torch.Tensor):
        assert moved.device.type == device.type
        assert (moved.shape, moved.dtype) == (host.shape, host.dtype)
        if device.type != "meta":
            assert torch.equal(moved.cpu(), host.cpu())
    elif isinstance(host, dict):
        assert list(moved) == list(host)
        if isinstance(host, defaultdict):
            assert moved.default_factory is host.default_factory
        for key in host:
            assert_moved(host[key], moved[key], device)
    elif isinstance(host, (list, tuple)):
        assert len(moved) == len(host)
        for a, b in zip(host, moved):
            assert_moved(a, b, device)
    elif dataclasses.is_dataclass(host):
        for field in dataclasses.fields(host):
            assert_moved(getattr(host, field.name), getattr(moved, field.name), device)
    elif isinstance(host, Custom):
        assert_moved(host.tensor, moved.tensor, device)
    elif isinstance(host, np.ndarray):
        assert np.array_equal(moved, host)
    else:
        assert moved == host


def loader(num_workers: int, **kwargs: Any) -> DataLoader:
    return DataLoader(Numbers(), batch_size=4, num_workers=num_workers, **kwargs)


# -- the CPU: the loader's own objects ----------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_cpu_passes_the_loaders_batches_through(num_workers):
    class Recording(DataLoader):
        def __iter__(self):
            self.yielded = []
            for batch in super().__iter__():
                self.yielded.append(batch)
                yield batch

    source = Recording(Numbers(), batch_size=4, num_workers=num_workers)
    for device in ("cpu", torch.device("cpu")):
        got = list(DeviceLoader(source, device))
        assert len(got) == len(source.yielded) == 10
        assert all(a is b for a, b in zip(got, source.yielded))


def test_len_and_attributes_are_the_loaders():
    source = loader(0)
    feed = DeviceLoader(source, "cpu")
    assert len(feed) == 10
    assert feed.dataset is source.dataset and feed.batch_size == 4
    assert feed.loader is source and feed.device == torch.device("cpu")
    with pytest.raises(AttributeError):
        _ = feed.no_such_attribute
    with pytest.raises(TypeError):
        len(DeviceLoader(iter([1, 2]), "cpu"))
    assert repr(feed) == "DeviceLoader(DataLoader, device='cpu')"


def test_half_built_and_copied_loaders_do_not_recurse():
    with pytest.raises(AttributeError):
        _ = DeviceLoader.__new__(DeviceLoader).dataset
    feed = DeviceLoader([torch.zeros(2)], "meta", non_blocking=False)
    iter(feed)  # a pass in progress is not part of the copy
    for twin in (copy.deepcopy(feed), pickle.loads(pickle.dumps(feed))):
        assert (twin.device, twin.non_blocking) == (META, False)
        assert [batch.device for batch in twin] == [META]


# -- moving nested batches (meta: a real device without an accelerator) ------------------------

def test_move_to_moves_every_tensor_and_keeps_the_rest():
    host = nested([0, 1, 2])
    moved = move_to(host, "meta", non_blocking=True)
    assert_moved(host, moved, META)
    assert moved["list"][1] is host["list"][1] and moved["array"] is host["array"]
    assert moved["custom"].moved_with is True and moved["old"].moved_with == "plain"
    assert moved["frozen"].derived.device == META  # an init=False field, not recomputed
    assert host["x"].device.type == "cpu"  # the host batch is not changed


@pytest.mark.parametrize("value", [None, "text", 3, 2.5, b"raw", np.ones(2)])
def test_move_to_returns_other_values_as_they_are(value):
    assert move_to(value, "meta") is value


class ReadOnly(Mapping):
    """A mapping whose constructor cannot take the moved items."""

    def __init__(self, *, items: dict) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_move_to_keeps_mapping_state_or_falls_back_to_dict():
    class Tagged(dict):
        def __init__(self, *, tag: str) -> None:
            super().__init__(x=torch.zeros(1))
            self.tag = tag

    moved = move_to(Tagged(tag="t"), "meta")
    assert type(moved) is Tagged and moved.tag == "t" and moved["x"].device == META
    moved = move_to(MappingProxyType({"x": torch.zeros(1)}), "meta")
    assert type(moved) is MappingProxyType and moved["x"].device == META
    moved = move_to(ReadOnly(items={"x": torch.zeros(1), "y": 1}), "meta")
    assert type(moved) is dict and moved["x"].device == META and moved["y"] == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_batch_arrives_once_in_order_on_the_device(num_workers):
    feed = DeviceLoader(loader(num_workers, collate_fn=nested), "meta")
    for _ in range(2):  # two epochs
        batches = list(feed)
        for batch in batches:
            assert_moved(nested(batch["indices"]), batch, META)
        assert [i for batch in batches for i in batch["indices"]] == list(range(40))


# -- passes and the lifecycle ------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_pass_left_early_does_not_disturb_the_next(device):
    feed = DeviceLoader(loader(2, collate_fn=nested), device)
    for seen, _ in enumerate(feed):
        if seen == 2:
            break
    batches = list(feed)
    assert [i for batch in batches for i in batch["indices"]] == list(range(40))
    assert {batch["x"].device.type for batch in batches} == {device}


class Closable:
    """A loader that counts its close() calls."""

    def __init__(self) -> None:
        self.closed = 0

    def __iter__(self):
        return iter([torch.zeros(2), torch.ones(2)])

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_close_ends_passes_and_closes_the_loader_once(device):
    source = Closable()
    feed = DeviceLoader(source, device)
    batches = iter(feed)
    next(batches)
    feed.close()
    feed.close()
    assert source.closed == 1
    assert list(batches) == []  # the pass in progress ended, its batch dropped
    assert len(list(feed)) == 2  # a new pass after close works ...
    feed.close()
    assert source.closed == 2  # ... and is closed again


def test_context_manager_closes():
    source = Closable()
    with DeviceLoader(source, "meta") as feed:
        assert len(list(feed)) == 2
        assert source.closed == 0
    assert source.closed == 1
    DeviceLoader([1], "cpu").close()  # a loader without close() is fine


class FailsAfter:
    """Two batches, then the loader raises."""

    def __iter__(self):
        yield torch.zeros(2)
        yield torch.ones(2)
        raise OSError("disk gone")


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=[gpu, needs_cuda])])
def test_batches_before_a_loader_error_are_delivered_first(device):
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for batch in DeviceLoader(FailsAfter(), device):
            got.append(batch.to("cpu") if device != "meta" else batch)
    assert len(got) == 2
    if device != "meta":
        assert torch.cat(got).tolist() == [0.0, 0.0, 1.0, 1.0]


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "named"), [
    ({"device": 5}, "device=5"),
    ({"device": None}, "device=None"),
    ({"device": "nonsense"}, "device='nonsense'"),
    ({"device": "cpu", "non_blocking": "yes"}, "non_blocking='yes'"),
    ({"device": "cpu", "non_blocking": 1}, "non_blocking=1"),
])
def test_bad_arguments_name_the_parameter(kwargs, named):
    with pytest.raises(InvalidConfigError, match=named):
        DeviceLoader([], **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_cuda_says_so(device):
    with pytest.raises(InvalidConfigError, match=r"device=.*cuda.*is_available\(\) is False"):
        DeviceLoader([], device)


# -- CUDA ---------------------------------------------------------------------------------------



@gpu
@needs_cuda
@pytest.mark.parametrize("non_blocking", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("pin", [True, False])
def test_cuda_batches_equal_the_host_batches(pin, num_workers, non_blocking):
    feed = DeviceLoader(loader(num_workers, collate_fn=nested, pin_memory=pin), "cuda",
                        non_blocking=non_blocking)
    for _ in range(2):  # two epochs
        batches = list(feed)
        for batch in batches:
            assert_moved(nested(batch["indices"]), batch, torch.device("cuda"))
        assert [i for batch in batches for i in batch["indices"]] == list(range(40))


class Large(Dataset):
    """Sample i is a large tensor full of i: a copy that lags behind the step shows."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((1 << 18,), float(index))


@gpu
@needs_cuda
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cuda_steps_that_write_their_batch_do_not_touch_the_next(num_workers):
    source = DataLoader(Large(), batch_size=2, num_workers=num_workers, pin_memory=True)
    feed = DeviceLoader(source, "cuda:0")
    for _ in range(2):  # two epochs
        checks = []  # kept on the GPU: a host sync per step would hide a missing stream wait
        for step, batch in enumerate(feed):
            assert batch.is_cuda
            expected = torch.arange(2 * step, 2 * step + 2, device="cuda",
                                    dtype=torch.float32)[:, None]
            checks.append((batch == expected).all())  # read at once: the copy must be done
            torch.cuda._sleep(1_000_000)  # a slow step: the next copies are issued meanwhile
            checks.append((batch == expected).all())  # its memory must not be reused yet
            batch.mul_(-1).add_(1000)  # the step writes its batch in place
            del batch
        assert len(checks) == 24 and torch.stack(checks).all().item()


def test_factory_wraps_its_loaders_for_a_device(tmp_path) -> None:
    from autotune import AdaptiveLoader, OptimalDataLoaderFactory, TunedDataLoader
    from datasets import Indexed
    from fakes import fake_hardware

    factory = OptimalDataLoaderFactory(hardware=fake_hardware(), profile_dir=tmp_path,
                                       measure=False)
    train = factory.create_training_loader(Indexed(16), 4, device="meta", num_workers=0)
    assert isinstance(train, DeviceLoader) and isinstance(train.loader, TunedDataLoader)
    assert [b.device.type for b in train] == ["meta"] * 4
    assert train.autotune_config.pin_memory is False  # meta is not CUDA: pinning would cost
    val = factory.create_validation_loader(Indexed(16), 4, device=torch.device("cpu"))
    assert isinstance(val, DeviceLoader) and len(val) == 4
    adaptive = factory.create_training_loader(Indexed(16), 4, device="cpu", adapt=True)
    assert isinstance(adaptive.loader, AdaptiveLoader)
    with pytest.raises(InvalidConfigError, match="device=7"):
        factory.create_training_loader(Indexed(16), 4, device=7)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cuda_transform_runs_on_each_batch_in_order_ahead_of_the_step(num_workers):
    # the transform writes a new tensor on the side stream; the step's stream must see it done
    source = DataLoader(Large(), batch_size=2, num_workers=num_workers, pin_memory=True)
    feed = DeviceLoader(source, "cuda", transform=lambda batch: batch * 2 + 1)
    checks = []
    for step, batch in enumerate(feed):
        expected = torch.arange(2 * step, 2 * step + 2, device="cuda",
                                dtype=torch.float32)[:, None] * 2 + 1
        checks.append((batch == expected).all())
        torch.cuda._sleep(1_000_000)  # a slow step: the next transform is queued meanwhile
        checks.append((batch == expected).all())
        batch.zero_()
        del batch
    assert len(checks) == 24 and torch.stack(checks).all().item()


@gpu
@needs_cuda
def test_cuda_image_folder_device_placement_makes_the_cpu_samples(tmp_path):
    from PIL import Image

    from autotune import ImageFolder
    from autotune.sources._jpeg import decoder_for

    if decoder_for(torch.device("cuda")) is None:
        pytest.skip("no CUDA JPEG decoder installed (torchcodec or torchvision)")
    (tmp_path / "a").mkdir()
    y, x = np.mgrid[0:360, 0:480]
    for i in range(8):
        pixels = np.stack([(x + 20 * i) % 256, (y + 10 * i) % 256, (x + y) // 4 % 256], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "a" / f"{i}.jpg", quality=95)
    cpu, device = ImageFolder(tmp_path), ImageFolder(tmp_path, placement="device")
    torch.manual_seed(0)
    on_cpu = torch.stack([cpu[i][0] for i in range(8)])
    torch.manual_seed(0)
    batch = device.collate([device[i] for i in range(8)])
    feed = DeviceLoader([batch], "cuda", transform=device.device_transform("cuda"))
    (images, _targets), = list(feed)
    assert images.is_cuda and images.shape == on_cpu.shape and images.dtype == on_cpu.dtype
    assert (images.cpu() - on_cpu).abs().mean().item() < 0.05  # decoders differ slightly


@gpu
@needs_cuda
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cuda_image_folder_cpu_placement_ships_uint8_and_arrives_normalised(tmp_path,
                                                                            num_workers):
    """The CPU placement on a CUDA loader: uint8 crosses the bus, the device normalises; the
    batches are the samples the folder gives alone (within float rounding)."""
    from PIL import Image

    import autotune
    from autotune import ImageFolder

    (tmp_path / "a").mkdir()
    y, x = np.mgrid[0:360, 0:480]
    for i in range(8):
        pixels = np.stack([(x + 20 * i) % 256, (y + 10 * i) % 256, (x + y) // 4 % 256], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "a" / f"{i}.jpg", quality=95)
    ds = ImageFolder(tmp_path, train=False, placement="cpu")
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    loader = factory.create_validation_loader(ds, 4, device="cuda", num_workers=num_workers)
    try:
        assert "normalised on cuda" in loader.autotune_config.explain()
        crossing = [x.dtype for x, _y in loader.loader]
        batches = list(loader)
    finally:
        loader.close()
    assert crossing == [torch.uint8, torch.uint8]
    expected = torch.stack([ds[i][0] for i in range(8)])
    got = torch.cat([x for x, _y in batches])
    assert got.is_cuda and got.dtype == torch.float32
    assert torch.allclose(got.cpu(), expected, atol=1e-5)


@gpu
@needs_cuda
def test_cuda_placement_times_the_decoder_under_a_busy_step(tmp_path):
    from PIL import Image

    from autotune import ImageFolder
    from autotune.factory.placing import _measured
    from autotune.sources._jpeg import decoder_for

    if decoder_for(torch.device("cuda")) is None:
        pytest.skip("no CUDA JPEG decoder installed (torchcodec or torchvision)")
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(
            tmp_path / "a" / f"{i}.jpg", quality=90)
    placement = _measured(ImageFolder(tmp_path), torch.device("cuda"), 16)
    assert placement.device_rate is not None and 0 < placement.device_rate < float("inf")
    assert "device decoder" in placement.reason


@gpu
@needs_cuda
def test_cuda_image_folder_measured_and_moved_while_training_keeps_every_sample(tmp_path):
    from PIL import Image

    from autotune import ImageFolder, OptimalDataLoaderFactory
    from autotune.sources._jpeg import decoder_for

    if decoder_for(torch.device("cuda")) is None:
        pytest.skip("no CUDA JPEG decoder installed (torchcodec or torchvision)")
    y, x = np.mgrid[0:240, 0:320]
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(12):
            pixels = np.stack([(x + 20 * i) % 256, (y + 10 * c) % 256, (x + y) // 4 % 256], -1)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f"c{c}" / f"{i}.jpg")
    folder = ImageFolder(tmp_path, size=64)
    loader = OptimalDataLoaderFactory(measure=False, seed=0).create_training_loader(
        folder, 4, device="cuda", adapt=True, adapt_every=2, num_workers=1)
    assert "device decoder" in loader.autotune_config.reasons["placement"]  # it was measured
    for _epoch in range(5):
        targets = []
        for images, labels in loader:
            assert images.is_cuda and images.dtype == torch.float32
            assert images.shape == (4, 3, 64, 64)
            torch.cuda._sleep(2_000_000)  # a GPU step of a few ms
            targets += labels.tolist()
        assert sorted(targets) == sorted(folder.targets)
    loader.close()
    moves = [c for c in loader.loader.changes if c.placement]
    assert all("measured while training" in c.reason or "gave no gain" in c.reason
               for c in moves)


@needs_cuda
@gpu
@pytest.mark.parametrize("stop", [1, 5, 9])
def test_a_cuda_device_loaders_state_does_not_count_the_batch_copying_ahead(stop):
    """On CUDA the next batch is already taken from the loader when one is yielded: the
    state counts what the loop received, so a resume replays nothing and skips nothing."""
    import autotune

    def make() -> Any:
        factory = autotune.OptimalDataLoaderFactory(measure=False, seed=0)
        return factory.create_training_loader(torch.arange(40.0).view(40, 1), 4,
                                              num_workers=2, device="cuda")

    with make() as loader:
        reference = [batch.cpu() for batch in loader]
    with make() as loader:
        taken = []
        for batch in loader:
            taken.append(batch.cpu())
            if len(taken) == stop:
                state = loader.state_dict()
                break
    with make() as resumed:
        resumed.load_state_dict(state)
        rest = [batch.cpu() for batch in resumed]
    assert [b.tolist() for b in taken + rest] == [b.tolist() for b in reference]


class Failing(Dataset):
    """Indices as tensors; ``bad`` raises."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise ValueError(f"sample {i} is broken")
        return torch.tensor(i)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_transform_runs_on_its_own_thread_one_batch_ahead_in_order(num_workers):
    import threading
    import time

    loop = threading.get_ident()
    threads, made = set(), []

    def transform(batch):
        threads.add(threading.get_ident())
        made.append(int(batch[0]))
        return batch * 10

    loader = DataLoader(torch.arange(12), batch_size=2, num_workers=num_workers)
    feed = DeviceLoader(loader, "cpu", transform=transform)
    for n, batch in enumerate(feed):
        time.sleep(0.05)  # room for the thread to run ahead, if it would
        assert batch.tolist() == [20 * n, 20 * n + 10]
        assert len(made) <= n + 2  # this batch and the next one, no more
    assert made == [0, 2, 4, 6, 8, 10] and loop not in threads and len(threads) == 1


@pytest.mark.parametrize("where", ["loader", "transform"])
def test_an_error_reaches_the_loop_after_the_batches_before_it(where):
    def transform(batch):
        if where == "transform" and int(batch[0]) == 3:
            raise RuntimeError("transform failed on batch 3")
        return batch

    loader = DataLoader(Failing(6, bad=3 if where == "loader" else -1), batch_size=1)
    got = []
    with pytest.raises((ValueError, RuntimeError), match="3"):
        for batch in DeviceLoader(loader, "cpu", transform=transform):
            got.append(int(batch[0]))
    assert got == [0, 1, 2]


def test_a_pass_with_a_transform_left_early_stops_its_thread():
    import threading
    import time

    feed = DeviceLoader(DataLoader(torch.arange(100), batch_size=1), "cpu",
                        transform=lambda b: b + 1)
    before = threading.active_count()
    for _ in range(3):
        for batch in feed:
            if int(batch[0]) == 5:
                break
    assert [int(b[0]) for b in feed] == list(range(1, 101))  # a whole pass after them
    feed.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_the_gpu_check_runs_on_a_cpu_with_smoke():
    """``bench/gpu_check.py`` is what the next GPU session runs first: it must not break."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()] == \
        ["PASS", "SKIP", "PASS", "PASS", "SKIP", "PASS"], run.stdout
