"""Which samples each reader of a stream reads: a pure function of the data's layout, the reader and the epoch.

A *reader* is one DataLoader worker of one rank (the main process counts as the one worker of its rank).
:func:`partition` gives a reader its :class:`Segment` s (ranges of one shard each, in reading order) and its
*quota* (how many samples it yields per epoch, or None when that is whatever its shards hold). It depends on
nothing but its arguments: the per-shard counts, the number of ranks, the rank, the number of workers, the
worker's id, the epoch, the seed and the split options of a :class:`Layout`; no process group, no global state.

Three ways to split, as :class:`~torch_pretrain_update.data.stream.WeightedWebDataset` documents them:

- ``split="samples"`` (per-shard counts known): the epoch's order (shard order ``torch.randperm`` from
  ``(seed, epoch)``, identity without shuffle) numbers the samples ``0..N-1``; rank ``r`` takes positions
  ``[r L, (r + 1) L)`` (mod ``N``: padding wraps to the start), cut into contiguous worker pieces of ``L // nw``
  or ``L // nw + 1``. Positions inside a shard are those of the shard's own (buffer-shuffled) order, so a piece
  can start or end inside a shard: any number of readers share any number of shards.
- ``split="shards"`` (counts unknown): rank ``r`` takes shards ``r, r + W, ...`` of the epoch's shard order and
  worker ``w`` every ``nw``-th of those; needs at least ``W nw`` shards.
- ``indices`` (a plan of global sample indices, ``shard offset + position`` in the written order): positions of
  the *plan* are split as in ``split="samples"``, and each reader reads its piece of the plan in order, one
  segment per run of indices that lie in one shard in non-decreasing order (a sorted plan reads every shard
  once; each backward jump or change of shard opens a shard again).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from torch_pretrain_update._checks import check_bool, check_choice, check_int
from torch_pretrain_update._rng import STREAM_SHARD_ORDER, epoch_generator

__all__ = ["Layout", "ReaderPlan", "Segment", "check_indices", "partition", "rank_length", "shard_order",
           "worker_quota"]


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of one shard's order (``stop=None``: to the shard's end). With ``picks`` (an
    ``indices`` plan), only the positions listed there are emitted, in that order, a repeated one once per
    listing; the shard is then read in its written order."""

    shard: int
    start: int
    stop: Optional[int]
    picks: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class ReaderPlan:
    """One reader's segments in reading order, and its quota per epoch (None: no fixed length)."""

    segments: tuple[Segment, ...]
    quota: Optional[int]


def rank_length(total: int, num_replicas: int, *, drop_last: bool = False,
                samples_per_rank: Optional[int] = None) -> int:
    """Samples per rank and epoch: ``samples_per_rank`` if given, else ``ceil(total / num_replicas)`` (padding)
    or ``floor`` with ``drop_last`` (truncating). Raises ``ValueError`` when that is 0."""
    if samples_per_rank is not None:
        return check_int(samples_per_rank, "samples_per_rank", min_value=1)
    length = total // num_replicas if drop_last else -(-total // num_replicas)
    if length == 0:
        raise ValueError(f"{total} samples cannot give each of num_replicas={num_replicas} ranks one sample"
                         + (" with drop_last=True" if drop_last else ""))
    return length


def worker_quota(length: int, num_workers: int, worker_id: int) -> int:
    """Worker ``worker_id``'s share of a rank's ``length`` samples: ``length // nw``, plus one for the first
    ``length % nw`` workers."""
    return length // num_workers + (1 if worker_id < length % num_workers else 0)


@dataclass(frozen=True, eq=False)
class Layout:
    """Everything :func:`partition` needs but the reader and the epoch, checked once.

    Args:
        num_shards: number of shards (the stream's shard list, in its order).
        counts: samples per shard (from a manifest), or None when unknown (``split="shards"`` only).
        num_replicas: number of ranks.
        seed: seed of the shard order.
        shuffle: shuffle the shard order each epoch (without it: the given order).
        split: ``"samples"`` or ``"shards"``.
        length: samples per rank and epoch (:func:`rank_length`); None (``split="shards"`` only): what the rank's
            shards hold.
        indices: a plan of global sample indices (needs ``counts``); None: the whole data.
    """

    num_shards: int
    counts: Optional[tuple[int, ...]]
    num_replicas: int = 1
    seed: int = 0
    shuffle: bool = True
    split: str = "samples"
    length: Optional[int] = None
    indices: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        check_int(self.num_shards, "num_shards", min_value=1)
        check_int(self.num_replicas, "num_replicas", min_value=1)
        check_int(self.seed, "seed")
        check_bool(self.shuffle, "shuffle")
        check_choice(self.split, "split", ("samples", "shards"))
        if self.counts is not None and len(self.counts) != self.num_shards:
            raise ValueError(f"counts must have num_shards={self.num_shards} entries; got {len(self.counts)}")
        if self.split == "samples" or self.indices is not None:
            if self.counts is None:
                raise ValueError("split='samples' and indices need the per-shard counts (a manifest)")
            if self.length is None:
                raise ValueError("split='samples' needs length (samples per rank)")
            if self.indices is None and sum(self.counts) == 0:
                raise ValueError("the shards hold no samples")
        if self.length is not None:
            check_int(self.length, "length", min_value=1)
        if self.indices is not None and self.split != "samples":
            raise ValueError("indices are split like split='samples'; got split='shards'")

    def starts(self) -> list[int]:
        """Global index of each shard's first sample, and the total at the end."""
        out = [0]
        for c in self.counts or ():
            out.append(out[-1] + c)
        return out


def shard_order(layout: Layout, epoch: int) -> list[int]:
    """The epoch's shard order: ``torch.randperm`` from ``(seed, epoch)``, or the given order without shuffle."""
    if not layout.shuffle:
        return list(range(layout.num_shards))
    g = epoch_generator(layout.seed, epoch, STREAM_SHARD_ORDER)
    return torch.randperm(layout.num_shards, generator=g).tolist()


def partition(layout: Layout, *, rank: int, num_workers: int, worker_id: int, epoch: int) -> ReaderPlan:
    """The segments and quota of worker ``worker_id`` of ``num_workers`` on rank ``rank`` in epoch ``epoch``.

    Raises ``ValueError`` for a rank or worker out of range, and with ``split="shards"`` when there are fewer
    shards than ranks x workers (the message says how many are needed and what to do instead).
    """
    W = layout.num_replicas
    check_int(rank, "rank", min_value=0, max_value=W - 1)
    nw = check_int(num_workers, "num_workers", min_value=1)
    w = check_int(worker_id, "worker_id", min_value=0, max_value=nw - 1)
    check_int(epoch, "epoch", min_value=0)
    L = layout.length
    if layout.split == "shards":
        if layout.num_shards < W * nw:
            raise ValueError(
                f"urls: {layout.num_shards} shard(s) for {W} rank(s) x {nw} DataLoader worker(s); need at least "
                f"{W * nw} with split='shards' (each reader reads whole shards): pass a manifest (split='samples' "
                "splits within shards), write smaller shards or use fewer workers"
            )
        mine = shard_order(layout, epoch)[rank::W][w::nw]
        quota = None if L is None else worker_quota(L, nw, w)
        return ReaderPlan(tuple(Segment(s, 0, None) for s in mine), quota)
    if L is None:  # excluded by Layout's checks; narrows the type
        raise ValueError("split='samples' needs length (samples per rank)")
    quota = worker_quota(L, nw, w)
    begin = rank * L + w * (L // nw) + min(w, L % nw)
    if layout.indices is not None:
        return ReaderPlan(_plan_segments(layout, begin, quota), quota)
    return ReaderPlan(_range_segments(layout, shard_order(layout, epoch), begin, quota), quota)


def _range_segments(layout: Layout, order: list[int], begin: int, quota: int) -> tuple[Segment, ...]:
    """Global positions ``[begin, begin + quota)`` of the epoch order (mod N: padding wraps to the start),
    as shard ranges."""
    counts = layout.counts or ()
    ordered = [counts[s] for s in order]
    starts = [0]
    for c in ordered:
        starts.append(starts[-1] + c)
    N = starts[-1]
    segments: list[Segment] = []
    pos, left = begin % N, quota
    k = bisect.bisect_right(starts, pos) - 1
    while left > 0:
        while pos >= starts[k + 1]:  # also steps over empty shards
            k += 1
        a = pos - starts[k]
        take = min(ordered[k] - a, left)
        segments.append(Segment(order[k], a, a + take))
        left -= take
        pos += take
        if pos >= N:
            pos, k = 0, 0
    return tuple(segments)


def _plan_segments(layout: Layout, begin: int, quota: int) -> tuple[Segment, ...]:
    """Plan positions ``[begin, begin + quota)`` (mod the plan's length), as runs of one shard each."""
    plan = layout.indices
    if plan is None or quota == 0:
        return ()
    piece = np.take(plan, np.arange(begin, begin + quota) % len(plan))
    starts = np.asarray(layout.starts(), dtype=np.int64)
    shards = np.searchsorted(starts, piece, side="right") - 1
    positions = piece - starts[shards]
    # a run ends where the shard changes or the position goes back
    cuts = np.flatnonzero((shards[1:] != shards[:-1]) | (positions[1:] < positions[:-1])) + 1
    segments = []
    for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(piece)].tolist()):
        picks = tuple(positions[a:b].tolist())
        segments.append(Segment(int(shards[a]), picks[0], picks[-1] + 1, picks))
    return tuple(segments)


def check_indices(indices: object, counts: Sequence[int]) -> np.ndarray:
    """A plan of global sample indices as a 1-D int64 array within ``[0, sum(counts))`` (a ``ValueError`` or
    ``TypeError`` naming ``indices`` otherwise)."""
    try:
        arr = np.asarray(indices.numpy() if isinstance(indices, torch.Tensor) else indices)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"indices must be a 1-D sequence of integers; got {type(indices).__name__} ({exc})") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"indices must be a 1-D sequence of integers; got shape {arr.shape}, dtype {arr.dtype}")
    total = int(sum(counts))
    if arr.size == 0:
        raise ValueError("indices is empty: pass at least one sample index")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= total:
        bad = lo if lo < 0 else hi
        raise ValueError(f"indices: {bad} is out of range [0, {total}) (the shards hold {total} samples)")
    return arr.astype(np.int64)
