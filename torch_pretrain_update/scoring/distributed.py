"""Distributed helpers: a sharded scoring pass over a dataset, and seed agreement across ranks.

Rank and world size
    Every sampler and stream in this library resolves ``num_replicas`` / ``rank`` the same way
    (``_dist.resolve_replicas``): explicit arguments win; left ``None`` they come from the initialised default
    process group (``torch.distributed.get_world_size()`` / ``get_rank()``); without one they are ``(1, 0)``.
    DataLoader workers are resolved inside each worker (``torch.utils.data.get_worker_info``).

Seeds
    Plans are pure functions of ``(inputs, seed, epoch)``, so ranks agree exactly when they are given the same
    seed, the same inputs and the same epoch. As with ``torch.utils.data.DistributedSampler``, **the user passes
    the same seed on every rank**; nothing is broadcast behind your back. When the seed is not a constant of the
    script (e.g. drawn at random), agree on it first with :func:`broadcast_seed`, which returns rank 0's value on
    every rank.

Scoring
    :func:`score_dataset` splits a map-style dataset across ranks, scores each rank's share once and all-gathers
    the scores so that every rank holds the full, identical vector, bit-for-bit equal to single-process scoring.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from torch_pretrain_update._checks import check_bool, check_choice, check_int
from torch_pretrain_update.scoring.scores import SCORE_NAMES, compute_scores

__all__ = ["score_dataset", "broadcast_seed", "score_shares"]

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _group_world(group: Any) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (the default group when None); ``(1, 0)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _comm_device(group: Any) -> torch.device:
    """Where collective buffers must live: CUDA for NCCL, CPU otherwise (gloo, mpi)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_int64(values: list[int], group: Any) -> torch.Tensor:
    """All-gather a short int64 vector: returns a ``(world, len(values))`` CPU tensor."""
    world, _ = _group_world(group)
    dev = _comm_device(group)
    local = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).cpu()


def score_shares(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` sample range each rank scores in :func:`score_dataset`.

    The ``ceil(n / batch_size)`` batches of single-process scoring are split into ``world_size`` contiguous
    runs whose lengths differ by at most one batch; rank ``r`` scores run ``r``. Every range starts on a batch
    boundary, so each rank feeds the model exactly the batches a single process would (same samples, same
    order, same batch shapes). Ranges are disjoint and cover ``[0, n)``; a rank may get an empty range when
    there are fewer batches than ranks.

    Example::

        >>> score_shares(10, 3, 2)
        [(0, 6), (6, 10)]
    """
    n = check_int(n, "n", min_value=0)
    batch_size = check_int(batch_size, "batch_size", min_value=1)
    world_size = check_int(world_size, "world_size", min_value=1)
    batches = math.ceil(n / batch_size)
    shares = []
    for r in range(world_size):
        lo = (r * batches) // world_size
        hi = ((r + 1) * batches) // world_size
        shares.append((min(lo * batch_size, n), min(hi * batch_size, n)))
    return shares


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        return model(batch[0])
    raise TypeError(
        "score_dataset: a sample must be a tensor or a (input, ...) tuple/list to be scored by default; got a "
        f"batch of type {type(batch).__name__}. Pass forward=lambda model, batch: model(...) for other layouts."
    )


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_dataset(dataset: Any) -> int:
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise TypeError(
            "dataset must be a map-style dataset (with __len__ and __getitem__, not an IterableDataset); "
            f"got {type(dataset).__name__}"
        )
    return len(dataset)


def _score_range(
    model: nn.Module,
    dataset: Any,
    start: int,
    stop: int,
    *,
    score: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    from_logits: bool,
    forward: ForwardFn,
    progress: bool,
) -> torch.Tensor:
    """Scores of samples ``[start, stop)`` in batches of ``batch_size`` (``start`` is on a batch boundary)."""
    out = torch.empty(stop - start, dtype=torch.float32)
    if stop <= start:
        return out
    loader = DataLoader(
        Subset(dataset, range(start, stop)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    batches: Any = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="score_dataset", unit="batch")
    pos = 0
    for batch in batches:
        rows = min(batch_size, stop - start - pos)
        output = forward(model, _to_device(batch, device))
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != rows:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"model output must be a (batch, classes) tensor; got {shape} for a batch of {rows} samples "
                f"(dataset indices {start + pos}..{start + pos + rows - 1})"
            )
        try:
            out[pos : pos + rows] = compute_scores(output, score, from_logits=from_logits, name="model output")
        except ValueError as exc:  # say which samples: the scores module only knows batch rows
            raise ValueError(f"{exc} (batch of dataset indices {start + pos}..{start + pos + rows - 1})") from exc
        pos += rows
    return out


def score_dataset(
    model: nn.Module,
    dataset: Any,
    *,
    score: str = "entropy",
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    from_logits: bool = True,
    forward: Optional[ForwardFn] = None,
    group: Any = None,
    progress: bool = False,
) -> torch.Tensor:
    """Uncertainty score of every sample of a map-style dataset, computed once, shared by all ranks.

    Without an initialised process group this is a plain loop: batches ``[0, B), [B, 2B), ...`` in dataset
    order through ``model`` (in eval mode, under ``torch.inference_mode``), each batch's output scored with
    :func:`~torch_pretrain_update.scoring.scores.compute_scores`. With one, every rank of ``group`` must call it (it is
    a collective): rank ``r`` runs only its contiguous run of those same batches (:func:`score_shares`, no
    sample scored twice, no padding), then the per-rank scores are all-gathered (padded to the longest share for
    ``all_gather`` and trimmed again), so every rank returns the full vector.

    Exactness: each batch a rank feeds the model is the very batch single-process scoring feeds it (the shares
    start on batch boundaries), and each batch's scores are computed from that batch alone. So the result equals
    single-process scoring bit for bit, on every rank, even for models whose float results depend on the batch
    shape (BLAS kernels choose blocking and reduction order by matrix size: measured on torch 2.13 CPU, a 2-layer
    MLP's logits for the same rows differ by up to 5e-7 between batches of 1, 7 or 333 rows and one of 1000;
    eval-mode BatchNorm and dropout are per-sample). What remains the user's to hold fixed is the compute
    itself: the same model weights on every rank, the same device type, thread count
    (``torch.set_num_threads``; ``torchrun`` sets ``OMP_NUM_THREADS=1``) and, on CUDA, deterministic
    algorithms (``torch.use_deterministic_algorithms``).

    The model's ``training`` flag is restored afterwards. A ``DistributedDataParallel`` wrapper is unwrapped
    (``.module``) so that ranks with different numbers of batches never enter DDP's collectives. If any rank
    fails (bad output, NaN logits), every rank raises instead of hanging.

    Args:
        model: the model to score with; must already be on ``device``.
        dataset: map-style dataset (``__len__`` + ``__getitem__``) of the same length on every rank. A sample is
            a tensor or a tuple/list whose first element is the model input (e.g. ``(x, y)``).
        score: ``"entropy"``, ``"margin"`` or ``"least_confidence"``.
        batch_size: samples per forward pass.
        num_workers: DataLoader workers for loading.
        device: where inputs are sent; default: the device of the model's first parameter (else CPU).
        from_logits: the model outputs logits (``True``) or probabilities (``False``).
        forward: ``forward(model, batch) -> (B, C) tensor`` for other sample layouts (default: ``model(batch[0])``
            for tuple/list batches, ``model(batch)`` for tensors).
        group: process group (default: the default group, if initialised).
        progress: show a tqdm progress bar (rank 0 only).

    Returns:
        float32 CPU tensor of shape ``(len(dataset),)``; element ``i`` is the score of ``dataset[i]``.

    Example::

        >>> scores = score_dataset(model, train_set, score="entropy", batch_size=512)
        >>> sampler = EntropySampler.from_scores(scores, ...)  # the same plan on every rank
    """
    world, rank = _group_world(group)
    err: BaseException | None = None
    n = -1
    try:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_choice(score, "score", SCORE_NAMES)
        batch_size = check_int(batch_size, "batch_size", min_value=1)
        num_workers = check_int(num_workers, "num_workers", min_value=0)
        from_logits = check_bool(from_logits, "from_logits")
        progress = check_bool(progress, "progress")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be callable; got {type(forward).__name__}")
        n = _check_dataset(dataset)
    except Exception as exc:  # re-raised below, after the other ranks have heard of it
        err = exc
        if world == 1:
            raise
    if world > 1:
        info = _all_gather_int64([0 if err is not None else 1, n, batch_size if err is None else -1], group)
        if err is not None:
            raise err
        _raise_if_failed(info[:, 0], "checking its arguments")
        if not bool((info[:, 1] == n).all()) or not bool((info[:, 2] == batch_size).all()):
            raise ValueError(
                "score_dataset needs the same dataset length and batch_size on every rank; got len(dataset) "
                f"{info[:, 1].tolist()} and batch_size {info[:, 2].tolist()} by rank"
            )

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    device = _model_device(model) if device is None else torch.device(device)
    shares = score_shares(n, batch_size, world)
    start, stop = shares[rank]

    was_training = model.training
    local: torch.Tensor | None = None
    try:
        model.eval()
        with torch.inference_mode():
            local = _score_range(
                model,
                dataset,
                start,
                stop,
                score=score,
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                from_logits=from_logits,
                forward=forward or _default_forward,
                progress=progress and rank == 0,
            )
    except Exception as exc:
        if world == 1:
            raise
        err = exc
    finally:
        model.train(was_training)
    if world == 1:
        return local  # type: ignore[return-value]  # world == 1 re-raised every failure above

    status = _all_gather_int64([0 if err is not None else 1], group)
    if err is not None:
        raise err
    _raise_if_failed(status[:, 0], "scoring its share")
    if n == 0:
        return torch.empty(0, dtype=torch.float32)

    # Unequal shares: pad each to the longest for all_gather (gloo and NCCL need equal shapes), then trim.
    longest = max(stop_ - start_ for start_, stop_ in shares)
    dev = _comm_device(group)
    padded = torch.zeros(longest, dtype=torch.float32, device=dev)
    padded[: stop - start] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: stop_ - start_].cpu() for p, (start_, stop_) in zip(parts, shares)])


def _raise_if_failed(ok: torch.Tensor, stage: str) -> None:
    bad = [i for i, v in enumerate(ok.tolist()) if v == 0]
    if bad:
        raise RuntimeError(f"score_dataset failed on rank(s) {bad} while {stage}; see the error on those ranks")


def broadcast_seed(seed: int | None = None, *, src: int = 0, group: Any = None) -> int:
    """Rank ``src``'s seed on every rank (a collective when a process group is initialised).

    The library's convention is that the user passes the same seed on every rank (a constant in the script or
    config). Use this when that is not guaranteed, e.g. a seed drawn at random per run: ``seed=None`` draws a
    fresh 63-bit seed from ``os.urandom`` on rank ``src`` (no global RNG is touched), and whatever rank ``src``
    holds is returned everywhere. Without a process group, returns ``seed`` (or a fresh one).

    Args:
        seed: this rank's seed (only rank ``src``'s matters), or None for a fresh random one.
        src: the rank whose seed wins (a rank of ``group``).
        group: process group (default: the default group, if initialised).

    Example::

        >>> seed = broadcast_seed(None)             # same random seed on every rank
        >>> sampler = EntropySampler.from_scores(scores, ..., seed=seed)
    """
    if seed is not None:
        seed = check_int(seed, "seed", min_value=_INT64_MIN, max_value=_INT64_MAX)
    world, rank = _group_world(group)
    src = check_int(src, "src", min_value=0, max_value=world - 1)
    if seed is None and rank == src:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    if world == 1:
        return seed  # type: ignore[return-value]  # rank == src drew one above
    dev = _comm_device(group)
    buf = torch.tensor([seed if seed is not None else 0], dtype=torch.int64, device=dev)
    global_src = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast(buf, src=global_src, group=group)
    return int(buf.item())
