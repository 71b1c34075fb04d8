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
    It also takes an iterable of dict samples that carry their index (``"__index__"``, as
    :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` samples do): each rank scores what its own
    iterable yields, and the scores are gathered and put in place by index.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, default_collate

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
        f"batch of type {type(batch).__name__}. Pass forward=lambda model, batch: model(...) for other layouts, "
        "or input_key= (e.g. input_key=\"npy\") for dict samples."
    )


class _KeyForward:
    """The default forward for dict batches: ``model(batch[input_key])``."""

    def __init__(self, input_key: str) -> None:
        self.input_key = input_key

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping) or self.input_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else None
            raise TypeError(f"score_dataset: input_key={self.input_key!r} needs dict batches holding that key; got "
                            + (f"a dict with keys {keys}" if keys is not None else f"a {type(batch).__name__}"))
        return model(batch[self.input_key])


_ITERABLE_HINT = ("dataset must be a map-style dataset (with __len__ and __getitem__) or an iterable of dict samples "
                  "that carry their integer index under '__index__' (as ShardDataset samples do)")


class _IndexedCollate:
    """Collate a list of samples into ``(indices, batch)``: the ``"__index__"`` of each sample as an int64 tensor,
    and ``collate_fn(samples)``. Runs where the batch is made (inside a DataLoader worker when there are any)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> tuple[torch.Tensor, Any]:
        indices = []
        for sample in samples:
            if not isinstance(sample, Mapping) or "__index__" not in sample:
                what = (f"a dict without '__index__' (keys {sorted(sample)})" if isinstance(sample, Mapping)
                        else f"a sample of type {type(sample).__name__}")
                raise TypeError(f"{_ITERABLE_HINT}; got {what}")
            try:
                i = operator.index(sample["__index__"])
            except TypeError:
                raise TypeError(f"{_ITERABLE_HINT}; got '__index__'={sample['__index__']!r}") from None
            if i < 0:
                raise ValueError(f"score_dataset: a sample's '__index__' must be >= 0; got {i}")
            indices.append(i)
        return torch.tensor(indices, dtype=torch.int64), self.collate_fn(samples)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_dataset(dataset: Any) -> int:
    """``len(dataset)`` for a map-style dataset, -1 for an iterable of indexed samples (checked as they come)."""
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return len(dataset)
    if isinstance(dataset, Iterable):
        return -1
    raise TypeError(f"{_ITERABLE_HINT}; got {type(dataset).__name__}")


def _output_scores(output: Any, rows: int, score: str, from_logits: bool, where: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != rows:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model output must be a (batch, classes) tensor; got {shape} for a batch of {rows} samples "
                         f"({where})")
    try:
        return compute_scores(output, score, from_logits=from_logits, name="model output")
    except ValueError as exc:  # say which samples: the scores module only knows batch rows
        raise ValueError(f"{exc} ({where})") from exc


def _score_iterable(
    model: nn.Module,
    dataset: Iterable[Any],
    *,
    score: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    from_logits: bool,
    forward: ForwardFn,
    collate_fn: Callable[[list[Any]], Any],
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, scores)`` of the samples ``dataset`` yields here, in batches of consecutive samples."""
    collate = _IndexedCollate(collate_fn)
    batches: Any
    if num_workers > 0:
        if not isinstance(dataset, IterableDataset):
            raise ValueError(f"num_workers={num_workers} needs a map-style dataset or a torch IterableDataset (which "
                             "splits itself between the workers); a plain iterable is read here: pass num_workers=0")
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                             pin_memory=device.type == "cuda")
    else:
        batches = (collate(chunk) for chunk in _batched(dataset, batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="score_dataset", unit="batch")
    indices, scores = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.float32)]
    for idx, batch in batches:
        where = f"batch of samples with '__index__' {idx[0].item()}..." if idx.numel() else "an empty batch"
        output = forward(model, _to_device(batch, device))
        scores.append(_output_scores(output, idx.numel(), score, from_logits, where).float().cpu())
        indices.append(idx)
    return torch.cat(indices), torch.cat(scores)


def _place_by_index(parts: list[tuple[torch.Tensor, torch.Tensor]], num_samples: int | None) -> torch.Tensor:
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
    collate_fn: Optional[Callable[[list[Any]], Any]],
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
        collate_fn=collate_fn,
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
        where = f"dataset indices {start + pos}..{start + pos + rows - 1}"
        out[pos : pos + rows] = _output_scores(output, rows, score, from_logits, where)
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
    input_key: Optional[str] = None,
    collate_fn: Optional[Callable[[list[Any]], Any]] = None,
    num_samples: Optional[int] = None,
) -> torch.Tensor:
    """Uncertainty score of every sample of a dataset, computed once, shared by all ranks.

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

    **Iterables of indexed samples** (a stream, a generator, an ``IterableDataset``; also what a
    :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` yields): every sample is a dict with its
    integer index under ``"__index__"``. Each rank scores the samples *its* iterable yields (split the data
    between ranks in the iterable, as the streams of this library and webdataset's ``split_by_node`` do), in
    batches of ``batch_size`` consecutive samples; the ``(index, score)`` pairs are all-gathered and every rank
    returns the vector of ``num_samples`` scores (default: the largest index + 1), element ``i`` the score of
    the sample with ``"__index__" == i``. Every index must be scored by some rank; one scored twice (a stream's
    padding repeat) keeps the lowest rank's first score. The result equals single-process scoring bit for bit
    whenever each batch is the one a single process forms (each rank's share a run of whole batches of the
    single-process order); otherwise each score is exact for the batch its sample came in, which for
    batch-shape-dependent kernels (above) may differ in the last bits. For a map-style dataset such as
    ``ShardDataset`` prefer passing the dataset itself: its batches are always the single-process ones.

    The model's ``training`` flag is restored afterwards. A ``DistributedDataParallel`` wrapper is unwrapped
    (``.module``) so that ranks with different numbers of batches never enter DDP's collectives. If any rank
    fails (bad output, NaN logits), every rank raises instead of hanging.

    Args:
        model: the model to score with; must already be on ``device``.
        dataset: map-style dataset (``__len__`` + ``__getitem__``) of the same length on every rank, or an
            iterable of dict samples carrying ``"__index__"`` (this rank's share). A sample is a tensor, a
            tuple/list whose first element is the model input (e.g. ``(x, y)``), or a dict (see ``input_key``).
        score: ``"entropy"``, ``"margin"`` or ``"least_confidence"``.
        batch_size: samples per forward pass.
        num_workers: DataLoader workers for loading.
        device: where inputs are sent; default: the device of the model's first parameter (else CPU).
        from_logits: the model outputs logits (``True``) or probabilities (``False``).
        forward: ``forward(model, batch) -> (B, C) tensor`` for other sample layouts (default: ``model(batch[0])``
            for tuple/list batches, ``model(batch)`` for tensors, ``model(batch[input_key])`` with ``input_key``).
        group: process group (default: the default group, if initialised).
        progress: show a tqdm progress bar (rank 0 only).
        input_key: for dict samples (e.g. ``ShardDataset``'s): the key holding the model input.
        collate_fn: how samples become a batch (default ``torch.utils.data.default_collate``, which keeps string
            metadata such as ``__key__`` as lists).
        num_samples: for an iterable: the number of scores (default: the largest ``"__index__"`` + 1); for a
            map-style dataset it must be ``len(dataset)`` if given.

    Returns:
        float32 CPU tensor of shape ``(len(dataset),)``; element ``i`` is the score of ``dataset[i]``.

    Example::

        >>> scores = score_dataset(model, train_set, score="entropy", batch_size=512)
        >>> sampler = EntropySampler.from_scores(scores, ...)  # the same plan on every rank
        >>> scores = score_dataset(model, ShardDataset(manifest), input_key="npy")  # shards, read by index
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
        if input_key is not None and not isinstance(input_key, str):
            raise TypeError(f"input_key must be a str or None; got {type(input_key).__name__}")
        if forward is not None and input_key is not None:
            raise ValueError("pass forward= or input_key=, not both (forward receives the whole batch)")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable; got {type(collate_fn).__name__}")
        if num_samples is not None:
            num_samples = check_int(num_samples, "num_samples", min_value=0)
        n = _check_dataset(dataset)
        if n >= 0 and num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples must be len(dataset)={n} for a map-style dataset; got {num_samples}")
    except Exception as exc:  # re-raised below, after the other ranks have heard of it
        err = exc
        if world == 1:
            raise
    if world > 1:
        want = -1 if num_samples is None else num_samples
        info = _all_gather_int64([0 if err is not None else 1, n, batch_size if err is None else -1, want], group)
        if err is not None:
            raise err
        _raise_if_failed(info[:, 0], "checking its arguments")
        if not bool((info[:, 1] == n).all()) or not bool((info[:, 2] == batch_size).all()):
            raise ValueError(
                "score_dataset needs the same dataset length and batch_size on every rank; got len(dataset) "
                f"{info[:, 1].tolist()} (-1: an iterable) and batch_size {info[:, 2].tolist()} by rank"
            )
        if not bool((info[:, 3] == want).all()):
            raise ValueError(f"score_dataset needs the same num_samples on every rank; got {info[:, 3].tolist()} "
                             "(-1: None) by rank")
    if forward is None:
        forward = _default_forward if input_key is None else _KeyForward(input_key)

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    device = _model_device(model) if device is None else torch.device(device)
    if n < 0:
        return _score_iterable_on_ranks(model, dataset, world, rank, group, score=score, batch_size=batch_size,
                                        num_workers=num_workers, device=device, from_logits=from_logits,
                                        forward=forward, collate_fn=collate_fn or default_collate,
                                        num_samples=num_samples, progress=progress and rank == 0)
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
                forward=forward,
                collate_fn=collate_fn,
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


def _score_iterable_on_ranks(model: nn.Module, dataset: Iterable[Any], world: int, rank: int, group: Any, *,
                             num_samples: Optional[int], **kw: Any) -> torch.Tensor:
    """The iterable path of :func:`score_dataset`: score this rank's samples, gather ``(index, score)`` pairs,
    place them by index (every rank raises if any failed)."""
    err: BaseException | None = None
    local = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            local = _score_iterable(model, dataset, **kw)
    except Exception as exc:
        if world == 1:
            raise
        err = exc
    finally:
        model.train(was_training)
    if world == 1:
        return _place_by_index([local], num_samples)
    status = _all_gather_int64([0 if err is not None else 1, local[0].numel()], group)
    if err is not None:
        raise err
    _raise_if_failed(status[:, 0], "scoring its share")
    counts = status[:, 1].tolist()
    longest = max(counts)
    dev = _comm_device(group)
    idx = torch.full((longest,), -1, dtype=torch.int64, device=dev)
    val = torch.zeros(longest, dtype=torch.float32, device=dev)
    idx[: counts[rank]] = local[0].to(dev)
    val[: counts[rank]] = local[1].to(dev)
    idx_parts = [torch.empty_like(idx) for _ in range(world)]
    val_parts = [torch.empty_like(val) for _ in range(world)]
    dist.all_gather(idx_parts, idx, group=group)
    dist.all_gather(val_parts, val, group=group)
    parts = [(i[:c].cpu(), v[:c].cpu()) for i, v, c in zip(idx_parts, val_parts, counts)]
    return _place_by_index(parts, num_samples)  # the same data on every rank: the same result, or the same error


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
