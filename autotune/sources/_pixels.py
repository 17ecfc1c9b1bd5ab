"""``ImageFolder``'s CPU path: a file to a uint8 ``(3, H, W)`` image, no float until the batch.

The decoder was chosen by measurement (one CPU, JPEGs of 400-600 px from photographs, see
``bench/RESULTS-images.md``): simplejpeg (a libjpeg-turbo wheel) decodes in 0.53 ms where
Pillow's open, decode and ``convert("RGB")`` take 0.72, and gives the same pixels (both are
libjpeg-turbo's accurate IDCT with fancy upsampling). It is used for the JPEGs it decodes as
Pillow does (YCbCr and grayscale); Pillow reads every other file, and all of them where
simplejpeg is not installed. Neither library offers a region decode; both offer libjpeg's
DCT-scaled decode (1/2, 1/4, 1/8), taken when the pixels needed still fit.

Crop and resize run in torch's uint8 antialiased bilinear kernel on a channels-last copy of
the box (0.14 ms for a 300 px box to 224, against Pillow's 0.79; within one level of Pillow's
``resize(BILINEAR)``, 0.15 on average).
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import numpy as np
import torch

Box = tuple[int, int, int, int]  # top, left, height, width in the file's pixels
SCALES = (8, 4, 2)  # libjpeg's DCT-scaled decodes (1/8, 1/4, 1/2), as Pillow's draft takes
_SOI = b"\xff\xd8"  # a JPEG's first bytes
_SAME_AS_PILLOW = ("YCbCr", "Gray")  # colour spaces simplejpeg turns to RGB as Pillow does


@functools.cache
def simplejpeg() -> Any:
    """The simplejpeg module, or ``None`` where it is not installed (Pillow decodes)."""
    try:
        import simplejpeg as module
    except ImportError:
        return None
    return module


def pillow() -> Any:
    """Pillow's ``Image`` module, or an ``ImportError`` that says how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("ImageFolder reads images with Pillow: pip install "
                          "'autotune[images]' (Pillow and simplejpeg)") from None
    return Image


class Picture:
    """An image file opened for the CPU path: its size read from the header, decoded on
    ``pixels()``.

    Attributes:
        size: ``(width, height)`` in the file's pixels.
        image: the Pillow image where Pillow decodes it (``None`` where simplejpeg does).
    """

    def __init__(self, path: str) -> None:
        with open(path, "rb") as file:
            self.data = file.read()
        self.image: Any = None
        module = simplejpeg()
        if module is not None and self.data.startswith(_SOI):
            try:
                height, width, colour, _subsampling = module.decode_jpeg_header(self.data)
            except ValueError:  # Pillow decides: it may read the file, or says what is wrong
                colour = None
            if colour in _SAME_AS_PILLOW:
                self.size = (width, height)
                return
        self.image = pillow().open(io.BytesIO(self.data))
        self.size = self.image.size

    def pixels(self, at_least: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 ``(H, W, 3)`` RGB; decoded at 1/2, 1/4 or 1/8 of the file's size where
        that still has ``at_least`` ``(width, height)`` pixels."""
        scale = _scale(self.size, at_least)
        if self.image is None:
            if scale == 1:
                return simplejpeg().decode_jpeg(self.data, colorspace="RGB")
            width, height = self.size
            return simplejpeg().decode_jpeg(self.data, colorspace="RGB", min_factor=scale,
                                            min_width=math.ceil(width / scale),
                                            min_height=math.ceil(height / scale))
        image = self.image
        if scale > 1 and image.format == "JPEG":
            image.draft("RGB", (math.ceil(self.size[0] / scale), math.ceil(self.size[1] / scale)))
        rgb = image.convert("RGB")
        return np.frombuffer(bytearray(rgb.tobytes()), dtype=np.uint8).reshape(
            rgb.height, rgb.width, 3)

    def close(self) -> None:
        if self.image is not None:
            self.image.close()


def _scale(size: tuple[int, int], at_least: tuple[int, int] | None) -> int:
    """The largest of libjpeg's reductions that keeps ``at_least`` pixels (1: none)."""
    if at_least is None:
        return 1
    room = min(size[0] // max(at_least[0], 1), size[1] // max(at_least[1], 1))
    return next((scale for scale in SCALES if room >= scale), 1)


def resized(pixels: np.ndarray, box: Box, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """uint8 ``(3, *size)``: ``box`` of ``pixels`` (``(H, W, 3)``) resized with torch's
    antialiased bilinear, flipped left to right if ``flip``."""
    top, left, h, w = box
    crop = torch.from_numpy(pixels[top:top + h, left:left + w]).permute(2, 0, 1).unsqueeze(0)
    # a channels-last copy of the box: the kernel's fast path (a strided view is ~1.5x slower)
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    return out.flip(-1) if flip else out


def scaled_box(box: Box, size: tuple[int, int], decoded: tuple[int, int]) -> Box:
    """``box`` in the file's pixels (``size``: width, height) in a decode of ``decoded``
    ``(height, width)`` pixels."""
    if decoded == (size[1], size[0]):
        return box
    sy, sx = decoded[0] / size[1], decoded[1] / size[0]
    top, left = round(box[0] * sy), round(box[1] * sx)
    return top, left, min(round(box[2] * sy), decoded[0] - top), \
        min(round(box[3] * sx), decoded[1] - left)


def eval_geometry(width: int, height: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """``Resize(resize)`` then ``CenterCrop(size)`` of a ``width`` x ``height`` image, sizes
    rounded as torchvision rounds them: ``(new_height, new_width, top, left)``."""
    long_new = int(resize * max(width, height) / min(width, height))
    new_h, new_w = (long_new, resize) if width <= height else (resize, long_new)
    return new_h, new_w, round((new_h - size) / 2.0), round((new_w - size) / 2.0)
