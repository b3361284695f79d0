"""Sliding-window geometry: regular steps of ``stride``, the last window flush with the border."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one side; a side shorter than the window gets one window at 0."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window={window}, stride={stride}: expected positive integers")
    count = max(math.ceil((length - window) / stride), 0) + 1
    last = max(length - window, 0)
    return [min(i * stride, last) for i in range(count)]


def window_boxes(
    height: int, width: int, window: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """Windows covering a ``height`` x ``width`` image, row by row, as (top, left, bottom, right).

    Each is ``window`` pixels on a side, or the whole side when the image is smaller.
    """
    return [
        (top, left, min(top + window, height), min(left + window, width))
        for top in window_starts(height, window, stride)
        for left in window_starts(width, window, stride)
    ]


def resized_shape(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """Keep the aspect ratio; short side ``short_side`` unless the long side would pass
    ``long_side``. -> (new_height, new_width)."""
    scale = min(short_side / min(height, width), long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def interp_matrix(src: int, dst: int) -> Tensor:
    """Bilinear resize (align_corners=False) along one axis as a matrix: [dst, src]."""
    eye = torch.eye(src)[None]  # [1, src channels, src length]
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T


def axis_map(starts: list[int], crop: int, grid: int, length: int, original: int) -> Tensor:
    """The linear map from the stitched window grids to the original image along one axis.

    Window i's ``grid`` logits are upsampled to its ``crop`` pixels at ``starts[i]`` of the
    resized side ``length``, divided by how many windows cover each pixel, then resized to
    ``original``. -> [original, len(starts) * grid]. As bilinear resizing is separable and the
    window counts factor into rows x columns, logits[y, x] = Σ_ab rows[y, a] grid[a, b] cols[x, b].
    """
    up = interp_matrix(grid, crop)
    placed = torch.zeros(length, len(starts) * grid)
    cover = torch.zeros(length, 1)
    for i, start in enumerate(starts):
        placed[start : start + crop, i * grid : (i + 1) * grid] = up
        cover[start : start + crop] += 1
    return interp_matrix(length, original) @ (placed / cover)
