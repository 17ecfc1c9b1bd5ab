"""``ImageFolder``: torchvision's layout and ImageNet transforms, checked against references
written here with Pillow (torchvision does not load with the local CPU torch); the device
placement run on the CPU through Pillow as its decoder; bad files named."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import autotune
from autotune import DataFileError, DeviceLoader, ImageFolder, InvalidConfigError
from autotune.factory.placing import _measured, place_images
from autotune.measure.workload import measure_workload
from autotune.policy import rules
from autotune.tuning.trial import batch_length
from autotune.policy.placement import Placement, choose_placement
from autotune.sources._jpeg import decode_with_pillow
from autotune.sources.images import (IMAGENET_MEAN, IMAGENET_STD, EncodedImages, crop_box,
                                     image_folder_in, with_images)

DEVICE = Placement("device", 0.0, None, "test")


def smooth(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like image: gradients and a few soft blobs (no pixel noise, so two resamplers
    agree closely)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        value = 0.5 + 0.3 * np.sin(4 * a * x + 3 * b * y + c)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            value += 0.2 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r ** 2)
        channels.append(value)
    return (np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of JPEGs 400-600 x 300-450 px (the GPU issue's sizes), sub-folders,
    upper-case endings and files that are not images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["zebra", "ant", "bee"]):
        for i in range(5):
            width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
            where = root / name / ("deep" if i == 4 else "")
            where.mkdir(parents=True, exist_ok=True)
            ending = ".JPG" if i == 3 else ".jpg"
            Image.fromarray(smooth(width, height, 10 * c + i)).save(
                where / f"{i}{ending}", quality=92)
        (root / name / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(b"at the top, not in a class")
    return root


def reference_layout(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's ImageFolder rules: class folders sorted, files found below each by
    their (case-insensitive) extension, sorted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for folder, _dirs, files in sorted(os.walk(root / name)):
            samples += [(os.path.join(folder, f), index) for f in sorted(files)
                        if f.lower().endswith((".jpg", ".jpeg", ".png"))]
    return classes, samples


def reference_params(width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params, as torchvision documents and draws it."""
    area = width * height
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(0.08, 1.0).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    raise AssertionError("the test images always fit a crop in ten tries")


def to_normalised(image: Image.Image | np.ndarray) -> torch.Tensor:
    """ToTensor then Normalize(ImageNet)."""
    x = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def reference_train(path: str, size: int = 224) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    i, j, h, w = reference_params(*image.size)
    out = image.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BILINEAR)
    if torch.rand(1) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_normalised(out)


def reference_eval(path: str) -> torch.Tensor:
    """Resize(256) then CenterCrop(224), sizes as torchvision computes them."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(256 * long / short)
    size = (256, new_long) if width <= height else (new_long, 256)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    top = round((size[1] - 224) / 2.0)
    left = round((size[0] - 224) / 2.0)
    return to_normalised(resized.crop((left, top, left + 224, top + 224)))


def test_layout_as_torchvisions_image_folder(folder) -> None:
    ds = ImageFolder(folder)
    classes, samples = reference_layout(folder)
    assert ds.classes == classes == ["ant", "bee", "zebra"]
    assert ds.class_to_idx == {name: i for i, name in enumerate(classes)}
    assert ds.samples == samples and len(ds) == 15
    assert ds.targets == [t for _p, t in samples]
    assert any(p.endswith(".JPG") for p, _t in ds.samples)
    assert any(os.sep + "deep" + os.sep in p for p, _t in ds.samples)
    x, target = ds[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and target == 0
    assert ImageFolder(folder, size=96)[0][0].shape == (3, 96, 96)


def levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to pixel levels (0-255), or uint8 ones as floats."""
    if images.dtype == torch.uint8:
        return images.double()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    return (images.double() * std + mean) * 255


def assert_same_pixels(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The issue's bar: every pixel within one level (1/255) of the reference's, half a level
    on average: torch's antialiased bilinear against Pillow's, nothing else."""
    assert ours.shape == theirs.shape
    difference = (levels(ours) - levels(theirs)).abs()
    assert difference.max().item() <= 1 + 1e-3, difference.max()
    assert difference.mean().item() <= 0.5, difference.mean()


def psnr(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    mse = ((levels(ours) - levels(theirs)) ** 2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-12))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("output", ["float", "uint8"])
def test_training_samples_are_torchvisions_recipe_within_a_level(folder, seed, output) -> None:
    ds = ImageFolder(folder, reduced_decode=False, output=output)
    for index in (0, 7, 14):
        torch.manual_seed(seed)
        ours = ds[index][0]
        torch.manual_seed(seed)
        theirs = reference_train(ds.samples[index][0])
        assert ours.dtype == (torch.float32 if output == "float" else torch.uint8)
        assert_same_pixels(ours, theirs)
        if output == "float":  # the floats ToTensor and Normalize make of those levels
            torch.manual_seed(seed)
            pixels = ImageFolder(folder, reduced_decode=False, output="uint8")[index][0]
            assert torch.allclose(ours, to_normalised(pixels.permute(1, 2, 0).numpy()),
                                  atol=1e-5)


@pytest.mark.parametrize("output", ["float", "uint8"])
def test_evaluation_samples_are_resize_then_center_crop(folder, output) -> None:
    ds = ImageFolder(folder, train=False, reduced_decode=False, output=output)
    for index in range(len(ds)):
        assert_same_pixels(ds[index][0], reference_eval(ds.samples[index][0]))
    torch.manual_seed(0)
    assert torch.equal(ds[3][0], ds[3][0])  # no random draw in evaluation


def test_without_simplejpeg_pillow_decodes_the_same_pixels(folder, monkeypatch) -> None:
    from autotune.sources import _pixels

    assert _pixels.simplejpeg() is not None  # installed with the test extra
    for train in (True, False):
        ds = ImageFolder(folder, train=train, output="uint8")
        torch.manual_seed(0)
        fast = [ds[i][0] for i in range(len(ds))]
        with monkeypatch.context() as patched:
            patched.setattr(_pixels, "simplejpeg", lambda: None)
            assert ds._pixels.__self__ is ds and _pixels.Picture(ds.samples[0][0]).image
            torch.manual_seed(0)
            slow = [ds[i][0] for i in range(len(ds))]
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                               - np.searchsorted(b, grid, side="right") / len(b))))


def reference_draws(width: int, height: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(scale, log aspect) of ``n`` RandomResizedCrop boxes drawn with numpy's generator."""
    out = []
    for _ in range(n):
        for _try in range(10):
            area = width * height * rng.uniform(0.08, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            raise AssertionError("unreachable for these sizes")
        out.append((w * h / (width * height), math.log(w / h)))
    return np.array(out)


def test_crop_and_flip_draws_match_random_resized_crop(tmp_path) -> None:
    # 10,000 samples through the dataset itself (device placement: the worker's draws
    # without decoding), against 10,000 draws of the documented algorithm.
    width, height = 500, 375
    root = tmp_path / "one" / "class"
    root.mkdir(parents=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(root / "a.jpg")
    ds = ImageFolder(tmp_path / "one").placed(DEVICE)
    torch.manual_seed(0)
    batch = ds.collate([ds[0] for _ in range(10_000)])[0]
    boxes = batch.boxes.numpy().astype(float)
    ours = np.stack([boxes[:, 2] * boxes[:, 3] / (width * height),
                     np.log(boxes[:, 3] / boxes[:, 2])], axis=1)
    theirs = reference_draws(width, height, 10_000, np.random.default_rng(0))
    critical = 1.95 * math.sqrt(2 / 10_000)  # alpha = 0.001
    assert ks_statistic(ours[:, 0], theirs[:, 0]) < critical
    assert ks_statistic(ours[:, 1], theirs[:, 1]) < critical
    # and the check can fail: a scale range of (0.3, 1) is told apart
    shifted = np.array([crop_box(width, height, (0.3, 1.0))[2:] for _ in range(2_000)], float)
    assert ks_statistic(shifted[:, 0] * shifted[:, 1] / (width * height),
                        theirs[:2_000, 0]) > critical
    assert (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] + boxes[:, 3] <= width).all()
    assert abs(batch.flips.float().mean().item() - 0.5) <= 0.02


def test_a_crop_that_never_fits_falls_back_to_the_center() -> None:
    # a 1000 x 10 strip: no crop within the ratio fits in ten tries
    assert crop_box(1000, 10) == (0, 493, 10, 13)
    assert crop_box(10, 1000) == (493, 0, 13, 10)


def device_batches(ds: ImageFolder, seed: int, indices) -> torch.Tensor:
    encoded = ds.placed(DEVICE)
    torch.manual_seed(seed)
    batch = encoded.collate([encoded[i] for i in indices])
    return ds.device_transform("cpu", decoder=decode_with_pillow)(batch)[0]


def test_the_device_placement_makes_the_same_samples(folder) -> None:
    ds = ImageFolder(folder, reduced_decode=False)
    indices = list(range(len(ds)))
    on_device = device_batches(ds, 5, indices)
    torch.manual_seed(5)
    on_cpu = torch.stack([ds[i][0] for i in indices])
    assert on_device.shape == on_cpu.shape and on_device.dtype == on_cpu.dtype
    # the same crops and flips: within resampling differences (Pillow's and torch's
    # antialiased bilinear), far below what another crop or a flip would give
    difference = (on_device - on_cpu).abs()
    assert difference.mean().item() < 0.02 and difference.max().item() < 0.6
    assert (on_device.mean() - on_cpu.mean()).abs().item() < 0.005
    assert (on_device.std() - on_cpu.std()).abs().item() < 0.005
    flipped = on_cpu.flip(-1)
    assert (on_device - flipped).abs().mean().item() > 5 * difference.mean().item()
    evaluation = ImageFolder(folder, train=False, reduced_decode=False)
    assert (device_batches(evaluation, 0, indices)
            - torch.stack([evaluation[i][0] for i in indices])).abs().mean().item() < 0.02


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """JPEGs the device decodes, and files it does not take: PNG, grayscale, CMYK,
    progressive."""
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    pixels = smooth(480, 360, 1)
    Image.fromarray(pixels).save(root / "a" / "0_baseline.jpg", quality=90)
    Image.fromarray(pixels).save(root / "a" / "1.png")
    Image.fromarray(pixels).convert("L").save(root / "a" / "2_gray.jpg")
    Image.fromarray(pixels).convert("CMYK").save(root / "a" / "3_cmyk.jpg")
    Image.fromarray(pixels).save(root / "a" / "4_progressive.jpg", progressive=True)
    return root


def test_files_the_device_does_not_take_are_decoded_by_the_worker(mixed) -> None:
    ds = ImageFolder(mixed, reduced_decode=False).placed(DEVICE)
    batch = ds.collate([ds[i] for i in range(len(ds))])[0]
    assert batch.encoded.tolist() == [0] and batch.decoded.tolist() == [1, 2, 3, 4]
    images = ds.device_transform("cpu", decoder=decode_with_pillow)(
        (batch, torch.zeros(5)))[0]
    assert images.shape == (5, 3, 224, 224) and torch.isfinite(images).all()


def test_a_split_sends_its_share_of_every_batch_to_the_workers(folder) -> None:
    ds = ImageFolder(folder).placed(Placement("split", 0.4, None, "test"))
    batch = ds.collate([ds[i % len(ds)] for i in range(200)])[0]
    assert len(batch.decoded) == pytest.approx(80, abs=4)
    out = ds.device_transform("cpu", decoder=decode_with_pillow)((batch, None))[0]
    assert out.shape == (200, 3, 224, 224)


def test_reduced_decoding_keeps_the_picture(tmp_path) -> None:
    # a 2400 x 1800 photo, evaluation crop: Pillow decodes it at 1/4 (600 x 450)
    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    Image.fromarray(smooth(2400, 1800, 3)).save(root / "a" / "big.jpg", quality=92)
    full = ImageFolder(root, train=False, reduced_decode=False)[0][0]
    reduced = ImageFolder(root, train=False)[0][0]
    assert (full - reduced).abs().mean().item() < 0.03


def test_a_loader_with_workers_in_each_placement(folder) -> None:
    factory = autotune.OptimalDataLoaderFactory(measure=False, seed=0)
    for placement in ("cpu", "device"):
        ds = ImageFolder(folder, placement=placement)
        loader = factory.create_training_loader(ds, 4, device="cpu", num_workers=2)
        batches = list(loader)
        loader.close()
        assert len(batches) == 3
        assert all(x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
                   for x, _y in batches)
        assert f"{placement}: placement={placement!r} asked for" in \
            loader.autotune_config.explain()


def test_the_factory_chooses_the_cpu_where_batches_stay_there(folder) -> None:
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    ds = ImageFolder(folder)
    loader = factory.create_training_loader(ds, 4, num_workers=0)
    assert ds.in_effect.where == "cpu"
    assert "the batches stay on the CPU" in loader.autotune_config.explain()
    x, _y = next(iter(loader))
    assert isinstance(x, torch.Tensor) and x.shape == (4, 3, 224, 224)


def test_the_placement_measured_on_a_device(folder) -> None:
    # the measuring path, run on the CPU (Pillow is its decoder here)
    ds = ImageFolder(folder)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    measured = _measured(ds, torch.device("cpu"), 2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's draws are untouched
    assert ds.in_effect.where == "cpu"  # measuring left the placement as it was
    assert measured.where in ("cpu", "device", "split")
    assert "CPUs" in measured.reason and "device decoder" in measured.reason
    assert place_images(ds, None, 2, collate_given=False).where == "cpu"


def test_bad_placements_and_transforms_are_refused(folder) -> None:
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    with pytest.raises(InvalidConfigError, match="placement='gpu'"):
        ImageFolder(folder, placement="gpu")
    with pytest.raises(InvalidConfigError, match="pass device='cuda'"):
        factory.create_training_loader(ImageFolder(folder, placement="device"), 4)
    with pytest.raises(InvalidConfigError, match="drop collate_fn="):
        factory.create_training_loader(ImageFolder(folder, placement="device"), 4,
                                       device="cpu", collate_fn=list)
    with pytest.raises(InvalidConfigError, match="device_transform= runs on the device"):
        factory.create_training_loader(ImageFolder(folder), 4, device_transform=abs)
    with pytest.raises(InvalidConfigError, match="not callable"):
        factory.create_training_loader(ImageFolder(folder), 4, device="cpu",
                                       device_transform=3)
    with pytest.raises(InvalidConfigError, match="does not exist"):
        ImageFolder(folder / "nowhere")
    (folder / "empty_class").mkdir(exist_ok=True)
    try:
        with pytest.raises(InvalidConfigError, match="no class folders"):
            ImageFolder(folder / "empty_class")
    finally:
        (folder / "empty_class").rmdir()
    with pytest.raises(InvalidConfigError, match="flip=2"):
        ImageFolder(folder, flip=2)


@pytest.fixture()
def broken(tmp_path) -> Path:
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    pixels = smooth(480, 360, 2)
    for i in range(4):
        Image.fromarray(pixels).save(root / "a" / f"{i}_good.jpg")
    whole = (root / "a" / "0_good.jpg").read_bytes()
    (root / "a" / "5_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "a" / "6_text.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.mark.parametrize("placement", ["cpu", "device"])
def test_every_bad_file_is_named(broken, placement) -> None:
    ds = ImageFolder(broken, placement=placement)
    bad = [i for i, (p, _t) in enumerate(ds.samples) if "good" not in p]
    transform = ds.device_transform("cpu", decoder=decode_with_pillow)
    for i in bad:  # each one, alone, is named
        with pytest.raises(DataFileError, match=os.path.basename(ds.samples[i][0])):
            transform(ds.collate([ds[i]]))
    # through real workers: the loader stops at the first bad file and names it
    loader = autotune.OptimalDataLoaderFactory(measure=False).create_validation_loader(
        ds, 7, device="cpu", num_workers=2)
    with pytest.raises(DataFileError, match=r"5_truncated\.jpg"):
        list(loader)
    loader.close()  # its workers stop now, not whenever the failed iterator is collected


def test_a_file_the_device_decoder_refuses_is_decoded_with_pillow(folder) -> None:
    ds = ImageFolder(folder, placement="device")
    batch = ds.collate([ds[i] for i in range(4)])
    calls = []

    def refuses_batches(datas, device):
        calls.append(len(datas))
        if len(datas) > 1:
            raise RuntimeError("nvjpeg: batch failed")
        return decode_with_pillow(datas, device)

    images = ds.device_transform("cpu", decoder=refuses_batches)(batch)[0]
    assert calls == [4, 1, 1, 1, 1] and images.shape == (4, 3, 224, 224)


def test_device_loader_transform_runs_on_every_batch_in_order() -> None:
    seen = []

    def transform(batch):
        seen.append(batch.clone())
        return batch * 10

    loader = torch.utils.data.DataLoader(torch.arange(12), batch_size=3)
    out = list(DeviceLoader(loader, "cpu", transform=transform))
    assert [b.tolist() for b in seen] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [b.tolist() for b in out] == [[0, 10, 20], [30, 40, 50], [60, 70, 80],
                                         [90, 100, 110]]
    moved = list(DeviceLoader(loader, "meta", transform=lambda b: (b.device.type, b.shape)))
    assert moved[0] == ("meta", torch.Size([3]))
    with pytest.raises(InvalidConfigError, match="transform=3 is not callable"):
        DeviceLoader(loader, "cpu", transform=3)


def test_the_factorys_device_transform_runs_after_the_decoding(folder) -> None:
    factory = autotune.OptimalDataLoaderFactory(measure=False, seed=0)
    order = []

    def transform(batch):
        order.append(batch[1].tolist())
        images, targets = batch
        assert isinstance(images, torch.Tensor)  # decoded already
        return images.mean(dim=(1, 2, 3)), targets

    loader = factory.create_validation_loader(
        ImageFolder(folder, train=False, placement="device"), 4, device="cpu",
        device_transform=transform, num_workers=1)
    out = list(loader)
    assert [y.tolist() for _x, y in out] == order
    assert sum(order, []) == ImageFolder(folder).targets
    assert all(x.shape == (len(y),) for x, y in out)


def test_splits_of_an_image_folder_keep_its_placement(folder) -> None:
    ds = ImageFolder(folder, placement="device")
    train, val, test = autotune.OptimalDataLoaderFactory(measure=False).create_dataloaders(
        ds, 3, splits=(0.6, 0.2, 0.2), device="cpu", num_workers=0)
    for loader in (train, val, test):
        images, _targets = next(iter(loader))
        assert images.shape[1:] == (3, 224, 224) and images.dtype == torch.float32
        assert "placement='device' asked for" in loader.autotune_config.explain()


def test_a_subset_subclass_keeps_its_class_around_a_placed_copy(folder) -> None:
    class Mine(torch.utils.data.Subset):
        pass

    ds = ImageFolder(folder)
    view = with_images(Mine(ds, [0, 2]), ds.placed(DEVICE))
    assert type(view) is Mine and view.indices == [0, 2]
    assert image_folder_in(view).in_effect.where == "device"


def test_adapt_reads_an_image_folder_in_the_device_placement(folder) -> None:
    loader = autotune.OptimalDataLoaderFactory(measure=False).create_training_loader(
        ImageFolder(folder, placement="device"), 4, device="cpu", adapt=True, num_workers=1,
        adapt_every=1)
    for _epoch in range(2):
        shapes = {tuple(images.shape) for images, _targets in loader}
        assert shapes == {(4, 3, 224, 224)}
    loader.close()


def adapt_until_moved(ds: ImageFolder, step_s: float, epochs: int) -> tuple[object, list]:
    """Trains with ``adapt=True`` on the CPU (Pillow as the device's decoder) until the
    placement moves, then one more epoch; every epoch's targets as delivered."""
    loader = autotune.OptimalDataLoaderFactory(measure=False, seed=0).create_training_loader(
        ds, 3, device="cpu", adapt=True, adapt_every=2, num_workers=1)
    seen = []
    for epoch in range(1, epochs + 1):
        targets = []
        for images, y in loader:
            assert images.shape == (len(y), 3, 224, 224) and images.dtype == torch.float32
            targets += y.tolist()
            time.sleep(step_s)
        seen.append(sorted(targets))
        if any(c.placement and c.epoch <= epoch for c in loader.changes):
            break  # this epoch ran in the new placement (a move is made as an epoch starts)
    loader.close()
    return loader, seen


# measured rates (as if on a device: the CPU stands in for it, Pillow is its decoder), the
# placement they give with the step unknown, the step, where the loop moves, why
MOVES = [
    # the device decodes 50,000 images/s and the workers 600: the device; then a step of
    # ~40 ms for 3 images (75 images/s): the CPUs' 600 images/s keep up with it
    (600, 50_000, "device", 0.04, ("cpu",), "keep up with the step"),
    # workers 5,000 images/s, a slow device decoder (400): the CPUs; then the loop waits on
    # them (no step), and they deliver a few hundred images/s here, not 5,000
    (5_000, 400, "cpu", 0.0, ("split", "device"), "waited"),
]


@pytest.mark.parametrize(("cpu", "device", "first", "step_s", "moved", "words"), MOVES)
def test_adapt_moves_decoding_where_the_measured_step_says(folder, cpu, device, first,
                                                          step_s, moved, words) -> None:
    ds = ImageFolder(folder)
    ds.measured["cpu"] = choose_placement(cpu, device)
    assert ds.measured["cpu"].where == first
    loader, seen = adapt_until_moved(ds, step_s, epochs=10)
    moves = [c for c in loader.changes if c.placement]
    assert moves, loader.changes
    assert moves[0].placement in moved and words in moves[0].reason
    assert "measured while training" in moves[0].reason
    assert all(epoch == sorted(ds.targets) for epoch in seen)  # none lost, none repeated
    assert "adapt=True" in loader.autotune_config.reasons["placement"]


def test_a_loader_that_may_move_to_the_cpus_sizes_its_batches_for_them(folder) -> None:
    from fakes import fake_hardware

    # 16 CPUs and 2 MiB of /dev/shm: room for many batches of bytes, few of decoded images
    hardware = fake_hardware(cpus=16, shm_free_bytes=2 << 20)
    ds = ImageFolder(folder)
    ds.measured["cpu"] = choose_placement(600, 50_000)  # the device placement
    hints = rules.DatasetHints(dataset_size=len(ds), batch_size=4, training=True)
    as_bytes = measure_workload(ds.placed(ds.measured["cpu"]), collate_fn=ds.collate)
    # the workers ship uint8 images where the batches go to a device (normalised there)
    shipped = ds.placed(ds.in_effect, normalised_in="device").decoded_bytes
    assert shipped == 3 * 224 * 224 + 8 and ds.decoded_bytes == 4 * 3 * 224 * 224 + 8
    decoded = dataclasses.replace(as_bytes, sample_bytes=shipped)
    assert as_bytes.sample_bytes > os.path.getsize(ds.samples[0][0]) // 2  # bytes counted
    assert rules.max_workers(hardware, hints, decoded) < rules.max_workers(hardware, hints,
                                                                           as_bytes)
    loader = autotune.OptimalDataLoaderFactory(hardware=hardware, seed=0).create_training_loader(
        ds, 4, device="cpu", adapt=True)
    # the re-tuner's ceiling (private): what batches of 4 decoded images leave room for
    assert loader.loader._cap <= max(rules.max_workers(hardware, hints, decoded),
                                     loader.num_workers)
    loader.close()


@pytest.mark.serial
def test_a_move_that_gave_nothing_is_taken_back_and_not_made_again(folder,
                                                                    monkeypatch) -> None:
    from autotune.sources import images as images_module

    def slow(datas, device):  # a decoder far slower than it measured: 50 ms a batch
        time.sleep(0.05)
        return decode_with_pillow(datas, device)

    monkeypatch.setattr(images_module, "decoder_for", lambda device: ("slow", slow))
    ds = ImageFolder(folder)
    ds.measured["cpu"] = choose_placement(5_000, 400)
    loader = autotune.OptimalDataLoaderFactory(measure=False, seed=0).create_training_loader(
        ds, 3, device="cpu", adapt=True, adapt_every=2, num_workers=1)
    after = 0  # epochs run since the move was taken back
    for _epoch in range(20):  # a busy machine keeps changing worker counts for a while
        assert sorted(y for _x, ys in loader for y in ys.tolist()) == sorted(ds.targets)
        after += sum(1 for c in loader.changes if c.placement) >= 2
        if after > 2:
            break
    loader.close()
    moves = [c for c in loader.changes if c.placement]
    assert [c.placement for c in moves] == ["split", "cpu"], loader.changes
    assert "gave no gain" in moves[1].reason and "back to 'cpu'" in moves[1].reason


def test_the_autotuner_times_the_workers_part_of_a_device_placement(folder) -> None:
    ds = ImageFolder(folder, placement="device")
    seen = set()
    result = autotune.Autotuner(ds, 4, budget_s=3, max_workers=1, progress=False,
                                train_step=lambda batch: seen.add(type(batch[0]))).run()
    assert result.best_samples_per_s > 0 and seen == {EncodedImages}
    assert batch_length(ds.collate([ds[i] for i in range(4)])) == 4  # samples, not batches


def test_the_encoded_batch_stays_on_the_host_where_the_decoder_reads_it(folder) -> None:
    ds = ImageFolder(folder, placement="device")
    loader = torch.utils.data.DataLoader(ds, 4, collate_fn=ds.collate)
    seen = []

    def transform(batch):
        encoded, targets = batch
        seen.append((encoded.data.device.type, encoded.ready.device.type, targets.device.type))
        return batch

    list(DeviceLoader(loader, "meta", transform=transform))
    assert seen and set(seen) == {("cpu", "cpu", "meta")}


def test_loaders_of_one_folder_share_one_measured_placement(folder, monkeypatch) -> None:
    from autotune.factory import placing

    calls = []

    def measured(dataset, device, cpus):
        calls.append(str(device))
        return Placement("split", 0.5, None, "measured (test)")

    monkeypatch.setattr(placing, "_measured", measured)
    ds = ImageFolder(folder)
    meta = torch.device("meta")
    first = place_images(ds, meta, 2, collate_given=False)
    second = place_images(ds, meta, 2, collate_given=False)
    assert first is second and calls == ["meta"]
    assert ds.in_effect.where == "cpu"  # the folder itself is not changed: loaders get copies
    view = ds.placed(first)
    assert view.in_effect.where == "split" and view.samples is ds.samples


def test_a_jpeg_with_a_long_trailer_is_decoded_not_refused(tmp_path) -> None:
    root = tmp_path / "trailer"
    (root / "a").mkdir(parents=True)
    Image.fromarray(smooth(480, 360, 4)).save(root / "a" / "0.jpg")
    with open(root / "a" / "0.jpg", "ab") as file:
        file.write(b"\0" * 4096)  # a camera's trailer after the end marker
    cpu = ImageFolder(root, reduced_decode=False)
    device = ImageFolder(root, placement="device", reduced_decode=False)
    torch.manual_seed(0)
    expected = cpu[0][0]
    torch.manual_seed(0)
    batch = device.collate([device[0]])
    assert batch[0].decoded.tolist() == [0]  # the worker decoded it
    out = device.device_transform("cpu", decoder=decode_with_pillow)(batch)[0]
    assert (out[0] - expected).abs().max().item() < 0.02  # uint8 rounding only


def test_a_decoder_library_is_used_only_once_it_decodes(monkeypatch) -> None:
    from autotune.sources import _jpeg

    def other_api(source, *, mode):  # a decoder that takes a path and no device
        raise TypeError("decode_jpeg() got an unexpected keyword argument 'device'")

    def works(datas, mode, device):
        return [torch.zeros(3, 8, 16, dtype=torch.uint8, device=device) for _ in datas]

    monkeypatch.setattr(_jpeg, "_libraries", lambda: [("new", other_api), ("old", works)])
    _jpeg._working.cache_clear()
    try:
        assert _jpeg.decoder_for(torch.device("cpu"))[0] == "old"
        _jpeg._working.cache_clear()
        monkeypatch.setattr(_jpeg, "_libraries", lambda: [("new", other_api)])
        assert _jpeg.decoder_for(torch.device("cpu"))[0] == "pillow"
        assert _jpeg.decoder_for(torch.device("cuda")) is None
        assert _jpeg.decoder_for(torch.device("meta"))[0] == "pillow"
    finally:
        _jpeg._working.cache_clear()


@pytest.mark.parametrize(("keywords", "named"), [
    ({"scale": 5}, "scale=5"), ({"ratio": (1,)}, r"ratio=\(1,\)"), ({"flip": "x"}, "flip='x'"),
    ({"mean": None}, "mean=None"), ({"std": (1, 0, 1)}, r"std=\(1, 0, 1\)"),
    ({"scale": (0.5, 0.1)}, r"scale=\(0.5, 0.1\)"), ({"mean": (0, 0, float("nan"))}, "mean="),
    ({"size": "a"}, "size='a'"), ({"placement": 3}, "placement=3"),
    ({"train": "yes"}, "train='yes'"),
])
def test_bad_arguments_name_the_parameter(folder, keywords, named) -> None:
    with pytest.raises(InvalidConfigError, match=named):
        ImageFolder(folder, **keywords)


def test_a_class_folder_without_images_is_refused_as_torchvision_does(folder, tmp_path) -> None:
    root = tmp_path / "layout"
    for name in ("cat", "dog", "empty", "texts"):
        (root / name).mkdir(parents=True)
    for name in ("cat", "dog"):
        Image.fromarray(smooth(64, 48, 0)).save(root / name / "0.jpg")
    (root / "texts" / "notes.txt").write_text("not an image")
    with pytest.raises(InvalidConfigError, match=r"class folders 'empty', 'texts'"):
        ImageFolder(root)
    with pytest.raises(InvalidConfigError, match="output='float32'"):
        ImageFolder(folder, output="float32")


@pytest.mark.parametrize("train", [True, False])
def test_a_reduced_decode_keeps_the_picture(tmp_path, train) -> None:
    """A 2400 x 1800 photo: the evaluation decode and a large crop take 1/4 or 1/2 of its
    pixels; against the full decode, PSNR >= 35 dB (the issue's bar)."""
    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    Image.fromarray(smooth(2400, 1800, 3)).save(root / "a" / "big.jpg", quality=92)
    keywords = {"train": train, "output": "uint8", "scale": (0.5, 1.0)}
    for seed in range(4):
        torch.manual_seed(seed)
        full = ImageFolder(root, reduced_decode=False, **keywords)[0][0]
        torch.manual_seed(seed)
        reduced = ImageFolder(root, **keywords)[0][0]
        assert psnr(reduced, full) >= 35, psnr(reduced, full)
        assert not torch.equal(reduced, full)  # a reduced decode did apply


class Reference(torch.utils.data.Dataset):
    """torchvision's ImageNet recipe on Pillow images: what the loaders are compared with."""

    def __init__(self, samples, train: bool = True) -> None:
        self.samples, self.train = samples, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return (reference_train(path) if self.train else reference_eval(path)), target


def side_by_side(ours, reference: Reference, **keywords) -> None:
    """Our loader's batches against torch's DataLoader of the reference recipe, same seeds."""
    theirs = torch.utils.data.DataLoader(reference, batch_size=4, **keywords,
                                         generator=torch.Generator().manual_seed(7))
    pairs = list(zip(ours, theirs, strict=True))
    assert len(pairs) == len(theirs) >= 3
    for (x, y), (x_ref, y_ref) in pairs:
        assert x.dtype == torch.float32 and torch.equal(y, y_ref)
        assert_same_pixels(x, x_ref)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_loaders_float_batches_are_torchs_normalised_where_they_land(folder, device) -> None:
    """Workers ship uint8 and normalise a batch at once (no device), or the device does
    (``device="cpu"`` runs the path a GPU takes): torch's DataLoader of the reference recipe
    gives the same batches."""
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    ds = ImageFolder(folder)
    ours = factory.create_training_loader(ds, 4, num_workers=2, device=device,
                                          generator=torch.Generator().manual_seed(7))
    try:
        assert ours.autotune_config.drop_last  # the factory's training default
        side_by_side(ours, Reference(ds.samples), shuffle=True, num_workers=2, drop_last=True)
        explained = ours.autotune_config.explain()
        if device is None:
            assert "normalised a batch at once in the worker" in explained
        else:
            assert "uint8 from the workers, normalised on cpu" in explained
            inner = ours.loader  # what crosses the bus: uint8
            assert next(iter(inner))[0].dtype == torch.uint8
    finally:
        ours.close()


def test_an_evaluation_loader_is_torchs_too(folder) -> None:
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    ds = ImageFolder(folder, train=False)
    ours = factory.create_validation_loader(ds, 4, num_workers=1)
    try:
        side_by_side(ours, Reference(ds.samples, train=False), num_workers=1)
    finally:
        ours.close()


@pytest.mark.parametrize("device", [None, "cpu"])
def test_uint8_output_is_never_normalised(folder, device) -> None:
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    ds = ImageFolder(folder, output="uint8", size=56)
    loader = factory.create_training_loader(ds, 4, num_workers=1, device=device)
    try:
        batches = list(loader)
    finally:
        loader.close()
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 56, 56) for x, _y in batches)
    assert "output='uint8'" in loader.autotune_config.explain()


def test_a_given_collate_fn_gets_normalised_samples(folder) -> None:
    seen = []

    def collate(samples):
        seen.extend(x.dtype for x, _y in samples)
        return torch.utils.data.default_collate(samples)

    factory = autotune.OptimalDataLoaderFactory(measure=False)
    loader = factory.create_validation_loader(ImageFolder(folder, train=False), 4,
                                              num_workers=0, collate_fn=collate)
    x, _y = next(iter(loader))
    assert x.dtype == torch.float32 and set(seen) == {torch.float32}
    assert "a collate_fn was given" in loader.autotune_config.explain()


def test_exif_turned_jpegs_are_decoded_by_the_workers(tmp_path) -> None:
    """Orientations 2-8 go to the worker (a device decoder would turn them, the CPU path and
    torchvision's loader do not); 1 and no EXIF go to the device. Every sample is the CPU
    placement's."""
    root = tmp_path / "exif"
    (root / "a").mkdir(parents=True)
    pixels = smooth(480, 360, 5)
    Image.fromarray(pixels).save(root / "a" / "0_none.jpg", quality=90)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(root / "a" / f"{orientation}.jpg", quality=90, exif=exif)
    ds = ImageFolder(root, reduced_decode=False).placed(DEVICE)
    batch = ds.collate([ds[i] for i in range(len(ds))])[0]
    names = [os.path.basename(p) for p in batch.paths]
    assert sorted(names[i] for i in batch.encoded.tolist()) == ["0_none.jpg", "1.jpg"]
    assert sorted(names[i] for i in batch.decoded.tolist()) == [f"{k}.jpg" for k in range(2, 9)]
    torch.manual_seed(0)
    on_device = ds.device_transform("cpu", decoder=decode_with_pillow)(
        ds.collate([ds[i] for i in range(len(ds))]))[0]
    torch.manual_seed(0)
    on_cpu = torch.stack([ImageFolder(root, reduced_decode=False)[i][0]
                          for i in range(len(ds))])
    assert (on_device - on_cpu).abs().mean().item() < 0.02


def test_cuda_and_cuda_0_are_one_decoder(monkeypatch) -> None:
    """torch.cuda is faked at its boundary (no GPU here): the current device is 0."""
    from autotune.sources import _jpeg
    from autotune.system.cuda import canonical_device

    asked = []

    def working(device):
        asked.append(device)
        return "fake", decode_with_pillow

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_jpeg, "_working", working)
    assert _jpeg.decoder_for(torch.device("cuda")) == _jpeg.decoder_for(torch.device("cuda:0"))
    assert asked == [torch.device("cuda", 0)] * 2  # one key: the cache holds one decoder
    assert canonical_device("cuda") == canonical_device(torch.device("cuda:0"))
    assert canonical_device("cpu") == torch.device("cpu")


def test_a_batch_is_decoded_in_parts_of_bounded_pixels_in_order(folder, monkeypatch) -> None:
    from autotune.sources import images

    ds = ImageFolder(folder, placement="device")
    torch.manual_seed(0)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    calls = []

    def counting(datas, device):
        calls.append(len(datas))
        return decode_with_pillow(datas, device)

    whole = ds.device_transform("cpu", decoder=counting)(batch)[0]
    assert calls == [len(ds)]
    largest = int(batch[0].sizes.prod(1).max())
    monkeypatch.setattr(images, "DECODE_PIXELS", 2 * largest)
    calls.clear()
    parts = ds.device_transform("cpu", decoder=counting)(batch)[0]
    assert sum(calls) == len(ds) and len(calls) >= len(ds) // 3
    assert torch.equal(whole, parts)  # the same images in the same places
    assert images._parts(list("abcd"), [5, 5, 20, 1], 10) == [["a", "b"], ["c"], ["d"]]
    # resized in groups of bounded padded pixels: the same images again
    monkeypatch.setattr(images, "RESIZE_IMAGES", 3)
    monkeypatch.setattr(images, "RESIZE_PIXELS", 2 * largest)
    assert torch.equal(whole, ds.device_transform("cpu", decoder=counting)(batch)[0])
    shapes = [(10, 10), (9, 10), (10, 9), (3, 3), (20, 1)]
    assert images._groups(shapes, 2, 250) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert images._groups(shapes, 5, 130) == [slice(0, 1), slice(1, 2), slice(2, 3),
                                              slice(3, 5)]  # 2 x 20 x 3 = 120 fits
    assert images._groups([], 5, 100) == []
    areas = [int(h * w) for _t, _l, h, w in batch[0].boxes.tolist()]
    assert areas == sorted(areas, reverse=True)  # the workers sort by box, largest first


def test_the_device_transform_makes_no_tensor_from_python_values_per_batch(folder,
                                                                          monkeypatch) -> None:
    """Constants (mean, std) are on the device once; a batch's own tensors come with it: on a
    GPU a ``torch.tensor(...)`` on the device would wait for the step before it."""
    ds = ImageFolder(folder, placement="device")
    transform = ds.device_transform("cpu", decoder=decode_with_pillow)
    batch = ds.collate([ds[i] for i in range(8)])
    made = []
    for name in ("tensor", "as_tensor"):  # host values copied to the device
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=original, _n=name, **k: (
            made.append(_n), _o(*a, **k))[1])
    images, _targets = transform(batch)
    uint8 = transform((torch.zeros(2, 3, 224, 224, dtype=torch.uint8), None))[0]
    assert images.shape == (8, 3, 224, 224) and uint8.dtype == torch.float32
    assert made == []


def test_batched_crops_and_center_crops_are_torchs_resize() -> None:
    """The device path's two products against ``interpolate(antialias=True)`` per image:
    upscaled and downscaled boxes, flips, evaluation's resize and center crop."""
    from autotune.sources._pixels import eval_geometry
    from autotune.sources._resize import resized_centers, resized_crops

    generator = torch.Generator().manual_seed(0)
    images, boxes, flips = [], [], []
    for k in range(10):
        height, width = (int(v) for v in torch.randint(60, 300, (2,), generator=generator))
        images.append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                    generator=generator))
        h, w = (int(torch.randint(10, side + 1, (), generator=generator))
                for side in (height, width))
        boxes.append((int(torch.randint(0, height - h + 1, (), generator=generator)),
                      int(torch.randint(0, width - w + 1, (), generator=generator)), h, w))
        flips.append(k % 3 == 0)
    from autotune.sources.images import _padded

    padded = _padded(images, torch.device("cpu"))
    made = resized_crops(padded, torch.tensor(boxes), 48, torch.tensor(flips))

    def bilinear(x, size):
        return torch.nn.functional.interpolate(x.unsqueeze(0).float(), size=size,
                                               mode="bilinear", antialias=True)[0]

    for image, (top, left, h, w), flip, ours in zip(images, boxes, flips, made):
        theirs = bilinear(image[:, top:top + h, left:left + w], (48, 48))
        assert torch.allclose(ours, theirs.flip(-1) if flip else theirs, atol=1e-3)
    heights = torch.tensor([image.shape[1] for image in images])
    widths = torch.tensor([image.shape[2] for image in images])
    centers = resized_centers(padded, heights, widths, 55, 48)
    for image, ours in zip(images, centers):
        new_h, new_w, top, left = eval_geometry(image.shape[2], image.shape[1], 55, 48)
        theirs = bilinear(image, (new_h, new_w))[:, top:top + 48, left:left + 48]
        assert torch.allclose(ours, theirs, atol=1e-2)


def test_the_placement_times_the_cpu_side_at_one_thread_as_a_worker(folder, monkeypatch) -> None:
    threads = []
    original = ImageFolder.pixels_on_cpu

    def spied(self, index):
        threads.append(torch.get_num_threads())
        return original(self, index)

    monkeypatch.setattr(ImageFolder, "pixels_on_cpu", spied)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _measured(ImageFolder(folder), torch.device("cpu"), 2)
        assert threads and set(threads) == {1}
        assert torch.get_num_threads() == 2  # the caller's count is back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_epochs_side_by_side_with_torch_while_the_user_changes_the_folder(folder, device) -> None:
    """Three epochs against torch's DataLoader of the reference recipe: the same folder, a
    sampler with the same seed, evaluation samples (no draws: torch's per-epoch worker seeds
    and our persistent ones cannot differ). Between epochs the user reverses the file list,
    then drops three files, on the folder they passed: torch's loader (workers made each
    epoch) sees each change; so must the factory's, whose workers persist."""
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    ds = ImageFolder(folder, train=False, reduced_decode=False)
    reference = Reference(ds.samples, train=False)
    ours = factory.create_validation_loader(
        ds, 4, num_workers=2, device=device, persistent_workers=True,
        sampler=torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(3)))
    theirs = torch.utils.data.DataLoader(
        reference, batch_size=4, num_workers=2,
        sampler=torch.utils.data.RandomSampler(reference,
                                               generator=torch.Generator().manual_seed(3)))
    try:
        for epoch in range(3):
            if epoch == 1:
                ds.samples = reference.samples = ds.samples[::-1]
            if epoch == 2:
                ds.samples = reference.samples = ds.samples[:-3]
            pairs = list(zip(ours, theirs, strict=True))
            assert len(pairs) == math.ceil(len(reference) / 4), epoch
            for (x, y), (x_ref, y_ref) in pairs:
                assert torch.equal(y, y_ref), epoch
                assert_same_pixels(x, x_ref)
        assert "workers_restarted" in ours.autotune_config.explain()
    finally:
        ours.close()
