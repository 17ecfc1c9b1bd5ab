"""The one boundary to a batched JPEG decoder: TorchCodec's where installed, else torchvision's
(deprecated there since 0.29 in favour of TorchCodec), else Pillow on the CPU.

Each decoder takes a list of 1-D uint8 CPU tensors (a file's bytes) and returns a list of
uint8 ``(3, H, W)`` RGB tensors on ``device``. Both libraries are optional and imported only
here, only when asked: a torchvision built for another torch fails to import (``torchvision::nms
does not exist``), which counts as absent.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from typing import Any

import torch

Decoder = Callable[[Sequence[torch.Tensor], torch.device], list[torch.Tensor]]


@functools.cache
def _library() -> tuple[str, Any] | None:
    """``(name, decode_jpeg)`` of the first decoder library that imports, else ``None``."""
    try:
        from torchcodec.decoders import decode_jpeg  # type: ignore[import-not-found]

        return "torchcodec", decode_jpeg
    except Exception:  # absent, or built for another torch
        pass
    try:
        from torchvision.io import decode_jpeg  # type: ignore[import-not-found]

        return "torchvision", decode_jpeg
    except Exception:  # absent, or built for another torch
        return None


def _with_library(decode: Any, datas: Sequence[torch.Tensor],
                  device: torch.device) -> list[torch.Tensor]:
    try:
        images = decode(list(datas), mode="RGB", device=device)
    except TypeError:  # a decoder that takes one image at a time
        images = [decode(data, mode="RGB", device=device) for data in datas]
    return list(images)


def decode_with_pillow(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The Pillow decoder: one image at a time, on the CPU, then moved to ``device``."""
    from PIL import Image

    images = []
    for data in datas:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            rgb = image.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        images.append(pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).to(device))
    return images


def decoder_for(device: torch.device) -> tuple[str, Decoder] | None:
    """``(name, decoder)`` for ``device``: a library decoder (nvJPEG on CUDA), or Pillow for
    the CPU when neither library imports; ``None`` for a device no installed library reaches."""
    found = _library()
    if found is not None:
        name, decode = found
        return name, functools.partial(_with_library, decode)
    if device.type == "cpu":
        return "pillow", decode_with_pillow
    return None
