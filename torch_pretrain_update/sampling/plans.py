"""Pure plan functions: ``(inputs, seed, epoch) -> LongTensor`` of indices, no DataLoader, no global RNG.

Random subsets and class-stratified selections (the class-balanced plan is in
:mod:`torch_pretrain_update.sampling.balanced`, weighted draws in :mod:`torch_pretrain_update.sampling.draws`).
Every random draw comes from :func:`torch_pretrain_update._rng.epoch_generator` seeded by ``(seed, epoch, ...)``,
so a plan is a pure function of its arguments: the samplers in :mod:`torch_pretrain_update.sampling.samplers`
only split it across ranks and remember a position.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from torch_pretrain_update._checks import check_bool, check_int, check_labels, compact_labels
from torch_pretrain_update._rng import STREAM_IID, STREAM_SELECT, STREAM_SELECTION_ORDER, epoch_generator
from torch_pretrain_update.sampling._inputs import (
    check_counts,
    check_seed_epoch,
    check_subset_size,
    exclude_pool,
    num_items,
)

__all__ = [
    "stratified_quotas",
    "random_subset_plan",
    "stratified_plan",
]

def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` proportionally to ``counts`` (a 1-D array, sum > 0) by largest-remainder rounding.

    Exact integer arithmetic: class ``c`` gets ``floor(total * n_c / N)`` plus one if its remainder
    ``total * n_c mod N`` is among the ``total - sum(floors)`` largest; equal remainders go to the lower index
    (a stable sort). ``counts`` may be an object array of Python ints when ``total * max(n)`` overflows int64.
    """
    n_total = int(counts.sum())
    prod = counts * total
    floors = prod // n_total
    rems = prod % n_total
    left = total - int(floors.sum())
    order = np.argsort(-rems, kind="stable")  # descending remainder, ties by lower class index
    out = floors.copy()
    out[order[:left]] += 1
    return out


def stratified_quotas(class_counts: torch.Tensor, num_samples: int, *, min_per_class: int = 1) -> torch.Tensor:
    """Per-class quotas for class-stratified selection without replacement.

    The quotas are proportional to the class sizes with largest-remainder (Hamilton) rounding: class ``c`` of
    ``n_c`` (out of ``N``) gets ``floor(num_samples * n_c / N)``, and the ``num_samples - sum(floors)`` classes
    with the largest remainders get one more; **equal remainders are broken in favour of the lower class
    index**. Then every class that has at least ``min_per_class`` samples is raised to ``min_per_class``: such a
    class is fixed at that minimum and the rest of the budget is re-apportioned over the other classes the same
    way, repeating until no class falls below its minimum (at most ``C`` rounds). A class with fewer than
    ``min_per_class`` samples is not guaranteed anything beyond its proportional share. The result never
    exceeds a class's size and sums exactly to ``num_samples``.

    Computed in exact integer arithmetic (no floating-point rounding of the shares).

    Args:
        class_counts: 1-D non-negative integer counts per class (``torch.Tensor``, ndarray or sequence).
        num_samples: total to select, in ``[1, sum(class_counts)]``.
        min_per_class: the minimum for every class that has at least that many samples (``>= 0``).

    Returns:
        int64 tensor of shape ``(C,)``.

    Raises:
        TypeError: non-integer counts or arguments.
        ValueError: negative or empty counts, ``num_samples`` out of range, or minimums that need more than
            ``num_samples`` in total.

    Example::

        >>> stratified_quotas(torch.tensor([50, 30, 15, 5]), 10)
        tensor([5, 3, 1, 1])
        >>> stratified_quotas(torch.tensor([97, 2, 1]), 10, min_per_class=2)
        tensor([8, 2, 0])
    """
    counts_t = check_counts(class_counts, "class_counts")
    total = int(counts_t.sum())
    num_samples = check_int(num_samples, "num_samples", min_value=1)
    min_per_class = check_int(min_per_class, "min_per_class", min_value=0)
    if num_samples > total:
        raise ValueError(
            f"num_samples must be <= the number of samples available (sum of class_counts = {total}); "
            f"got {num_samples}"
        )
    counts = counts_t.numpy()
    guaranteed = np.where(counts >= min_per_class, min_per_class, 0)
    need = int(guaranteed.sum())
    if need > num_samples:
        eligible = int((counts >= min_per_class).sum()) if min_per_class > 0 else 0
        raise ValueError(
            f"min_per_class={min_per_class} for the {eligible} classes that have that many samples needs "
            f"{need} samples, more than num_samples={num_samples}"
        )
    # Exact integers: int64 when num_samples * max(count) fits, Python ints (object array) otherwise.
    if int(counts.max()) * num_samples >= 2**62:
        counts = counts.astype(object)
        guaranteed = guaranteed.astype(object)
    fixed = np.zeros(len(counts), dtype=bool)
    while True:
        free = ~fixed
        budget = num_samples - int(guaranteed[fixed].sum())
        quotas = guaranteed.copy()
        if budget > 0:
            # Classes are fixed only when their proportional share is below their minimum (hence below their
            # size), so the free classes always hold at least ``budget`` samples: see the tests.
            quotas[free] = _largest_remainder(counts[free], budget)
        else:
            quotas[free] = 0
        short = free & (quotas < guaranteed)
        if not short.any():
            break
        fixed |= short
    return torch.as_tensor(quotas.astype(np.int64), dtype=torch.int64)


# ----- shared pieces ----------------------------------------------------------------------------------------

#: Plans are produced in chunks of this many positions (also the block size of i.i.d. draws and the target
#: size of a class-balanced leaf). Part of the plans' definition: changing it changes the streams. Read at call
#: time (``plans.CHUNK``) by every plan that uses it.
CHUNK = 1 << 16


def _randperm(n: int, generator: torch.Generator) -> torch.Tensor:
    """``torch.randperm`` as int64; drawn as int32 when it fits (10-30% faster from n = 1e6 up on torch 2.13
    CPU, measured; the int32 draw defines the stream)."""
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=generator, dtype=dtype).long()


def _repeat(values: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    """``torch.repeat_interleave(values, repeats)`` through ``cumsum``: on torch 2.13 CPU ``repeat_interleave``
    enters a parallel region even for a handful of elements and takes ~25 ms per call when the cores are
    busy (measured), which dominated small plans."""
    total = int(repeats.sum())
    marks = torch.zeros(total + 1, dtype=torch.int64)
    marks.index_add_(0, torch.cumsum(repeats, 0)[:-1], torch.ones(repeats.numel() - 1, dtype=torch.int64))
    return values[torch.cumsum(marks[:total], 0)]






def _stable_argsort_small(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Stable argsort of non-negative integer keys below ``num_keys``.

    numpy's stable sort is a single-threaded radix sort on <= 16-bit keys: ~5x faster than ``torch.sort`` at
    N = 1e7, and free of torch's parallel-region overhead on small inputs when the cores are busy.
    """
    dtype = np.uint8 if num_keys <= 2**8 else np.uint16 if num_keys <= 2**16 else np.int64
    return torch.from_numpy(np.argsort(keys.numpy().astype(dtype, copy=False), kind="stable"))


class ClassGroups:
    """Sample indices grouped by class: ``order[starts[c] : starts[c] + counts[c]]`` are the samples of the
    ``c``-th class present, ``classes[c]``, in ascending index order. Built once per label tensor (and pool),
    reused by every epoch's plan.

    The classes are the distinct label values present (``torch.unique``), in ascending order: nothing is sized
    by the largest label, so labels such as 10**12 work, and a class absent from the labels (or the pool) has no
    group. Random streams that belong to a class are keyed by its label value ``classes[c]``, not by ``c``.

    Args:
        labels: 1-D non-negative int64 labels (already validated).
        num_classes: unused (kept for callers that pass it); the groups follow the label values present.
        pool: optional sorted subset of sample indices to group (the others are ignored).
    """

    def __init__(
        self, labels: torch.Tensor, num_classes: int | None = None, pool: torch.Tensor | None = None
    ) -> None:
        sub = labels if pool is None else labels[pool]
        ids, self.classes = compact_labels(sub)
        self.num_classes = self.classes.numel()
        self.counts = torch.bincount(ids, minlength=self.num_classes)
        order = _stable_argsort_small(ids, self.num_classes)
        self.order = order if pool is None else pool[order]
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        # plain ints for the per-class loops of the plans (no tensor indexing per class)
        self._sizes: list[int] = self.counts.tolist()
        self._starts: list[int] = self.starts.tolist()
        self._labels: list[int] = self.classes.tolist()

    def members(self, c: int) -> torch.Tensor:
        """Sample indices of the ``c``-th class present, ascending."""
        return self.order[self._starts[c] : self._starts[c] + self._sizes[c]]

    def size(self, c: int) -> int:
        """Number of samples of the ``c``-th class present."""
        return self._sizes[c]

    def label(self, c: int) -> int:
        """Label value of the ``c``-th class present."""
        return self._labels[c]


# ----- random subset ----------------------------------------------------------------------------------------

def _iid_chunks(pool_size: int, num_samples: int, seed: int, epoch: int, start: int) -> Iterator[torch.Tensor]:
    """Positions ``start..num_samples-1`` of i.i.d. uniform draws from ``range(pool_size)``.

    Block ``b`` (positions ``b*CHUNK`` to ``(b+1)*CHUNK - 1``) comes from its own generator, so any position is
    reached without drawing the ones before it.
    """
    for b in range(start // CHUNK, -(-num_samples // CHUNK)):
        lo, hi = b * CHUNK, min((b + 1) * CHUNK, num_samples)
        g = epoch_generator(seed, epoch, STREAM_IID, b)
        draws = torch.randint(pool_size, (hi - lo,), generator=g)
        yield draws[max(start - lo, 0) :]


def _random_subset(
    num_items: int, pool: torch.Tensor | None, num_samples: int, seed: int, epoch: int, replacement: bool,
    shuffle: bool,
) -> torch.Tensor:
    size = num_items if pool is None else pool.numel()
    if replacement:
        picks = torch.cat(list(_iid_chunks(size, num_samples, seed, epoch, 0)))
    else:
        # The first k of a uniform permutation: a uniform k-subset, already in uniformly random order.
        picks = _randperm(size, epoch_generator(seed, epoch, STREAM_SELECT))[:num_samples]
    if pool is not None:
        picks = pool[picks]
    return picks if shuffle else torch.sort(picks).values


def random_subset_plan(
    data_source: Any,
    num_samples: int,
    seed: int,
    epoch: int,
    *,
    replacement: bool = False,
    exclude: Any = None,
    shuffle: bool = True,
) -> torch.Tensor:
    """A uniformly random selection of ``num_samples`` indices of ``range(N)``.

    Without replacement: the first ``num_samples`` of ``torch.randperm`` over the allowed indices (a uniform
    subset). With replacement: i.i.d. uniform draws (``torch.randint``), generated in blocks of ``CHUNK``
    positions, each from its own generator. A fresh selection per ``epoch``. ``shuffle=False`` returns the
    same selection in ascending index order (repeats adjacent).

    Args:
        data_source: a sized dataset or an int ``N``.
        num_samples: how many indices (``>= 1``; at most the allowed count without replacement).
        seed: base seed.
        epoch: epoch number (``>= 0``).
        replacement: draw with replacement.
        exclude: indices never to select (1-D integer indices in ``[0, N)``, duplicates allowed, or a bool
            mask of length ``N``).
        shuffle: random order (``True``) or ascending index order.

    Returns:
        int64 tensor of shape ``(num_samples,)``.

    Example::

        >>> plan = random_subset_plan(10, 3, seed=0, epoch=0, exclude=[0, 1])
        >>> plan.numel(), len(set(plan.tolist())), bool((plan >= 2).all())
        (3, 3, True)
    """
    n = num_items(data_source)
    replacement = check_bool(replacement, "replacement")
    shuffle = check_bool(shuffle, "shuffle")
    seed, epoch = check_seed_epoch(seed, epoch)
    pool = exclude_pool(exclude, n)
    num_samples = check_subset_size(num_samples, pool, n, replacement=replacement)
    return _random_subset(n, pool, num_samples, seed, epoch, replacement, shuffle)


# ----- stratified selection ---------------------------------------------------------------------------------

def _stratified(groups: ClassGroups, quotas: torch.Tensor, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    g = epoch_generator(seed, epoch, STREAM_SELECT)
    parts = []
    for c, q in enumerate(quotas.tolist()):  # one loop step per class; the picks inside are vectorised
        if q > 0:
            members = groups.members(c)
            parts.append(members[_randperm(members.numel(), g)[:q]])
    picks = torch.cat(parts)
    if not shuffle:
        return torch.sort(picks).values
    return picks[_randperm(picks.numel(), epoch_generator(seed, epoch, STREAM_SELECTION_ORDER))]


def stratified_plan(
    labels: Any,
    num_samples: int,
    seed: int,
    epoch: int,
    *,
    min_per_class: int = 1,
    exclude: Any = None,
    shuffle: bool = True,
) -> torch.Tensor:
    """Class-stratified selection without replacement.

    Quotas from :func:`stratified_quotas` over the class counts of the allowed samples; class ``c``'s picks are
    the first ``quota_c`` of a ``torch.randperm`` of its allowed samples (classes drawn in ascending order
    from one generator). A fresh selection per ``epoch``. ``shuffle=True`` shuffles the selection with a
    separate generator, so the selected *set* is the same either way; ``shuffle=False`` gives it in ascending
    index order.

    Args:
        labels: 1-D integer class labels (``>= 0``), one per sample; the classes are the distinct label values
            (any int64: nothing is sized by the largest label).
        num_samples: how many to select, in ``[1, allowed samples]``.
        seed: base seed.
        epoch: epoch number (``>= 0``).
        min_per_class: at least this many from every class that has that many allowed samples.
        exclude: indices never to select (integer indices or a bool mask, see :func:`random_subset_plan`).
        shuffle: random order or ascending index order.

    Returns:
        int64 tensor of shape ``(num_samples,)`` with no duplicates.

    Example::

        >>> labels = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> torch.bincount(labels[stratified_plan(labels, 3, seed=0, epoch=0)])  # quotas [2, 1]
        tensor([2, 1])
    """
    t, _ = check_labels(labels, "labels", max_classes=None)  # grouping only: any label value
    seed, epoch = check_seed_epoch(seed, epoch)
    shuffle = check_bool(shuffle, "shuffle")
    pool = exclude_pool(exclude, t.numel())
    groups = ClassGroups(t, pool=pool)
    num_samples = check_subset_size(num_samples, pool, t.numel())
    quotas = stratified_quotas(groups.counts, num_samples, min_per_class=min_per_class)
    return _stratified(groups, quotas, seed, epoch, shuffle)
