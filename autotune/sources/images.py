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
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .._check import check_bool, check_int
from ..errors import DataFileError, InvalidConfigError
from ..policy.placement import PLACEMENTS, Placement
from ._jpeg import Decoder, decode_with_pillow, decoder_for

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_CROP = 0.875  # 224 of 256: the ImageNet evaluation's center crop
_GOLDEN = 0.6180339887498949  # spreads a split's CPU share evenly over the indices
_BAD_IMAGE = "cannot be decoded as an image (corrupt, truncated or not an image file)"

Box = tuple[int, int, int, int]  # top, left, height, width in the file's pixels


def crop_box(width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3),
             generator: torch.Generator | None = None) -> Box:
    """``RandomResizedCrop``'s draw: ten tries at a random area share and log-uniform aspect
    ratio that fit the image, else the largest center crop within ``ratio``."""
    area = width * height
    low, high = torch.log(torch.tensor(ratio)).tolist()  # float32, as torchvision rounds them
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
        paths: every file of the batch, in batch order.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    encoded: torch.Tensor
    ready: torch.Tensor
    decoded: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, *_args: Any, **_kwargs: Any) -> EncodedImages:
        """Itself: the decoder reads the bytes from host memory (pinned by the loader)."""
        return self

    def pin_memory(self) -> EncodedImages:
        """Pinned copies (the DataLoader's pin-memory thread calls this)."""
        return dataclasses.replace(self, data=self.data.pin_memory(),
                                   ready=self.ready.pin_memory())

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
    samples = []
    for index, name in enumerate(classes):
        for folder, _dirs, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, file), index) for file in sorted(files)
                        if file.lower().endswith(extensions)]
    if not samples:
        raise InvalidConfigError(f"root={root!r} has no image files ({', '.join(extensions)}) "
                                 "in its class folders")
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
        reduced_decode: let Pillow decode a JPEG at 1/2, 1/4 or 1/8 of its size when the crop
            is at least that much larger than ``size`` (CPU placement).
        extensions: the file names (lower case endings) taken as images.

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
    """

    def __init__(self, root: str | os.PathLike[str], *, train: bool = True, size: int = 224,
                 placement: str | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5,
                 reduced_decode: bool = True, extensions: Sequence[str] = EXTENSIONS) -> None:
        self.root = os.fspath(root)
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

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of one sample as the CPU placement makes it (a float32 image and a target):
        the most a sample of any placement carries."""
        return 3 * self.size * self.size * 4 + 8

    def placed(self, placement: Placement) -> ImageFolder:
        """A copy that decodes where ``placement`` says (the file list is shared): each loader
        the factory makes gets its own, so two loaders of one folder never disagree."""
        if placement.where not in PLACEMENTS:
            raise InvalidConfigError(f"placement {placement.where!r}: one of {PLACEMENTS}")
        view = copy.copy(self)
        view.in_effect = placement
        return view

    def _on_cpu(self, index: int) -> bool:
        where = self.in_effect.where
        if where == "split":
            return (index * _GOLDEN) % 1.0 < self.in_effect.cpu_share
        return where == "cpu"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        if self.in_effect.where == "cpu":
            return self.decode_on_cpu(index), target

        def sample(image: Any, box: Box, flip: bool) -> _Encoded:
            if not self._on_cpu(index) and _device_decodable(image):
                data = _read(path)
                if data is not None:
                    return _Encoded(path, data, None, box, flip)
            return _Encoded(path, None, self._pixels(image, box, flip), box, flip)

        return self._opened(path, sample), target

    def decode_on_cpu(self, index: int) -> torch.Tensor:
        """Sample ``index``'s image as the CPU placement makes it: a normalised float
        ``(3, size, size)`` tensor."""
        path, _target = self.samples[index]
        return self._opened(path, lambda image, box, flip: self._normalised(
            self._pixels(image, box, flip)))

    def _opened(self, path: str, make: Callable[[Any, Box, bool], Any]) -> Any:
        """``make(image, box, flip)`` with the file open (its header read) and this sample's
        draws made: the crop box, then the flip, as torchvision's recipe draws them."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                box = self._box(*image.size)
                flip = self.train and torch.rand(1).item() < self.flip
                return make(image, box, flip)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataFileError(path, problem=f"{_BAD_IMAGE}: {exc}") from None

    def _box(self, width: int, height: int) -> Box:
        if self.train:
            return crop_box(width, height, self.scale, self.ratio)
        return 0, 0, height, width  # evaluation resizes the whole image, then crops its center

    def _pixels(self, image: Any, box: Box, flip: bool) -> torch.Tensor:
        """uint8 ``(3, size, size)``: the box of ``image`` resized, flipped if ``flip``; pixel
        for pixel what torchvision's transforms make of the Pillow image, unless a reduced
        decode applied (the same picture from fewer pixels)."""
        from PIL import Image

        top, left, h, w = box
        width, height = image.size
        short = min(h, w) if self.train else min(width, height) * self.size / self.resize
        if self.reduced_decode and image.format == "JPEG" and short >= 2 * self.size:
            # a DCT-scaled decode at 1/2..1/8 that still has >= size pixels across the box
            image.draft("RGB", (math.ceil(width * self.size / short),
                                math.ceil(height * self.size / short)))
            sx, sy = image.size[0] / width, image.size[1] / height
            top, left = round(top * sy), round(left * sx)
            h = min(round(h * sy), image.size[1] - top)
            w = min(round(w * sx), image.size[0] - left)
        rgb = image.convert("RGB")
        if self.train:  # crop, then resize: RandomResizedCrop's order
            out = rgb.crop((left, top, left + w, top + h)).resize(
                (self.size, self.size), Image.Resampling.BILINEAR)
        else:  # Resize(shorter side) then CenterCrop, sizes rounded as torchvision does
            short_side, long_side = sorted(rgb.size)
            long_new = int(self.resize * long_side / short_side)
            new = (self.resize, long_new) if rgb.size[0] <= rgb.size[1] \
                else (long_new, self.resize)
            resized = rgb.resize(new, Image.Resampling.BILINEAR)
            x = round((new[0] - self.size) / 2.0)
            y = round((new[1] - self.size) / 2.0)
            out = resized.crop((x, y, x + self.size, y + self.size))
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.frombuffer(bytearray(out.tobytes()), dtype=torch.uint8)
        return pixels.view(self.size, self.size, 3).permute(2, 0, 1).contiguous()

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise(pixels.unsqueeze(0), self.mean, self.std)[0]

    def collate(self, samples: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        """A batch of ``(images, targets)``: the CPU placement's images stacked; otherwise an
        ``EncodedImages`` for ``device_transform`` (the factory sets this as ``collate_fn``)."""
        items = [item for item, _target in samples]
        targets = torch.tensor([target for _item, target in samples])
        if not items or isinstance(items[0], torch.Tensor):
            return (torch.stack(items) if items
                    else torch.empty(0, 3, self.size, self.size)), targets
        return encoded_batch(items, self.size), targets

    def device_transform(self, device: torch.device | str,
                         decoder: Decoder | None = None) -> DeviceDecode:
        """The callable that finishes a batch on ``device`` (``DeviceLoader(transform=)``)."""
        return DeviceDecode(torch.device(device), self.mean, self.std, self.size, decoder,
                            resize=None if self.train else self.resize)

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


def _device_decodable(image: Any) -> bool:
    """A baseline colour JPEG: what every device decoder takes (not progressive, not CMYK,
    not grayscale)."""
    return (image.format == "JPEG" and image.mode == "RGB"
            and not image.info.get("progressive") and not image.info.get("progression"))


def _read(path: str) -> torch.Tensor | None:
    """The file's bytes; ``None`` without an end-of-image marker near its end (truncated, or
    a long trailer): Pillow in the worker decides, and names the file if it is truncated."""
    with open(path, "rb") as file:
        data = file.read()
    if data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) < 0:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def encoded_batch(items: Sequence[_Encoded], size: int) -> EncodedImages:
    """Pack device-placement samples into one ``EncodedImages``."""
    encoded = [i for i, item in enumerate(items) if item.data is not None]
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
        paths=tuple(item.path for item in items))


def normalise(pixels: torch.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(n, 3, h, w)`` to float, scaled to [0, 1] and normalised per channel, in
    ``ToTensor`` and ``Normalize``'s order of operations (the same floats)."""
    shape = (1, 3, 1, 1)
    return pixels.float().div_(255).sub_(torch.tensor(mean, device=pixels.device).view(shape)) \
        .div_(torch.tensor(std, device=pixels.device).view(shape))


class DeviceDecode:
    """Finishes a device-placement batch on ``device``: decodes the files (batched), crops,
    resizes (bilinear, antialiased), flips and normalises; the images the workers decoded are
    normalised and put back in their places. Other batches pass through.

    A file the device decoder refuses is decoded with Pillow; one Pillow cannot read either
    is a ``DataFileError`` naming it.
    """

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 size: int, decoder: Decoder | None = None, *,
                 resize: int | None = None) -> None:
        self.device = device
        self.mean, self.std, self.size, self.resize = tuple(mean), tuple(std), size, resize
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
        if not (isinstance(batch, (tuple, list)) and batch
                and isinstance(batch[0], EncodedImages)):
            return batch
        images = self.images(batch[0])
        return type(batch)([images, *batch[1:]]) if isinstance(batch, list) \
            else (images, *batch[1:])

    def images(self, batch: EncodedImages) -> torch.Tensor:
        """Normalised float ``(n, 3, size, size)`` images on the device."""
        out = torch.empty(len(batch), 3, self.size, self.size, device=self.device)
        if len(batch.decoded):
            out[batch.decoded.to(self.device)] = batch.ready.to(
                self.device, non_blocking=True).float()
        files = [batch.file(i) for i in range(len(batch.encoded))]
        places, boxes, flips = (batch.encoded.tolist(), batch.boxes.tolist(),
                                batch.flips.tolist())
        for image, place, box, flip in zip(self._decoded(files, batch), places, boxes, flips):
            resized = self._resized(image, box)
            # rounded to whole levels like the workers' uint8 images
            out[place] = (resized.flip(-1) if flip else resized).clamp_(0, 255).round_()
        return normalise(out, self.mean, self.std)

    def _resized(self, image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
        """Training: the box resized to ``size``. Evaluation: the whole image resized as the
        CPU placement does (shorter side to ``resize``), then the same center crop."""
        def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            return torch.nn.functional.interpolate(
                x.unsqueeze(0).float(), size=size, mode="bilinear", antialias=True,
                align_corners=False)[0]

        if self.resize is None:
            top, left, h, w = box
            return bilinear(image[:, top:top + h, left:left + w], (self.size, self.size))
        height, width = image.shape[-2:]
        long_new = int(self.resize * max(width, height) / min(width, height))
        new_h, new_w = (long_new, self.resize) if width <= height else (self.resize, long_new)
        whole = bilinear(image, (new_h, new_w))
        y, x = round((new_h - self.size) / 2.0), round((new_w - self.size) / 2.0)
        return whole[:, y:y + self.size, x:x + self.size]

    def _decode(self, files: list[torch.Tensor]) -> list[torch.Tensor]:
        """The decoder's images. On CUDA it runs on a stream of its own that first waits for
        the work queued on this one: nvJPEG writes on a private stream without waiting for the
        stream its outputs are allocated on, so memory freed by queued kernels must not be
        handed to it early; its outputs are then marked as used here."""
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

    def _decoded(self, files: list[torch.Tensor], batch: EncodedImages) -> list[torch.Tensor]:
        if not files:
            return []
        try:
            return self._decode(files)
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
                    images.append(_with_pillow(data, batch.paths[int(batch.encoded[i])],
                                               self.device))
            return images

    def __repr__(self) -> str:
        return f"DeviceDecode(device={str(self.device)!r}, decoder={self.decoder_name!r})"


def _with_pillow(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    try:
        return decode_with_pillow([data], device)[0]
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataFileError(path, problem=f"{_BAD_IMAGE}: {exc}") from None
