"""The one boundary to a batched JPEG decoder: TorchCodec's where installed, else torchvision's
(deprecated there since 0.29 in favour of TorchCodec), else Pillow on the CPU. A library is
used only after it decoded a small JPEG right on the device (their APIs change between
versions).

Each decoder takes a list of 1-D uint8 CPU tensors (a file's bytes) and returns a list of
uint8 ``(3, H, W)`` RGB tensors on ``device``. Both libraries are optional and imported only
here, only when asked: a torchvision built for another torch fails to import (``torchvision::nms
does not exist``), which counts as absent.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..system.cuda import canonical_device

log = logging.getLogger(__name__)

Decoder = Callable[[Sequence[torch.Tensor], torch.device], list[torch.Tensor]]


def _libraries() -> list[tuple[str, Any]]:
    """``(name, decode_jpeg)`` of each decoder library that imports, preferred first."""
    found = []
    try:
        from torchcodec.decoders import decode_jpeg

        found.append(("torchcodec", decode_jpeg))
    except Exception:  # absent, or built for another torch
        pass
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        def torchvision_rgb(data: Any, *, mode: str, device: torch.device) -> Any:
            # torchvision before 0.20 takes only its enum (a string fails on .value)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

        found.append(("torchvision", torchvision_rgb))
    except Exception:  # absent, or built for another torch
        pass
    return found


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


def _probe_jpeg() -> torch.Tensor:
    """A 16 x 8 baseline RGB JPEG's bytes, to try a decoder on."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 100, 50)).save(out, format="JPEG")
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


@functools.cache
def _working(device: torch.device) -> tuple[str, Decoder] | None:
    """The first library decoder that decodes a small JPEG right on ``device`` (an API that
    changed between versions fails here, once, not on every batch)."""
    probe = _probe_jpeg()
    for name, decode in _libraries():
        decoder = functools.partial(_with_library, decode)
        try:
            images = _tried(decoder, [probe, probe], device)
            if len(images) == 2 and tuple(images[0].shape) == (3, 8, 16) \
                    and images[0].device.type == device.type:
                return name, decoder
        except Exception as exc:  # another API or a broken install: try the next one
            log.info("the %s JPEG decoder does not work on %s: %s", name, device, exc)
    return None


def _tried(decoder: Decoder, datas: list[torch.Tensor],
           device: torch.device) -> list[torch.Tensor]:
    """``decoder`` on ``datas``; on CUDA after the device is idle, on a stream of its own,
    waited for: nothing queued elsewhere reads memory a decoder may write while it works."""
    if device.type != "cuda":
        return decoder(datas, device)
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        images = decoder(datas, device)
    stream.synchronize()
    return images


def decoder_for(device: torch.device) -> tuple[str, Decoder] | None:
    """``(name, decoder)`` for ``device``: a library decoder that works there (nvJPEG on
    CUDA), else Pillow for the CPU and devices without one (decoded on the CPU, then moved);
    ``None`` for CUDA without a working library. ``cuda`` is the current ``cuda:N``: one
    decoder per GPU however it is spelled (torchvision keeps one global decoder and rebuilds
    it for another spelling)."""
    device = canonical_device(device)
    if device.type in ("cpu", "cuda"):
        found = _working(device)
        if found is not None:
            return found
    if device.type == "cuda":
        return None
    return "pillow", decode_with_pillow
