"""Where code runs: rank and number of ranks, DataLoader worker, a model's device. Shared by the samplers, the
streams and distributed scoring, so that each question has one answer in the library."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import get_worker_info

from torch_pretrain_update._checks import check_int

__all__: list[str] = []  # private module


def resolve_replicas(num_replicas: int | None = None, rank: int | None = None, *,
                     group: Any = None) -> tuple[int, int]:
    """``(num_replicas, rank)``: given values, else ``group``'s (the default process group's when ``group`` is
    None) if torch.distributed is initialised, else ``(1, 0)``.

    Raises ``ValueError`` when ``rank`` is outside ``[0, num_replicas)``, or when ``group`` is given without an
    initialised process group.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if group is not None and not initialised:
        raise ValueError("group was given but torch.distributed is not initialised")
    if num_replicas is None:
        num_replicas = dist.get_world_size(group) if initialised else 1
    if rank is None:
        rank = dist.get_rank(group) if initialised else 0
    num_replicas = check_int(num_replicas, "num_replicas", min_value=1)
    rank = check_int(rank, "rank")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank}")
    return num_replicas, rank


def replicas_alias(num_replicas: int | None, world_size: int | None, where: str) -> int | None:
    """``num_replicas``, or the deprecated spelling ``world_size`` (with a ``DeprecationWarning``); both given is
    a ``TypeError`` unless they agree. The library says ``num_replicas``/``rank``, as torch's
    ``DistributedSampler`` does."""
    if world_size is None:
        return num_replicas
    warnings.warn(f"{where}: world_size= is deprecated; pass num_replicas=", DeprecationWarning, stacklevel=3)
    if num_replicas is not None and num_replicas != world_size:
        raise TypeError(f"{where}: pass num_replicas= or its deprecated alias world_size=, not both; got "
                        f"num_replicas={num_replicas}, world_size={world_size}")
    return world_size


def worker_split() -> tuple[int, int]:
    """``(num_workers, worker_id)`` of the current DataLoader worker, ``(1, 0)`` in the main process."""
    info = get_worker_info()
    if info is None:
        return 1, 0
    return info.num_workers, info.id


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter (else first buffer); the CPU for a module without either or for
    a plain callable."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")
