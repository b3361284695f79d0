"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), optional in SCLIP.

Neighbours j of pixel i: the 8 pixels of a 3x3 kernel at each dilation (replicate borders).
Affinity: k(i, j) = -mean_channels(|I_i - I_j| / (0.1 sigma_i)), sigma_i the per-channel standard
deviation of the image over i's neighbours; alpha(i, .) = softmax_j k(i, j).
Each iteration: m_i <- sum_j alpha(i, j) m_j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DILATIONS = (1, 2, 4, 8, 12, 24)
ITERATIONS = 10


def offsets(dilations: tuple[int, ...] = DILATIONS) -> list[tuple[int, int]]:
    return [
        (dy * d, dx * d)
        for d in dilations
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]


def _shifted(padded: Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """The value at (y + dy, x + dx) for every (y, x): [..., H+2p, W+2p] -> [..., H, W]."""
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def affinities(image: Tensor, dilations: tuple[int, ...] = DILATIONS) -> Tensor:
    """image [3, H, W] -> alpha [N, H, W] (N = 8 * len(dilations), softmax over N)."""
    h, w = image.shape[-2:]
    pad = max(dilations)
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="replicate")[0]
    nbrs = torch.stack([_shifted(padded, pad, dy, dx, h, w) for dy, dx in offsets(dilations)])
    sigma = nbrs.std(dim=0, unbiased=False)  # [3, H, W]
    k = -((nbrs - image[None]).abs() / (1e-8 + 0.1 * sigma[None])).mean(dim=1)
    return torch.softmax(k, dim=0)


def pamr(
    image: Tensor,
    mask: Tensor,
    iterations: int = ITERATIONS,
    dilations: tuple[int, ...] = DILATIONS,
) -> Tensor:
    """Refine ``mask`` [K, H, W] with the affinities of ``image`` [3, H, W] -> [K, H, W].

    Memory: one [N, H, W] affinity tensor and two [K, H, W] masks (no [N, K, H, W] tensor).
    """
    alpha = affinities(image.to(mask.dtype), dilations)
    h, w = mask.shape[-2:]
    pad = max(dilations)
    shifts = offsets(dilations)
    for _ in range(iterations):
        padded = F.pad(mask[None], (pad, pad, pad, pad), mode="replicate")[0]
        out = torch.zeros_like(mask)
        for n, (dy, dx) in enumerate(shifts):
            out.addcmul_(alpha[n : n + 1], _shifted(padded, pad, dy, dx, h, w))
        mask = out
    return mask
