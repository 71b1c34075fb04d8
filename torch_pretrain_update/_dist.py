"""Rank, world size and DataLoader-worker resolution shared by the samplers and streams."""

from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import get_worker_info

from torch_pretrain_update._checks import check_int

__all__: list[str] = []  # private module


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``: given values, else the initialised process group's, else ``(1, 0)``.

    Raises ``ValueError`` when ``rank`` is outside ``[0, num_replicas)``.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    num_replicas = check_int(num_replicas, "num_replicas", min_value=1)
    rank = check_int(rank, "rank")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank}")
    return num_replicas, rank


def worker_split() -> tuple[int, int]:
    """``(num_workers, worker_id)`` of the current DataLoader worker, ``(1, 0)`` in the main process."""
    info = get_worker_info()
    if info is None:
        return 1, 0
    return info.num_workers, info.id
