"""Many crops resized at once: torch's antialiased bilinear as two batched matrix products.

The antialiased bilinear is separable: each output row is a weighted sum of input rows, each
output column of input columns, with the weights torch's ``interpolate(antialias=True)``
computes (Pillow's). For a batch of images of different sizes the weights of each image
are rows of a matrix over the padded batch: ``out = Wy @ X @ Wx^T`` makes every crop of the
batch in two products, where a loop makes ~7 kernels an image (~1,800 for a batch of 256).
A crop is where its weights are not zero; a flip is the column weights reversed; the
evaluation's resize-then-center-crop is the resize's weights for the rows it keeps.

Every step is a tensor operation on the batch's own tensors: on CUDA nothing waits for the
host.
"""

from __future__ import annotations

import torch


def weights(start: torch.Tensor, length: torch.Tensor, total: torch.Tensor,
            first: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """``(n, count, width)`` float32: for image k, outputs ``first[k]`` to ``first[k] +
    count`` of resizing input positions ``start[k]`` to ``start[k] + length[k]`` to
    ``total[k]`` outputs, over ``width`` padded input positions.

    torch's formula (``_compute_indices_min_size_weights_aa``): ``scale = length / total``;
    a support of ``max(scale, 1)``; the taps ``[floor(center - support + 0.5), floor(center +
    support + 0.5))`` within the input; the triangle filter at ``(j - center + 0.5) /
    max(scale, 1)``; each row normalised to 1.
    """
    length, total = length.double(), total.double()
    scale = (length / total)[:, None, None]
    support = torch.clamp(scale, min=1.0)
    out = torch.arange(count, device=start.device, dtype=torch.float64)[None, :, None] \
        + first.double()[:, None, None]
    center = scale * (out + 0.5)
    low = torch.clamp(torch.floor(center - support + 0.5), min=0)
    high = torch.minimum(torch.floor(center + support + 0.5), length[:, None, None])
    position = torch.arange(width, device=start.device, dtype=torch.float64)[None, None, :] \
        - start.double()[:, None, None]
    taps = torch.clamp(1 - torch.abs((position - center + 0.5) / support), min=0)
    taps = taps * ((position >= low) & (position < high))
    return (taps / taps.sum(-1, keepdim=True).clamp(min=1e-12)).float()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int,
                  flips: torch.Tensor) -> torch.Tensor:
    """Float ``(n, c, size, size)``: box k (top, left, height, width) of ``images[k]``
    (``(n, c, H, W)``, padded) resized, flipped left to right where ``flips[k]``."""
    n = len(images)
    first = torch.zeros(n, dtype=torch.long, device=images.device)
    side = torch.full_like(first, size)
    rows = weights(boxes[:, 0], boxes[:, 2], side, first, size, images.shape[-2])
    columns = weights(boxes[:, 1], boxes[:, 3], side, first, size, images.shape[-1])
    return _products(images, rows, columns, flips)


def resized_centers(images: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                    resize: int, size: int) -> torch.Tensor:
    """Float ``(n, c, size, size)``: each image (its true ``heights``, ``widths`` within the
    padding) resized to ``resize`` on its shorter side, then the center ``size`` square, with
    torchvision's rounding (``int`` for the longer side, half to even for the offsets)."""
    short = torch.minimum(heights, widths).double()
    long_new = torch.floor(resize * torch.maximum(heights, widths).double() / short).long()
    resize_t = torch.full_like(long_new, resize)
    new_h = torch.where(widths <= heights, long_new, resize_t)
    new_w = torch.where(widths <= heights, resize_t, long_new)
    top = torch.round((new_h - size).double() / 2.0).long()
    left = torch.round((new_w - size).double() / 2.0).long()
    zero = torch.zeros_like(top)
    rows = weights(zero, heights, new_h, top, size, images.shape[-2])
    columns = weights(zero, widths, new_w, left, size, images.shape[-1])
    return _products(images, rows, columns, torch.zeros_like(top, dtype=torch.bool))


def _products(images: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
              flips: torch.Tensor) -> torch.Tensor:
    columns = torch.where(flips[:, None, None], columns.flip(1), columns)
    pixels = images.float()
    return torch.matmul(torch.matmul(rows[:, None], pixels), columns.transpose(1, 2)[:, None])
