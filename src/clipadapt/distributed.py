"""torch.distributed in one place: join a `torchrun` job, split work by rank, combine results.

Every helper is a no-op in a plain single process (no process group), so library code calls
them unconditionally. A rank's share of ``n`` items is one contiguous block
``[rank * n // world, (rank + 1) * n // world)``: blocks are balanced to one item and keep each
rank's reads sequential.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from clipadapt.errors import ClipAdaptError

# Ranks wait for each other at the end of their share; a slow rank may take hours.
DEFAULT_TIMEOUT = timedelta(hours=12)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the rank that prints and writes results."""
    return rank_world()[0] == 0


def init(
    device: str | torch.device = "cpu", timeout: timedelta = DEFAULT_TIMEOUT
) -> tuple[int, int, str]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 -> (rank, world, device).

    Backend: nccl for a CUDA device, gloo otherwise. ``"cuda"`` becomes ``"cuda:<LOCAL_RANK>"``
    (and is made the current device). Without torchrun's environment nothing happens:
    (0, 1, device) is returned.
    """
    device = str(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not is_distributed():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise ClipAdaptError(
                f"torch.distributed: cannot join the process group ({str(e).splitlines()[0]}); "
                "start with torchrun --nproc_per_node=N -m clipadapt ..."
            ) from e
    rank, world = rank_world()
    return rank, world, device


def shutdown() -> None:
    """Leave the process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def shard_range(n: int, rank: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)`` (all of it in a single process)."""
    if rank is None or world is None:
        rank, world = rank_world()
    return range(rank * n // world, (rank + 1) * n // world)


def shard_indices(
    indices: Sequence[int], rank: int | None = None, world: int | None = None
) -> list[int]:
    """This rank's contiguous block of ``indices``; the blocks of all ranks concatenate back."""
    return [indices[i] for i in shard_range(len(indices), rank, world)]


def owner(i: int, n: int, world: int) -> int:
    """The rank whose :func:`shard_range` of ``range(n)`` holds item ``i``."""
    if not 0 <= i < n:
        raise ValueError(f"item {i} outside range({n})")
    rank = (i * world) // n  # a lower bound; blocks are within one item of n / world
    while i >= (rank + 1) * n // world:
        rank += 1
    return rank


def all_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks (e.g. confusion [C, C], correct counts).

    Returns a new tensor on ``tensor``'s device and dtype; a copy in a single process.
    """
    if not is_distributed():
        return tensor.clone()
    on = tensor.detach().clone()
    if dist.get_backend() == "nccl":
        on = on.to(torch.device("cuda", torch.cuda.current_device()))
    elif on.device.type != "cpu":
        on = on.cpu()
    dist.all_reduce(on, op=dist.ReduceOp.SUM)
    return on.to(tensor.device)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable values, small: counts, messages)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankError(ClipAdaptError):
    """A user error that every rank raises together (so only rank 0 need print it)."""

    all_ranks = True


def raise_if_any(error: str | None) -> None:
    """Collective: every rank passes its error message (or None); if any rank has one, every
    rank raises RankError with the message of the lowest such rank."""
    messages = all_gather_objects(error)
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise RankError(first)


__all__ = [
    "RankError",
    "all_gather_objects",
    "all_sum",
    "barrier",
    "init",
    "is_distributed",
    "is_main",
    "owner",
    "rank_world",
    "raise_if_any",
    "shard_indices",
    "shard_range",
    "shutdown",
]
