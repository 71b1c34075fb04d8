"""Collectives of distributed scoring: agreeing that every rank succeeded, gathering per-rank vectors of unequal
lengths, and putting gathered ``(index, score)`` pairs in place."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from torch_pretrain_update._dist import resolve_replicas

__all__: list[str] = []  # private module


def comm_device(group: Any) -> torch.device:
    """Where collective buffers must live: CUDA for NCCL, CPU otherwise (gloo, mpi)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_int64(values: list[int], group: Any) -> torch.Tensor:
    """All-gather a short int64 vector: returns a ``(world, len(values))`` CPU tensor."""
    dev = comm_device(group)
    local = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(local) for _ in range(resolve_replicas(group=group)[0])]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).cpu()


def raise_if_failed(ok: torch.Tensor, stage: str) -> None:
    """Raise on every rank if a rank reported failure (0 in ``ok``, one entry per rank)."""
    bad = [i for i, v in enumerate(ok.tolist()) if v == 0]
    if bad:
        raise RuntimeError(f"score_dataset failed on rank(s) {bad} while {stage}; see the error on those ranks")


def agree(err: BaseException | None, stage: str, group: Any, *extra: int) -> torch.Tensor:
    """Tell every rank whether this one failed (``err``), with ``extra`` integers; this rank's own error is raised
    here, another rank's failure as a ``RuntimeError`` naming it. Returns the ``(world, 1 + len(extra))`` table
    (column 0: 1 = ok)."""
    status = all_gather_int64([0 if err is not None else 1, *extra], group)
    if err is not None:
        raise err
    raise_if_failed(status[:, 0], stage)
    return status


def all_gather_varlen(local: torch.Tensor, counts: list[int], group: Any) -> list[torch.Tensor]:
    """Every rank's 1-D ``local`` (rank ``r``'s has ``counts[r]`` entries), as CPU tensors in rank order.

    gloo and NCCL gather equal shapes only: each is padded with zeros to the longest, gathered and trimmed."""
    dev = comm_device(group)
    padded = torch.zeros(max(counts), dtype=local.dtype, device=dev)
    padded[: local.numel()] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return [p[:c].cpu() for p, c in zip(parts, counts)]


def place_by_index(parts: list[tuple[torch.Tensor, torch.Tensor]], num_samples: int | None) -> torch.Tensor:
    """Scores put at their ``__index__`` from the ranks' ``(indices, scores)`` (rank order). An index scored more
    than once (a stream's padding repeats) keeps its first score of the lowest rank; every index of
    ``range(N)`` must be scored (``N = num_samples``, else the largest index + 1)."""
    idx = torch.cat([p[0] for p in parts]).numpy()
    val = torch.cat([p[1] for p in parts])
    n = num_samples if num_samples is not None else (int(idx.max()) + 1 if idx.size else 0)
    if idx.size and int(idx.max()) >= n:
        raise ValueError(f"score_dataset: a sample has '__index__' {int(idx.max())}, outside range(num_samples="
                         f"{n})")
    unique, first = np.unique(idx, return_index=True)  # first occurrence in rank-major order
    if unique.size != n:
        missing = np.setdiff1d(np.arange(n), unique)
        raise ValueError(f"score_dataset: {missing.size} of the {n} indices were scored by no rank (e.g. "
                         f"{missing[:5].tolist()}); together the ranks' iterables must yield every '__index__' in "
                         f"range({n})")
    out = torch.empty(n, dtype=torch.float32)
    out[torch.from_numpy(unique)] = val[torch.from_numpy(first)]
    return out
