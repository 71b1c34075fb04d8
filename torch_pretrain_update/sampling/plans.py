"""Pure plan functions: ``(inputs, seed, epoch) -> LongTensor`` of indices, no DataLoader, no global RNG.

Every random draw comes from :func:`torch_pretrain_update._rng.epoch_generator` seeded by ``(seed, epoch, ...)``,
so a plan is a pure function of its arguments: the samplers in :mod:`torch_pretrain_update.sampling.samplers` only split
it across ranks and remember a position.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from torch_pretrain_update._checks import (
    as_tensor,
    check_bool,
    check_choice,
    check_int,
    check_labels,
    compact_labels,
    short_repr,
)
from torch_pretrain_update._rng import epoch_generator

__all__ = [
    "stratified_quotas",
    "random_subset_plan",
    "stratified_plan",
    "class_balanced_plan",
    "resolve_samples_per_class",
    "SAMPLES_PER_CLASS",
]


def _check_counts(class_counts: Any, name: str) -> torch.Tensor:
    t = as_tensor(class_counts, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {short_repr(t)}")
    t = t.detach().to(device="cpu", dtype=torch.int64)
    neg = t < 0
    if bool(neg.any()):
        i = int(torch.nonzero(neg)[0, 0])
        raise ValueError(f"{name} must be non-negative; got {int(t[i])} at index {i}")
    return t


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
    counts_t = _check_counts(class_counts, "class_counts")
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
#: size of a class-balanced leaf). Part of the plans' definition: changing it changes the streams.
CHUNK = 1 << 16

# Stream ids: each kind of draw gets its own generator ``epoch_generator(seed, epoch, stream, ...)``, so that
# e.g. the selected set does not depend on whether the order is shuffled.
_S_SELECT = 1  # which samples (random subset / stratified picks)
_S_SHUFFLE = 2  # order of a materialised selection
_S_IID = 3  # i.i.d. draws with replacement, one generator per block of CHUNK positions
_S_TREE = 4  # class-balanced: binomial splits of the class counts over the plan's positions
_S_LEAF = 5  # class-balanced: order inside one leaf
_S_PASS = 6  # class-balanced: permutations of one class (its "passes")

SAMPLES_PER_CLASS = ("max", "min", "mean")


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


def _check_exclude(exclude: Any, num_items: int) -> torch.Tensor | None:
    """``exclude`` (indices, or a bool mask of length ``num_items``) -> the sorted pool of allowed indices."""
    if exclude is None:
        return None
    t = as_tensor(exclude, "exclude")
    if t.ndim != 1:
        raise ValueError(f"exclude must be 1-D (indices or a bool mask); got shape {tuple(t.shape)}")
    if t.numel() == 0 and t.dtype != torch.bool:  # an empty list excludes nothing (as_tensor makes it float)
        return None
    if t.dtype == torch.bool:
        if t.numel() != num_items:
            raise ValueError(
                f"exclude as a bool mask must have one entry per sample ({num_items}); got {t.numel()}"
            )
        mask = t.detach().cpu()
    else:
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"exclude must hold integer indices or be a bool mask; got {short_repr(t)}")
        t = t.detach().to(device="cpu", dtype=torch.int64)
        bad = (t < 0) | (t >= num_items)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"exclude must hold indices in [0, {num_items}); got {int(t[i])} at position {i}")
        mask = torch.zeros(num_items, dtype=torch.bool)
        mask[t] = True
    pool = torch.nonzero(~mask).flatten()
    if pool.numel() == 0:
        raise ValueError(f"exclude removes all {num_items} samples: nothing is left to select from")
    return pool


def _check_num_samples(num_samples: Any, available: int, replacement: bool, what: str) -> int:
    # at most 2**63 - 1: plan positions are int64 and len(sampler) must fit in a Py_ssize_t
    num_samples = check_int(num_samples, "num_samples", min_value=1, max_value=sys.maxsize)
    if not replacement and num_samples > available:
        raise ValueError(
            f"num_samples must be <= {what} ({available}) without replacement; got {num_samples}"
        )
    return num_samples


def _num_items(data_source: Any) -> int:
    if isinstance(data_source, numbers.Integral) and not isinstance(data_source, bool):
        return check_int(data_source, "data_source", min_value=1)
    if hasattr(data_source, "__len__"):
        try:
            n = len(data_source)
        except TypeError as exc:  # e.g. an IterableDataset that defines __len__ but raises
            raise TypeError(f"data_source must be a sized dataset or an int; len() failed: {exc}") from exc
        if n < 1:
            raise ValueError(f"data_source must not be empty; got len(data_source) = {n}")
        return int(n)
    raise TypeError(f"data_source must be a sized dataset or an int; got {type(data_source).__name__}")


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

    def __init__(self, labels: torch.Tensor, num_classes: int | None = None, pool: torch.Tensor | None = None) -> None:
        sub = labels if pool is None else labels[pool]
        ids, self.classes = compact_labels(sub)
        self.num_classes = self.classes.numel()
        self.counts = torch.bincount(ids, minlength=self.num_classes)
        order = _stable_argsort_small(ids, self.num_classes)
        self.order = order if pool is None else pool[order]
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self._counts = self.counts.tolist()
        self._starts = self.starts.tolist()
        self._classes = self.classes.tolist()

    def members(self, c: int) -> torch.Tensor:
        return self.order[self._starts[c] : self._starts[c] + self._counts[c]]


def _chunks_of(plan: torch.Tensor, start: int) -> Iterator[torch.Tensor]:
    for a in range(start, plan.numel(), CHUNK):
        yield plan[a : a + CHUNK]


def _ramp(chunks: Iterator[torch.Tensor], first: int = 1024) -> Iterator[torch.Tensor]:
    """The same indices, with the first ones re-cut into pieces of ``first, 2*first, ...`` up to ``CHUNK``.

    A sampler turns each piece into Python ints (``tolist``) before yielding its first index; small first
    pieces make the first index come sooner. The stream is unchanged.
    """
    size = first
    for chunk in chunks:
        a = 0
        while size < CHUNK and a < chunk.numel():
            yield chunk[a : a + size]
            a += size
            size *= 2
        if a < chunk.numel():
            yield chunk[a:]


# ----- random subset ----------------------------------------------------------------------------------------

def _iid_chunks(pool_size: int, num_samples: int, seed: int, epoch: int, start: int) -> Iterator[torch.Tensor]:
    """Positions ``start..num_samples-1`` of i.i.d. uniform draws from ``range(pool_size)``.

    Block ``b`` (positions ``b*CHUNK`` to ``(b+1)*CHUNK - 1``) comes from its own generator, so any position is
    reached without drawing the ones before it.
    """
    for b in range(start // CHUNK, -(-num_samples // CHUNK)):
        lo, hi = b * CHUNK, min((b + 1) * CHUNK, num_samples)
        g = epoch_generator(seed, epoch, _S_IID, b)
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
        picks = _randperm(size, epoch_generator(seed, epoch, _S_SELECT))[:num_samples]
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
    """A uniformly random selection of ``num_samples`` indices of ``range(N)`` (the seed's method 1).

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
    num_items = _num_items(data_source)
    replacement = check_bool(replacement, "replacement")
    shuffle = check_bool(shuffle, "shuffle")
    seed = check_int(seed, "seed")
    epoch = check_int(epoch, "epoch", min_value=0)
    pool = _check_exclude(exclude, num_items)
    size = num_items if pool is None else pool.numel()
    what = "the number of samples" if pool is None else "the number of samples left after exclude"
    num_samples = _check_num_samples(num_samples, size, replacement, what)
    return _random_subset(num_items, pool, num_samples, seed, epoch, replacement, shuffle)


# ----- stratified selection ---------------------------------------------------------------------------------

def _stratified(groups: ClassGroups, quotas: torch.Tensor, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    g = epoch_generator(seed, epoch, _S_SELECT)
    parts = []
    for c, q in enumerate(quotas.tolist()):  # one loop step per class; the picks inside are vectorised
        if q > 0:
            members = groups.members(c)
            parts.append(members[_randperm(members.numel(), g)[:q]])
    picks = torch.cat(parts)
    if not shuffle:
        return torch.sort(picks).values
    return picks[_randperm(picks.numel(), epoch_generator(seed, epoch, _S_SHUFFLE))]


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
    """Class-stratified selection without replacement (the seed's method 2).

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
    seed = check_int(seed, "seed")
    epoch = check_int(epoch, "epoch", min_value=0)
    shuffle = check_bool(shuffle, "shuffle")
    pool = _check_exclude(exclude, t.numel())
    groups = ClassGroups(t, pool=pool)
    what = "the number of samples" if pool is None else "the number of samples left after exclude"
    num_samples = _check_num_samples(num_samples, groups.order.numel(), False, what)
    quotas = stratified_quotas(groups.counts, num_samples, min_per_class=min_per_class)
    return _stratified(groups, quotas, seed, epoch, shuffle)


# ----- class-balanced resampling ----------------------------------------------------------------------------

def resolve_samples_per_class(class_counts: torch.Tensor, samples_per_class: int | str) -> int:
    """The per-class target of :class:`ClassBalancedSampler` for the classes present (count > 0).

    ``"max"``: the largest class; ``"min"``: the smallest present class; ``"mean"``: ``N // C`` with ``C``
    the number of classes present; an int ``>= 1``: itself.
    """
    present = class_counts[class_counts > 0]
    if isinstance(samples_per_class, str):
        check_choice(samples_per_class, "samples_per_class", SAMPLES_PER_CLASS)
        if samples_per_class == "max":
            return int(present.max())
        if samples_per_class == "min":
            return int(present.min())
        return int(present.sum()) // present.numel()
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, numbers.Integral):
        raise TypeError(
            f"samples_per_class must be 'max', 'min', 'mean' or an int; got {short_repr(samples_per_class)} "
            f"of type {type(samples_per_class).__name__}"
        )
    return check_int(samples_per_class, "samples_per_class", min_value=1)


class _ClassStream:
    """Class ``c``'s stream ``sigma_c`` of length ``m`` (the order its copies appear in a shuffled plan).

    Without replacement the stream is made of *passes*: pass ``t`` is a fresh uniform permutation of the
    class's ``n`` samples, and the stream is passes ``0, 1, ...`` cut at ``m``. So each sample appears
    ``floor(m/n)`` or ``ceil(m/n)`` times and the remainder is a uniform draw without replacement (the first
    ``m mod n`` of the last pass). Passes are generated in groups of ``max(1, min(CHUNK // n, ceil(m / n)))``
    from one generator per group, so any position is reached without generating the passes before it.

    With replacement the stream is i.i.d. uniform draws from the class, in blocks of ``min(CHUNK, m)``
    positions, one generator per block.
    """

    def __init__(self, members: torch.Tensor, c: int, m: int, replacement: bool, seed: int, epoch: int) -> None:
        self.members = members
        self.n = members.numel()
        self.c, self.m, self.replacement, self.seed, self.epoch = c, m, replacement, seed, epoch
        # passes per generator call: enough for a chunk, but never more than the stream needs
        self.per_group = max(1, min(CHUNK // self.n, -(-m // self.n)))
        self.block = min(CHUNK, m)  # i.i.d. draws per generator call (with replacement)
        self._cache: tuple[int, torch.Tensor] | None = None

    def _group(self, grp: int) -> torch.Tensor:
        """Flattened permutations of group ``grp``: ``per_group`` passes of ``n`` (or ``CHUNK`` i.i.d. draws)."""
        if self._cache is not None and self._cache[0] == grp:
            return self._cache[1]
        g = epoch_generator(self.seed, self.epoch, _S_PASS, self.c, grp)
        n = self.n
        if self.replacement:
            flat = torch.randint(n, (self.block,), generator=g)
        elif self.per_group <= 256:
            flat = torch.cat([_randperm(n, g) for _ in range(self.per_group)])
        else:  # many passes of a small class: sort random keys row-wise instead of a Python loop per pass
            keys = torch.rand((self.per_group, n), generator=g, dtype=torch.float64).numpy()
            flat = torch.from_numpy(np.argsort(keys, axis=1, kind="stable").reshape(-1))
        self._cache = (grp, flat)
        return flat

    def slice(self, a: int, b: int) -> torch.Tensor:
        """``sigma_c[a:b]`` as sample indices."""
        span = self.block if self.replacement else self.per_group * self.n
        parts = []
        while a < b:
            grp, off = divmod(a, span)
            take = min(b - a, span - off)
            parts.append(self._group(grp)[off : off + take])
            a += take
        local = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.members[local]

    def sorted_all(self) -> torch.Tensor:
        """All of ``sigma_c`` in ascending index order (copies adjacent): the ``shuffle=False`` order."""
        if not self.replacement:
            q, r = divmod(self.m, self.n)
            reps = torch.full((self.n,), q, dtype=torch.int64)
            if r:
                last = self.slice(q * self.n, self.m)  # the remainder: first r of pass q
                extra = torch.zeros(self.n, dtype=torch.bool)
                extra[torch.searchsorted(self.members, last)] = True
                reps += extra
            return _repeat(self.members, reps)
        local_counts = torch.zeros(self.n, dtype=torch.int64)
        for a in range(0, self.m, self.block):
            b = min(a + self.block, self.m)
            grp_draws = self._group(a // self.block)[: b - a]
            local_counts += torch.bincount(grp_draws, minlength=self.n)
        return _repeat(self.members, local_counts)


class _BalancedLayout:
    """How a class-balanced plan of ``m`` copies of each present class is laid out over its positions.

    Shuffled plan (exact, lazily computable): give every one of the ``L = C*m`` copies an i.i.d. uniform key
    and sort by key. The copies whose keys fall in the dyadic interval of a leaf (``2**depth`` leaves, about
    ``CHUNK`` copies each) form that leaf; how many copies of each class fall left/right of a split is
    ``Binomial(count, 1/2)``, drawn per tree node from its own generator (``torch.binomial``). Inside a leaf the
    classes are arranged by a uniform permutation (``torch.randperm``). So the class sequence is a uniformly
    random arrangement of the multiset, any leaf is reached in ``O(depth)`` draws (resume without replay), and
    no ``O(L)`` permutation is ever materialised. Leaf ``k`` holds, for each class, the next ``count`` entries
    of that class's stream (:class:`_ClassStream`), placed in stream order on that class's positions: the
    copies of a class appear in the plan exactly in stream order.

    Hand-written because torch offers no lazily evaluated permutation: ``torch.randperm(L)`` costs ~2-3 s at
    ``L = 3e7`` on 2 cores and must be complete before the first index.
    """

    def __init__(self, num_present: int, m: int, seed: int, epoch: int) -> None:
        self.length = num_present * m
        self.seed, self.epoch = seed, epoch
        self.depth = max(0, math.ceil(math.log2(self.length / CHUNK))) if self.length > CHUNK else 0
        self.root = torch.full((num_present,), float(m), dtype=torch.float64)
        self._memo: dict[tuple[int, int], torch.Tensor] = {}

    def _left(self, level: int, index: int, counts: torch.Tensor) -> torch.Tensor:
        key = (level, index)
        left = self._memo.get(key)
        if left is None:
            g = epoch_generator(self.seed, self.epoch, _S_TREE, level, index)
            left = torch.binomial(counts, torch.full_like(counts, 0.5), generator=g)
            if len(self._memo) > 4 * (self.depth + 1):
                self._memo.clear()
            self._memo[key] = left
        return left

    def leaf_at(self, position: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """``(leaf, leaf_start, per-class counts in the leaf, per-class copies before the leaf)`` for the leaf
        holding ``position`` (positions past empty leaves go right)."""
        counts = self.root
        before = torch.zeros_like(counts)
        start, index = 0, 0
        for level in range(self.depth):
            left = self._left(level, index, counts)
            left_total = int(left.sum())
            if position < start + left_total:
                counts, index = left, 2 * index
            else:
                before = before + left
                start += left_total
                counts, index = counts - left, 2 * index + 1
        return index, start, counts.long(), before.long()


def _class_balanced_chunks(
    groups: ClassGroups, m: int, replacement: bool, seed: int, epoch: int, shuffle: bool, start: int = 0
) -> Iterator[torch.Tensor]:
    present = [c for c in range(groups.num_classes) if groups._counts[c] > 0]
    # a class's stream is keyed by its label value: the plan of a class does not depend on which others exist
    streams = [_ClassStream(groups.members(c), groups._classes[c], m, replacement, seed, epoch) for c in present]
    length = len(present) * m
    if not shuffle:
        plan = torch.cat([s.sorted_all() for s in streams])  # class-major, ascending index within a class
        yield from _chunks_of(plan, start)
        return
    layout = _BalancedLayout(len(present), m, seed, epoch)
    pos = start
    while pos < length:
        leaf, leaf_start, counts, before = layout.leaf_at(pos)
        parts = []
        for s, cnt, off in zip(streams, counts.tolist(), before.tolist()):
            if cnt:
                parts.append(s.slice(off, off + cnt))
        content = torch.cat(parts)  # class-major inside the leaf, each class's slice in stream order
        size = content.numel()
        # Uniform arrangement of the leaf's classes; a class's copies then fill its positions in stream order,
        # so the passes stay in sequence across the whole plan.
        classes = _repeat(torch.arange(len(streams)), counts)
        classes = classes[_randperm(size, epoch_generator(seed, epoch, _S_LEAF, leaf))]
        out = torch.empty_like(content)
        out[_stable_argsort_small(classes, len(streams))] = content
        yield out[pos - leaf_start :]
        pos = leaf_start + size


def class_balanced_plan(
    labels: Any,
    seed: int,
    epoch: int,
    *,
    samples_per_class: int | str = "max",
    replacement: bool = False,
    shuffle: bool = True,
) -> torch.Tensor:
    """Class-balanced resampling: exactly ``m`` indices of every class present in ``labels``.

    ``m`` from ``samples_per_class`` (see :func:`resolve_samples_per_class`). Without replacement a class of
    ``n`` samples contributes every sample ``floor(m/n)`` or ``ceil(m/n)`` times (even repetition; the
    ``m mod n`` extra ones drawn uniformly without replacement); with replacement ``m`` i.i.d. uniform draws
    from the class (like ``sklearn.utils.resample``). Fresh draws per ``epoch``.

    ``shuffle=True``: the classes of the ``C*m`` positions form a uniformly random arrangement; within a class
    its copies come in passes (each a fresh random permutation of the class), see ``_BalancedLayout``.
    ``shuffle=False``: the same multiset, class by class in ascending class id, ascending index within a class
    (copies of a sample adjacent).

    Args:
        labels: 1-D integer class labels (``>= 0``); the classes are the distinct label values (any int64).
            Classes with no sample are skipped.
        seed: base seed.
        epoch: epoch number (``>= 0``).
        samples_per_class: ``"max"``, ``"min"``, ``"mean"`` or an int ``>= 1``.
        replacement: i.i.d. draws instead of even repetition.
        shuffle: random order or class-major order.

    Returns:
        int64 tensor of shape ``(C*m,)``.

    Example::

        >>> plan = class_balanced_plan(torch.tensor([0, 0, 0, 1]), seed=0, epoch=0)
        >>> torch.bincount(torch.tensor([0, 0, 0, 1])[plan])
        tensor([3, 3])
    """
    t, _ = check_labels(labels, "labels", max_classes=None)  # grouping only: any label value
    seed = check_int(seed, "seed")
    epoch = check_int(epoch, "epoch", min_value=0)
    replacement = check_bool(replacement, "replacement")
    shuffle = check_bool(shuffle, "shuffle")
    groups = ClassGroups(t)
    m = resolve_samples_per_class(groups.counts, samples_per_class)
    return torch.cat(list(_class_balanced_chunks(groups, m, replacement, seed, epoch, shuffle)))
