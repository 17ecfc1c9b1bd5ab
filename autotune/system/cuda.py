"""What this process sees of its CUDA devices: one spelling per device, and the UUID NVML
knows it by.

``cuda`` and ``cuda:0`` are one GPU; caches kept per device (the JPEG decoder, a measured
placement) would hold two entries and two decoders for it. Under ``CUDA_VISIBLE_DEVICES``
torch's index is not NVML's (NVML counts every GPU of the machine): the UUID is the same in
both.
"""

from __future__ import annotations

from typing import Any


def canonical_device(device: Any) -> Any:
    """``device`` (a ``torch.device`` or a string) with a CUDA index: ``cuda`` is the current
    device (as it is, where torch has no CUDA: nothing will run there)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def cuda_uuid(index: int) -> str | None:
    """NVML's UUID (``GPU-...``) of torch's CUDA device ``index``; ``None`` where torch does
    not say (an older torch, or no CUDA)."""
    import torch

    try:
        uuid = torch.cuda.get_device_properties(index).uuid
    except Exception:  # no CUDA, or a torch without the field
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
