"""``ImageFolder``: torchvision's folder layout and ImageNet transforms, decoded where it is
fastest.

Training samples are what torchvision's ImageNet recipe makes: a random crop of 8-100% of the
area with an aspect ratio in [3/4, 4/3] (``RandomResizedCrop``'s draw, ten tries then a center
crop), resized to ``size`` (bilinear, antialiased), flipped with p = 0.5, a float tensor
normalised with ImageNet's mean and std. Evaluation: the shorter side resized to ``size /
0.875`` (256 for 224), then a center crop.

Where the decoding runs is the placement (``policy.placement``):

- ``"cpu"``: the worker decodes with Pillow and transforms; a sample is ``(tensor, target)``.
  Pillow's reduced-size JPEG decoding (``draft``) is used when the crop is at least twice
  the output size (a 2-8x smaller DCT decode, then the same resize).
- ``"device"``: the worker reads the file's bytes and draws the crop box and the flip (the
  same draws, from the same generator, as on the CPU); ``collate`` packs a batch into one
  ``EncodedImages``; ``device_transform(device)`` decodes it on the device (nvJPEG through
  ``sources._jpeg``), crops, resizes, flips and normalises there. Files that are not
  baseline RGB JPEGs (PNG, grayscale, CMYK, progressive) are decoded by the worker.
- ``"split"``: a fixed share of the images (spread over the indices) takes the CPU path in
  the worker, the rest the device one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .._check import check_bool, check_int
from ..errors import DataFileError, InvalidConfigError
from ..policy.placement import PLACEMENTS, Placement
from ..system.cuda import canonical_device
from ._jpeg import Decoder, decode_with_pillow, decoder_for
from ._pixels import Box, Picture, eval_geometry, pillow, resized, scaled_box
from ._resize import resized_centers, resized_crops

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_CROP = 0.875  # 224 of 256: the ImageNet evaluation's center crop
_GOLDEN = 0.6180339887498949  # spreads a split's CPU share evenly over the indices
DECODE_PIXELS = 1 << 27  # pixels decoded in one call at most (~400 MB of RGB)
RESIZE_IMAGES = 64  # decoded images resized in one pair of products at most
RESIZE_PIXELS = 1 << 25  # and padded pixels (float32: ~400 MB over three channels)
_ORIENTATION = 0x0112  # the EXIF tag: 1 is upright, 2-8 mirror or turn the stored pixels
_BAD_IMAGE = "cannot be decoded as an image (corrupt, truncated or not an image file)"

OUTPUTS = ("float", "uint8")
NORMALISED_IN = ("sample", "collate", "device")


@functools.cache
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """The ratio range's logarithms, in float32 as torchvision rounds them (made once)."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return low, high


def crop_box(width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3),
             generator: torch.Generator | None = None) -> Box:
    """``RandomResizedCrop``'s draw: ten tries at a random area share and log-uniform aspect
    ratio that fit the image, else the largest center crop within ``ratio``."""
    area = width * height
    low, high = _log_ratio(tuple(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(low, high, generator=generator)).item()
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    shape = width / height
    if shape < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif shape > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass
class EncodedImages:
    """A batch for the device placement: the JPEGs' bytes back to back, and the images the
    workers decoded themselves. Its ``.to()`` returns it as it is: ``DeviceLoader`` leaves it
    on the host, where the decoder reads it.

    Attributes:
        data: every device-decoded file's bytes, one 1-D uint8 tensor.
        offsets: where each of those files starts in ``data``, and its end (``n + 1``).
        encoded: the batch positions of those files.
        ready: uint8 ``(m, 3, size, size)`` images the workers decoded (CPU placement's crop,
            resize and flip, not yet normalised).
        decoded: the batch positions of ``ready``.
        boxes: ``(n, 4)`` crop boxes (top, left, height, width) of the encoded files.
        flips: ``(n,)`` bool, which encoded images are flipped.
        sizes: ``(n, 2)`` the encoded files' (height, width), to decode a batch in parts of a
            bounded number of pixels.
        paths: every file of the batch, in batch order.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    encoded: torch.Tensor
    ready: torch.Tensor
    decoded: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    sizes: torch.Tensor
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, *_args: Any, **_kwargs: Any) -> EncodedImages:
        """Itself: the decoder reads the bytes from host memory (pinned by the loader)."""
        return self

    def pin_memory(self) -> EncodedImages:
        """Pinned copies (the DataLoader's pin-memory thread calls this): every tensor the
        device reads copies without holding the host."""
        return dataclasses.replace(self, data=self.data.pin_memory(),
                                   ready=self.ready.pin_memory(),
                                   decoded=self.decoded.pin_memory(),
                                   encoded=self.encoded.pin_memory(),
                                   boxes=self.boxes.pin_memory(),
                                   flips=self.flips.pin_memory(),
                                   sizes=self.sizes.pin_memory())

    def file(self, i: int) -> torch.Tensor:
        """The bytes of the ``i``-th encoded file."""
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]


@dataclasses.dataclass
class _Encoded:
    """One device-placement sample before collation: bytes or a decoded image."""

    path: str
    data: torch.Tensor | None  # the file's bytes, for the device
    ready: torch.Tensor | None  # uint8 (3, size, size), decoded by the worker
    box: Box
    flip: bool
    size: tuple[int, int]  # the file's (height, width)


def _numbers(name: str, values: Any, count: int, fix: str,
             shown: Any = None) -> tuple[float, ...]:
    """``values`` as ``count`` floats, or an ``InvalidConfigError`` naming ``name``."""
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise InvalidConfigError(f"{name}={values if shown is None else shown!r}: pass {fix}")
    return numbers


def _classes(root: str) -> list[str]:
    try:
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except FileNotFoundError:
        raise InvalidConfigError(f"root={root!r} does not exist: pass the folder that holds "
                                 "one sub-folder per class") from None
    except NotADirectoryError:
        raise InvalidConfigError(f"root={root!r} is a file: pass the folder that holds one "
                                 "sub-folder per class") from None
    if not names:
        raise InvalidConfigError(f"root={root!r} has no class folders: put each class's "
                                 "images in a sub-folder named after it")
    return names


def _samples(root: str, classes: Sequence[str],
             extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        found = len(samples)
        for folder, _dirs, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, file), index) for file in sorted(files)
                        if file.lower().endswith(extensions)]
        if len(samples) == found:
            empty.append(name)
    if empty:  # torchvision refuses such a folder too: a class no sample can have
        raise InvalidConfigError(
            f"root={root!r}: no image files ({', '.join(extensions)}) in the class "
            f"folder{'s' if len(empty) > 1 else ''} {', '.join(map(repr, empty))}: put images "
            "in each class folder, or move the empty ones out of root")
    return samples


class ImageFolder(Dataset):
    """Images in one folder per class (torchvision's layout), transformed as for ImageNet.

    Args:
        root: the folder with one sub-folder per class; classes are the sorted folder names,
            images are found in each (and below it) by extension.
        train: training samples (random resized crop and flip) or evaluation ones (resize and
            center crop).
        size: the side of the square output, in pixels.
        placement: where images are decoded: ``"cpu"`` (the workers), ``"device"`` (the
            device the batches go to) or ``None``: the factory measures both and chooses
            (the CPU when it does not), with its reason in ``explain()``.
        mean, std: per-channel normalisation (ImageNet's by default).
        scale, ratio: the training crop's area share and aspect ratio ranges.
        flip: the probability of a horizontal flip in training.
        reduced_decode: decode a JPEG at 1/2, 1/4 or 1/8 of its size when the crop is at
            least that much larger than ``size`` (CPU placement).
        extensions: the file names (lower case endings) taken as images.
        output: ``"float"``: images normalised with ``mean`` and ``std`` on arrival (per batch
            where the factory builds the loader: in the worker, or on the device the batches
            go to, so that uint8 crosses the bus); ``"uint8"``: the resized pixels, for loops
            that normalise themselves.

    Attributes:
        classes: the class names, sorted.
        class_to_idx: each class name's index.
        samples: ``(path, class index)`` pairs, sorted by class then path.
        targets: the class index of each sample.

    Example::

        train = autotune.ImageFolder("data/train", train=True, size=224)
        loader = factory.create_training_loader(train, 256, device="cuda")
        for images, targets in loader:  # normalised float images on the GPU
            ...

    A sample read directly (``train[i]``) is normalised by itself; the factory's loaders
    normalise a batch at once (``collate``, or on the device).
    """

    def __init__(self, root: str | os.PathLike[str], *, train: bool = True, size: int = 224,
                 placement: str | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5,
                 reduced_decode: bool = True, extensions: Sequence[str] = EXTENSIONS,
                 output: str = "float") -> None:
        self.root = os.fspath(root)
        if output not in OUTPUTS:
            raise InvalidConfigError(f"output={output!r}: pass 'float' (normalised images) or "
                                     "'uint8' (the resized pixels, normalised by you)")
        self.output = output
        pillow()  # the one library every file type needs: say how to install it, here
        self.train = check_bool("train", train)
        self.size = check_int("size", size, minimum=1)
        if placement is not None and placement not in ("cpu", "device"):
            raise InvalidConfigError(f"placement={placement!r}: pass 'cpu', 'device' or None "
                                     "(measured by the factory)")
        self.placement = placement
        self.mean = _numbers("mean", mean, 3, "three values (R, G, B)")
        self.std = _numbers("std", std, 3, "three values (R, G, B), each above 0")
        if any(s <= 0 for s in self.std):
            raise InvalidConfigError(f"std={std!r}: pass three values (R, G, B), each above 0")
        self.scale = _numbers("scale", scale, 2, "a (low, high) range, 0 < low <= high")
        self.ratio = _numbers("ratio", ratio, 2, "a (low, high) range, 0 < low <= high")
        for name, (low, high) in (("scale", self.scale), ("ratio", self.ratio)):
            if not 0 < low <= high:
                raise InvalidConfigError(f"{name}={(low, high)!r}: pass a (low, high) range "
                                         "with 0 < low <= high")
        (self.flip,) = _numbers("flip", (flip,), 1, "a probability in [0, 1]", shown=flip)
        if not 0.0 <= self.flip <= 1.0:
            raise InvalidConfigError(f"flip={flip!r}: pass a probability in [0, 1]")
        self.reduced_decode = check_bool("reduced_decode", reduced_decode)
        self.resize = round(self.size / EVAL_CROP)
        self.classes = _classes(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = _samples(self.root, self.classes,
                                tuple(e.lower() for e in extensions))
        self.targets = [target for _path, target in self.samples]
        where = placement or "cpu"
        self.in_effect = Placement(where, 1.0 if where == "cpu" else 0.0, None,
                                   "asked for" if placement else "not measured")
        self.measured: dict[str, Placement] = {}  # by device: measured once, shared by copies
        self.normalised_in = "sample"  # the factory's copies: "collate" or "device"
        self._normaliser = Normaliser(self.mean, self.std)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of one sample as a worker ships it in the CPU placement (the image and a
        target): the most a sample of any placement carries."""
        floats = self.output == "float" and self.normalised_in != "device"
        return 3 * self.size * self.size * (4 if floats else 1) + 8

    def placed(self, placement: Placement, *, normalised_in: str | None = None) -> ImageFolder:
        """A view that decodes where ``placement`` says: each loader the factory makes gets
        its own, so two loaders of one folder never disagree. Everything else is read from
        the folder it was made from, live: a change the user makes there (its file list,
        its crop ranges) reaches the loader, whose workers are restarted for it as for any
        dataset.

        Args:
            placement: where it decodes.
            normalised_in: where a float output is normalised: ``"sample"`` (each sample,
                as a plain ``DataLoader`` needs), ``"collate"`` (a batch at once, in
                ``collate``) or ``"device"`` (the device transform; workers ship uint8);
                ``None`` keeps this one's.
        """
        if placement.where not in PLACEMENTS:
            raise InvalidConfigError(f"placement {placement.where!r}: one of {PLACEMENTS}")
        if normalised_in is not None and normalised_in not in NORMALISED_IN:
            raise InvalidConfigError(f"normalised_in={normalised_in!r}: one of {NORMALISED_IN}")
        view = object.__new__(type(self))
        view.__dict__.update(_origin=self.__dict__.get("_origin", self), in_effect=placement,
                             normalised_in=normalised_in or self.normalised_in)
        return view

    def __getattr__(self, name: str) -> Any:
        # only for what a view (``placed``) does not hold: its folder's, as it is now
        origin = self.__dict__.get("_origin")
        if origin is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(origin, name)

    def _on_cpu(self, index: int) -> bool:
        where = self.in_effect.where
        if where == "split":
            return (index * _GOLDEN) % 1.0 < self.in_effect.cpu_share
        return where == "cpu"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            picture = Picture(path)
            try:
                return self._sample(index, path, picture), target
            finally:
                picture.close()
        except (OSError, SyntaxError, ValueError, pillow().DecompressionBombError) as exc:
            raise DataFileError(path, problem=f"{_BAD_IMAGE}: {exc}") from None

    def _sample(self, index: int, path: str, picture: Picture) -> Any:
        """This sample's draws (the crop box, then the flip, as torchvision's recipe draws
        them), then its image: decoded here, or the file's bytes for the device."""
        box = self._box(*picture.size)
        flip = self.train and torch.rand(1).item() < self.flip
        if self.in_effect.where == "cpu":
            return self._finished(self._pixels(picture, box, flip))
        if not self._on_cpu(index) and _device_decodable(picture) \
                and _whole(picture.data):
            data = torch.frombuffer(bytearray(picture.data), dtype=torch.uint8)
            return _Encoded(path, data, None, box, flip, picture.size[::-1])
        return _Encoded(path, None, self._pixels(picture, box, flip), box, flip,
                        picture.size[::-1])

    def pixels_on_cpu(self, index: int) -> torch.Tensor:
        """Sample ``index``'s image as a worker makes it in the CPU placement when the batches
        go to a device: uint8 ``(3, size, size)``, normalised there."""
        view = self.placed(Placement("cpu", 1.0, None, "pixels_on_cpu"), normalised_in="device")
        return view[index][0]

    def _box(self, width: int, height: int) -> Box:
        if self.train:
            return crop_box(width, height, (self.scale[0], self.scale[1]),
                            (self.ratio[0], self.ratio[1]))
        return 0, 0, height, width  # evaluation resizes the whole image, then crops its center

    def _pixels(self, picture: Picture, box: Box, flip: bool) -> torch.Tensor:
        """uint8 ``(3, size, size)``: the box resized, flipped if ``flip``: within one level
        of what torchvision's transforms make of the Pillow image, unless a reduced decode
        applied (the same picture from fewer pixels)."""
        width, height = picture.size
        size = self.size
        if self.train:  # crop, then resize: RandomResizedCrop's order
            short = min(box[2], box[3])
            at_least = (math.ceil(width * size / short), math.ceil(height * size / short)) \
                if self.reduced_decode and short >= 2 * size else None
            pixels = picture.pixels(at_least)
            box = scaled_box(box, picture.size, pixels.shape[:2])
            return resized(pixels, box, (size, size), flip)
        # Resize(shorter side) then CenterCrop, sizes rounded as torchvision does
        short = min(width, height)
        at_least = (math.ceil(width * self.resize / short),
                    math.ceil(height * self.resize / short)) \
            if self.reduced_decode and short >= 2 * self.resize else None
        pixels = picture.pixels(at_least)
        new_h, new_w, top, left = eval_geometry(width, height, self.resize, size)
        whole = resized(pixels, (0, 0, *pixels.shape[:2]), (new_h, new_w), False)
        out = whole[:, top:top + size, left:left + size]
        return out.flip(-1) if flip else out.contiguous()

    def _finished(self, pixels: torch.Tensor) -> torch.Tensor:
        """A CPU-placement sample: uint8 where it is normalised later (in ``collate``, on the
        device) or never (``output="uint8"``), else normalised here."""
        if self.output == "uint8" or self.normalised_in != "sample":
            return pixels
        return self._normaliser(pixels)

    def collate(self, samples: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        """A batch of ``(images, targets)`` (the factory sets this as ``collate_fn``): the CPU
        placement's images stacked, in shared memory in a worker (as torch's collate does),
        and normalised at once where ``normalised_in="collate"``; otherwise an
        ``EncodedImages`` for ``device_transform``."""
        items = [item for item, _target in samples]
        targets = torch.tensor([target for _item, target in samples])
        if items and not isinstance(items[0], torch.Tensor):
            return encoded_batch(items, self.size), targets
        normalise = self.output == "float" and self.normalised_in == "collate" \
            and (not items or items[0].dtype == torch.uint8)
        dtype = torch.float32 if normalise or not items else items[0].dtype
        out = _batch_memory((len(items), 3, self.size, self.size), dtype)
        if not normalise:
            return (torch.stack(items, out=out) if items else out), targets
        for place, item in zip(out, items):  # uint8 to float: one pass an image
            place.copy_(item)
        return self._normaliser(out, out=out), targets

    def device_transform(self, device: torch.device | str,
                         decoder: Decoder | None = None) -> DeviceDecode:
        """The callable that finishes a batch on ``device`` (``DeviceLoader(transform=)``):
        it decodes a device placement's batches, and normalises uint8 images (the CPU
        placement's, shipped with ``normalised_in="device"``) there."""
        return DeviceDecode(torch.device(device), self.mean, self.std, self.size, decoder,
                            resize=None if self.train else self.resize, output=self.output)

    def normalise_on(self, device: torch.device | str) -> BatchNormalise:
        """The callable that normalises this folder's uint8 batches on ``device`` where the
        CPUs decode them all (no decoder is needed there)."""
        return BatchNormalise(torch.device(device), self._normaliser)

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root!r}, {len(self.samples)} images, "
                f"{len(self.classes)} classes, train={self.train}, size={self.size}, "
                f"placement={self.in_effect.where!r})")


def image_folder_in(dataset: Any) -> ImageFolder | None:
    """The ``ImageFolder`` under ``dataset``'s ``Subset`` wrappers (splits), if it is one."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, ImageFolder) else None


def with_images(dataset: Any, images: ImageFolder) -> Any:
    """``dataset`` with ``images`` in place of the ``ImageFolder`` under its ``Subset``s."""
    if isinstance(dataset, torch.utils.data.Subset):
        view = copy.copy(dataset)  # a Subset subclass keeps its own methods
        view.dataset = with_images(dataset.dataset, images)
        return view
    return images


def _device_decodable(picture: Picture) -> bool:
    """A baseline colour JPEG, upright: what every device decoder takes as the CPU path
    reads it (not progressive, CMYK or grayscale; TorchCodec turns a file by its EXIF
    orientation where torchvision's loader and the CPU path do not, so the crop box drawn on
    the stored size could fall outside it)."""
    image = picture.image or pillow().open(io.BytesIO(picture.data))
    return (image.format == "JPEG" and image.mode == "RGB"
            and not image.info.get("progressive") and not image.info.get("progression")
            and image.getexif().get(_ORIENTATION, 1) == 1)


def _whole(data: bytes) -> bool:
    """An end-of-image marker near the end of a file's bytes. Without one (truncated, or a
    long trailer) the worker decodes it, and names the file if it is truncated."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) >= 0


def _batch_memory(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch, in shared memory in a worker: the worker writes it once, and torch
    passes it to the loop without copying it there (``default_collate`` does the same)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def encoded_batch(items: Sequence[_Encoded], size: int) -> EncodedImages:
    """Pack device-placement samples into one ``EncodedImages``."""
    # largest box first: DeviceDecode takes runs of similar sizes, padded little
    encoded = sorted((i for i, item in enumerate(items) if item.data is not None),
                     key=lambda i: -items[i].box[2] * items[i].box[3])
    decoded = [i for i, item in enumerate(items) if item.data is None]
    datas = [items[i].data for i in encoded]
    lengths = torch.tensor([0] + [len(d) for d in datas if d is not None])
    ready = [items[i].ready for i in decoded]
    return EncodedImages(
        data=torch.cat([d for d in datas if d is not None]) if datas
        else torch.empty(0, dtype=torch.uint8),
        offsets=torch.cumsum(lengths, 0),
        encoded=torch.tensor(encoded, dtype=torch.long),
        ready=torch.stack([r for r in ready if r is not None]) if ready
        else torch.empty(0, 3, size, size, dtype=torch.uint8),
        decoded=torch.tensor(decoded, dtype=torch.long),
        boxes=torch.tensor([items[i].box for i in encoded], dtype=torch.long).view(-1, 4),
        flips=torch.tensor([items[i].flip for i in encoded], dtype=torch.bool),
        sizes=torch.tensor([items[i].size for i in encoded], dtype=torch.long).view(-1, 2),
        paths=tuple(item.path for item in items))


class Normaliser:
    """uint8 images to the floats of ``ToTensor`` then ``Normalize`` (within float rounding,
    ~1e-6) in two passes over the images: scaled and shifted per channel, with the constants
    made once, on ``device``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu") -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        values = torch.tensor([[1 / (255 * s) for s in self.std],
                               [-m / s for m, s in zip(self.mean, self.std)]])
        self.scale, self.shift = values.view(2, 3, 1, 1).to(device).unbind(0)

    def __call__(self, pixels: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels`` (``(..., 3, h, w)``, on the constants' device) normalised, in ``out``
        (a new float tensor by default; ``pixels`` itself if it is float already)."""
        if out is None:
            out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        if out is not pixels:
            out.copy_(pixels)
        return out.mul_(self.scale).add_(self.shift)


class BatchNormalise:
    """Normalises a batch's uint8 images on ``device`` (``DeviceLoader(transform=)``); other
    batches pass through."""

    def __init__(self, device: torch.device, normaliser: Normaliser) -> None:
        self.device = device
        self.normaliser = Normaliser(normaliser.mean, normaliser.std, device)

    def __call__(self, batch: Any) -> Any:
        if not (isinstance(batch, (tuple, list)) and batch
                and isinstance(batch[0], torch.Tensor) and batch[0].dtype == torch.uint8):
            return batch
        return _replaced(batch, self.normaliser(batch[0]))

    def __repr__(self) -> str:
        return f"BatchNormalise(device={str(self.device)!r})"


class DeviceDecode:
    """Finishes a device-placement batch on ``device``: decodes the files (batched), crops,
    resizes (bilinear, antialiased), flips and normalises; the images the workers decoded are
    normalised and put back in their places. A batch of uint8 images (the CPU placement's)
    is normalised; other batches pass through. With ``output="uint8"`` nothing is
    normalised.

    A file the device decoder refuses is decoded with Pillow; one Pillow cannot read either
    is a ``DataFileError`` naming it.
    """

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 size: int, decoder: Decoder | None = None, *,
                 resize: int | None = None, output: str = "float") -> None:
        self.device = device = canonical_device(device)
        self.size, self.resize, self.output = size, resize, output
        self.normaliser = Normaliser(mean, std, device)
        self._stream: Any = None  # the decoder's own CUDA stream (made on first use)
        self._warned = False
        if decoder is None:
            found = decoder_for(device)
            if found is None:
                raise InvalidConfigError(
                    f"placement='device' on {device}: no JPEG decoder for it is installed: "
                    "pip install torchcodec (or torchvision), or pass placement='cpu'")
            self.decoder_name, decoder = found
        else:
            self.decoder_name = getattr(decoder, "__name__", type(decoder).__name__)
        self.decoder: Decoder = decoder

    def __call__(self, batch: Any) -> Any:
        if not (isinstance(batch, (tuple, list)) and batch):
            return batch
        if isinstance(batch[0], EncodedImages):
            images = self.images(batch[0])
        elif isinstance(batch[0], torch.Tensor) and batch[0].dtype == torch.uint8 \
                and self.output == "float":
            images = self.normaliser(batch[0])
        else:
            return batch
        return _replaced(batch, images)

    def images(self, batch: EncodedImages) -> torch.Tensor:
        """``(n, 3, size, size)`` images on the device: normalised floats, or uint8 where
        ``output="uint8"``. The files are taken in groups of similar sizes (the workers sort
        them by box, largest first) of at most ``RESIZE_IMAGES`` images and
        ``RESIZE_PIXELS`` padded pixels: each group is decoded, cropped (views), padded,
        then resized and flipped in two batched products (``sources._resize``), and freed
        before the next. Every index and box on the device is the batch's own (pinned)
        tensor, copied without holding the host."""
        device = self.device
        out = torch.empty(len(batch), 3, self.size, self.size, device=device)
        if len(batch.decoded):
            out[batch.decoded.to(device, non_blocking=True)] = batch.ready.to(
                device, non_blocking=True).float()
        shapes = [(h, w) for _top, _left, h, w in batch.boxes.tolist()]  # host copies
        places = batch.encoded.to(device, non_blocking=True)
        boxes = batch.boxes.to(device, non_blocking=True)
        flips = batch.flips.to(device, non_blocking=True)
        sizes = batch.sizes.to(device, non_blocking=True)
        pixels = batch.sizes.prod(1).tolist()
        for part in _groups(shapes, RESIZE_IMAGES, RESIZE_PIXELS):
            files = [batch.file(i) for i in range(part.start, part.stop)]
            decoded = self._decoded(files, pixels[part], batch, part.start)
            if self.resize is None:  # the boxes only: a crop is a view
                crops = [image[:, top:top + h, left:left + w] for image, (top, left, h, w)
                         in zip(decoded, batch.boxes[part].tolist())]
                at_origin = torch.cat([torch.zeros_like(boxes[part, :2]), boxes[part, 2:]], 1)
                made = resized_crops(_padded(crops, device), at_origin, self.size, flips[part])
            else:
                made = resized_centers(_padded(decoded, device), sizes[part, 0],
                                       sizes[part, 1], self.resize, self.size)
            out[places[part]] = made.clamp_(0, 255).round_()  # whole levels, as on the CPU
            del decoded, made
        return self.normaliser(out, out=out) if self.output == "float" else out.to(torch.uint8)

    def _decode(self, files: list[torch.Tensor],
                pixels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The decoder's images, in calls of at most ``DECODE_PIXELS`` pixels (a batch of
        high-resolution photos would otherwise ask for gigabytes at once). On CUDA it runs on
        a stream of its own that first waits for the work queued on this one: nvJPEG writes
        on a private stream without waiting for the stream its outputs are allocated on, so
        memory freed by queued kernels must not be handed to it early; its outputs are then
        marked as used here."""
        images: list[torch.Tensor] = []
        for part in _parts(files, pixels or [0] * len(files), DECODE_PIXELS):
            images += self._decode_part(part)
        return images

    def _decode_part(self, files: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            return self.decoder(files, self.device)
        here = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(here)
        with torch.cuda.stream(self._stream):
            images = self.decoder(files, self.device)
        here.wait_stream(self._stream)
        for image in images:
            image.record_stream(here)
        return images

    def _decoded(self, files: list[torch.Tensor], pixels: Sequence[int],
                 batch: EncodedImages, first: int = 0) -> list[torch.Tensor]:
        """``files`` decoded (the ``first``-th encoded file of ``batch`` onwards)."""
        if not files:
            return []
        try:
            return self._decode(files, pixels)
        except Exception as exc:  # find the file: one at a time, Pillow where the decoder fails
            if not self._warned:
                self._warned = True
                log.warning("the %s JPEG decoder failed on a batch (%s: %s): decoding its "
                            "files one at a time, with Pillow where it fails", self.decoder_name,
                            type(exc).__name__, exc)
            images = []
            for i, data in enumerate(files):
                try:
                    images += self._decode([data])
                except Exception:
                    images.append(_with_pillow(
                        data, batch.paths[int(batch.encoded[first + i])], self.device))
            return images

    def __repr__(self) -> str:
        return f"DeviceDecode(device={str(self.device)!r}, decoder={self.decoder_name!r})"


def _padded(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 ``(n, 3, H, W)``: each image at the top left, zeros around it (one copy each)."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = torch.zeros(len(images), 3, height, width, dtype=torch.uint8, device=device)
    for place, image in zip(padded, images):
        place[:, :image.shape[-2], :image.shape[-1]] = image
    return padded


def _replaced(batch: Sequence[Any], images: torch.Tensor) -> Any:
    """``batch`` (a list or tuple) with ``images`` in its first place."""
    return type(batch)([images, *batch[1:]]) if isinstance(batch, list) \
        else (images, *batch[1:])


def _groups(shapes: Sequence[tuple[int, int]], most_images: int,
            most_pixels: int) -> list[slice]:
    """Runs of ``shapes`` (height, width) in order, each at most ``most_images`` long and
    ``most_pixels`` once padded to its largest height and width (a larger one alone)."""
    groups: list[slice] = []
    start, high, wide = 0, 0, 0
    for i, (h, w) in enumerate(shapes):
        taller, wider = max(high, h), max(wide, w)
        if i > start and (i - start >= most_images
                          or (i - start + 1) * taller * wider > most_pixels):
            groups.append(slice(start, i))
            start, taller, wider = i, h, w
        high, wide = taller, wider
    if shapes:
        groups.append(slice(start, len(shapes)))
    return groups


def _parts(files: list[torch.Tensor], pixels: Sequence[int],
           most: int) -> list[list[torch.Tensor]]:
    """``files`` in order, in runs of at most ``most`` pixels (a larger file alone)."""
    parts: list[list[torch.Tensor]] = []
    total = most + 1
    for data, count in zip(files, pixels):
        if total + count > most:
            parts.append([])
            total = 0
        parts[-1].append(data)
        total += count
    return parts


def _with_pillow(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    try:
        return decode_with_pillow([data], device)[0]
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataFileError(path, problem=f"{_BAD_IMAGE}: {exc}") from None
