"""Distributed helpers: a sharded scoring pass over a dataset, and seed agreement across ranks.

Ranks
    Every sampler, stream and collective here resolves the number of ranks and this rank the same way: explicit
    arguments win; left ``None`` they come from the initialised process group (``group``'s where one is taken,
    else the default group: ``torch.distributed.get_world_size()`` / ``get_rank()``); without one they are
    ``(1, 0)``. The library spells them ``num_replicas`` / ``rank`` like ``DistributedSampler``
    (:func:`score_shares` and :class:`~torch_pretrain_update.data.stream.WeightedWebDataset` still accept
    ``world_size=``, deprecated). DataLoader workers are resolved inside each worker
    (``torch.utils.data.get_worker_info``).

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

import os
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import default_collate

from torch_pretrain_update._checks import check_bool, check_choice, check_int, check_str
from torch_pretrain_update._dist import model_device, replicas_alias, resolve_replicas
from torch_pretrain_update.scoring._gather import agree, all_gather_varlen, comm_device, place_by_index
from torch_pretrain_update.scoring._local import ForwardFn, KeyForward, ScoreSettings, check_dataset, default_forward
from torch_pretrain_update.scoring.scores import SCORE_NAMES

__all__ = ["score_dataset", "broadcast_seed", "score_shares"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_T = TypeVar("_T")


def score_shares(n: int, batch_size: int, num_replicas: Optional[int] = None, *,
                 world_size: Optional[int] = None) -> list[tuple[int, int]]:
    """The ``[start, stop)`` sample range each rank scores in :func:`score_dataset`.

    The ``ceil(n / batch_size)`` batches of single-process scoring are split into ``num_replicas`` contiguous
    runs whose lengths differ by at most one batch; rank ``r`` scores run ``r``. Every range starts on a batch
    boundary, so each rank feeds the model exactly the batches a single process would (same samples, same
    order, same batch shapes). Ranges are disjoint and cover ``[0, n)``; a rank may get an empty range when
    there are fewer batches than ranks.

    Args:
        n: number of samples.
        batch_size: samples per batch.
        num_replicas: number of ranks.
        world_size: deprecated alias of ``num_replicas`` (a ``DeprecationWarning``); the library says
            ``num_replicas``, as torch's ``DistributedSampler`` does.

    Example::

        >>> score_shares(10, 3, 2)
        [(0, 6), (6, 10)]
    """
    num_replicas = replicas_alias(num_replicas, world_size, "score_shares")
    if num_replicas is None:
        raise TypeError("score_shares() missing required argument: 'num_replicas'")
    n = check_int(n, "n", min_value=0)
    batch_size = check_int(batch_size, "batch_size", min_value=1)
    num_replicas = check_int(num_replicas, "num_replicas", min_value=1)
    batches = -(-n // batch_size)
    shares = []
    for r in range(num_replicas):
        lo = (r * batches) // num_replicas
        hi = ((r + 1) * batches) // num_replicas
        shares.append((min(lo * batch_size, n), min(hi * batch_size, n)))
    return shares


def _run_in_eval(model: nn.Module, world: int, run: Callable[[], _T], failed: _T) -> tuple[_T, Optional[Exception]]:
    """``(run(), None)`` with ``model`` in eval mode under ``torch.inference_mode`` (its ``training`` flag restored
    afterwards). A failure is raised at once without ranks; with ranks it is returned as ``(failed, exc)`` so that
    the caller tells the others before raising (no rank is left waiting in a collective)."""
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            return run(), None
    except Exception as exc:
        if world == 1:
            raise
        return failed, exc
    finally:
        model.train(was_training)


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
    world, rank = resolve_replicas(group=group)
    err: Exception | None = None
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
        input_key = check_str(input_key, "input_key", optional=True)
        if forward is not None and input_key is not None:
            raise ValueError("pass forward= or input_key=, not both (forward receives the whole batch)")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable; got {type(collate_fn).__name__}")
        if num_samples is not None:
            num_samples = check_int(num_samples, "num_samples", min_value=0)
        n = check_dataset(dataset)
        if n >= 0 and num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples must be len(dataset)={n} for a map-style dataset; got {num_samples}")
    except Exception as exc:  # re-raised below, after the other ranks have heard of it
        err = exc
        if world == 1:
            raise
    if world > 1:
        want = -1 if num_samples is None else num_samples
        info = agree(err, "checking its arguments", group, n, batch_size if err is None else -1, want)
        if not bool((info[:, 1] == n).all()) or not bool((info[:, 2] == batch_size).all()):
            raise ValueError(
                "score_dataset needs the same dataset length and batch_size on every rank; got len(dataset) "
                f"{info[:, 1].tolist()} (-1: an iterable) and batch_size {info[:, 2].tolist()} by rank"
            )
        if not bool((info[:, 3] == want).all()):
            raise ValueError(f"score_dataset needs the same num_samples on every rank; got {info[:, 3].tolist()} "
                             "(-1: None) by rank")
    if forward is None:
        forward = default_forward if input_key is None else KeyForward(input_key)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    settings = ScoreSettings(score=score, batch_size=batch_size, num_workers=num_workers,
                             device=model_device(model) if device is None else torch.device(device),
                             from_logits=from_logits, forward=forward, collate_fn=collate_fn or default_collate,
                             progress=progress and rank == 0)
    if n < 0:
        return _score_iterable_on_ranks(model, dataset, settings, world, rank, group, num_samples)

    shares = score_shares(n, batch_size, world)
    start, stop = shares[rank]
    local, err = _run_in_eval(model, world, lambda: settings.score_range(model, dataset, start, stop),
                              torch.empty(0))
    if world == 1:
        return local
    agree(err, "scoring its share", group)
    if n == 0:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(all_gather_varlen(local, [stop_ - start_ for start_, stop_ in shares], group))


def _score_iterable_on_ranks(model: nn.Module, dataset: Any, settings: ScoreSettings, world: int, rank: int,
                             group: Any, num_samples: Optional[int]) -> torch.Tensor:
    """The iterable path of :func:`score_dataset`: score this rank's samples, gather ``(index, score)`` pairs,
    place them by index (every rank raises if any failed)."""
    failed = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32))
    local, err = _run_in_eval(model, world, lambda: settings.score_iterable(model, dataset), failed)
    if world == 1:
        return place_by_index([local], num_samples)
    counts = agree(err, "scoring its share", group, local[0].numel())[:, 1].tolist()
    indices = all_gather_varlen(local[0], counts, group)
    values = all_gather_varlen(local[1], counts, group)
    return place_by_index(list(zip(indices, values)), num_samples)  # the same on every rank: result or error


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
    world, rank = resolve_replicas(group=group)
    src = check_int(src, "src", min_value=0, max_value=world - 1)
    if seed is None and rank == src:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    if world == 1:
        return seed  # type: ignore[return-value]  # rank == src drew one above
    dev = comm_device(group)
    buf = torch.tensor([seed if seed is not None else 0], dtype=torch.int64, device=dev)
    global_src = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast(buf, src=global_src, group=group)
    return int(buf.item())
