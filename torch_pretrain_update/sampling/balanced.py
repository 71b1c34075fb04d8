"""The class-balanced plan: exactly ``m_c`` indices of every class ``c`` per epoch (over- and/or under-sampling).

``m_c`` is one number for every class (``samples_per_class="max"``, ``"min"``, ``"mean"`` or an int) or set per
class: a mapping ``{label: count}`` or a sequence of counts indexed by label value, or, as imbalanced-learn's
``sampling_strategy`` of ``RandomOverSampler`` / ``RandomUnderSampler`` with ``resampling="over"`` /
``"under"``, a float ratio (binary labels) or a strategy name (``"auto"``, ``"all"``, ``"not majority"``,
``"not minority"``, ``"majority"``, ``"minority"``), giving the same per-class counts as those samplers.

The shuffled plan is generated lazily, chunk by chunk, each a pure function of ``(labels, seed, epoch,
position)``: see ``_BalancedLayout`` and ``_ClassStream``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torch_pretrain_update._checks import check_bool, check_choice, check_int, check_labels, short_repr
from torch_pretrain_update._rng import (
    STREAM_BALANCED_LEAF,
    STREAM_BALANCED_TREE,
    STREAM_CLASS_PASSES,
    epoch_generator,
)
from torch_pretrain_update.sampling import plans  # plans.CHUNK is read at call time: one definition
from torch_pretrain_update.sampling._inputs import check_counts, check_seed_epoch
from torch_pretrain_update.sampling.plans import ClassGroups, _randperm, _repeat, _stable_argsort_small

__all__ = ["class_balanced_plan", "resolve_samples_per_class", "SAMPLES_PER_CLASS"]

SAMPLES_PER_CLASS = ("max", "min", "mean")
#: imbalanced-learn's names of the classes to resample (``sampling_strategy`` of its random samplers)
IMBLEARN_STRATEGIES = ("auto", "all", "not majority", "not minority", "majority", "minority")
RESAMPLING = ("over", "under")


# ----- per-class targets ----------------------------------------------------------------------------------


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
            f"samples_per_class must be 'max', 'min', 'mean', an int, per-class counts (a mapping label -> "
            "count or a sequence indexed by label) or, with resampling='over'/'under', a float ratio or an "
            f"imbalanced-learn strategy name; got {short_repr(samples_per_class)} of type "
            f"{type(samples_per_class).__name__}"
        )
    return check_int(samples_per_class, "samples_per_class", min_value=1)


def class_targets(groups: ClassGroups, samples_per_class: Any, resampling: str | None = None) -> list[int]:
    """How many indices of each class of ``groups`` (the ``c``-th present) one epoch's plan holds.

    See the module docstring for the forms of ``samples_per_class``; ``resampling`` (``"over"``/``"under"``)
    is needed by a float ratio and a strategy name, and with per-class counts checks their direction as
    imbalanced-learn does (over-sampling never removes samples, under-sampling never adds them).
    """
    if resampling is not None:
        resampling = check_choice(resampling, "resampling", RESAMPLING)
    counts = [groups.size(c) for c in range(groups.num_classes)]
    spc = samples_per_class
    if isinstance(spc, str) and spc in IMBLEARN_STRATEGIES:
        targets = _strategy_targets(counts, spc, _needs_resampling(resampling, spc))
    elif isinstance(spc, numbers.Real) and not isinstance(spc, numbers.Integral) and resampling is not None:
        targets = _ratio_targets(counts, float(spc), resampling)
    elif isinstance(spc, Mapping):
        targets = _mapping_targets(groups, counts, spc)
    elif isinstance(spc, (list, tuple, np.ndarray, torch.Tensor)):
        targets = _sequence_targets(groups, counts, spc)
    else:  # one count for every class (refuses anything else, a float without resampling included)
        if resampling is not None:
            raise ValueError(
                f"resampling={resampling!r} applies to a float ratio, an imbalanced-learn strategy name or "
                f"per-class counts; samples_per_class={spc!r} sets every class alike"
            )
        return [resolve_samples_per_class(groups.counts, spc)] * len(counts)
    for c, (n, m) in enumerate(zip(counts, targets)):
        if resampling == "over" and m < n or resampling == "under" and m > n:
            raise ValueError(
                f"samples_per_class asks {m} samples of class {groups.label(c)}, which has {n}: resampling="
                f"{resampling!r} only {'adds' if resampling == 'over' else 'removes'} samples"
            )
    if sum(targets) == 0:
        raise ValueError("samples_per_class gives every class 0 samples: the plan would be empty")
    return targets


def _needs_resampling(resampling: str | None, spc: Any) -> str:
    if resampling is None:
        raise ValueError(
            f"samples_per_class={spc!r} means different counts when over- and when under-sampling (as "
            "imbalanced-learn's sampling_strategy): pass resampling='over' (RandomOverSampler) or 'under' "
            "(RandomUnderSampler)"
        )
    return resampling


def _strategy_targets(counts: list[int], name: str, resampling: str) -> list[int]:
    """imbalanced-learn's strategy names: the chosen classes go to the largest (over) or smallest (under)
    class size, the others keep theirs. Ties: the first class in label order is the majority/minority."""
    if name == "auto":
        name = "not majority" if resampling == "over" else "not minority"
    if (name, resampling) in (("majority", "over"), ("minority", "under")):
        raise ValueError(
            f"samples_per_class={name!r} cannot be used with resampling={resampling!r} (as in imbalanced-learn: "
            "it would leave every class as it is)"
        )
    majority, minority = counts.index(max(counts)), counts.index(min(counts))
    chosen = {
        "all": lambda c: True,
        "not majority": lambda c: c != majority,
        "not minority": lambda c: c != minority,
        "majority": lambda c: c == majority,
        "minority": lambda c: c == minority,
    }[name]
    level = max(counts) if resampling == "over" else min(counts)
    return [level if chosen(c) else n for c, n in enumerate(counts)]


def _ratio_targets(counts: list[int], ratio: float, resampling: str) -> list[int]:
    """A float ratio (minority / majority after resampling), binary labels, as imbalanced-learn computes it:
    over-sampling raises the minority to ``int(n_majority * ratio)``, under-sampling lowers the majority to
    ``int(n_minority / ratio)``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(
            f"samples_per_class as a float (the minority/majority ratio after resampling) must be in (0, 1]; "
            f"got {ratio}"
        )
    if len(counts) != 2:
        raise ValueError(
            f"samples_per_class as a float needs binary labels (2 classes, as imbalanced-learn); got "
            f"{len(counts)} classes: give per-class counts instead"
        )
    targets = list(counts)
    if resampling == "over":
        majority = counts.index(max(counts))
        for c in range(2):
            extra = int(counts[majority] * ratio - counts[c])
            if c != majority and extra <= 0:
                raise ValueError(
                    f"samples_per_class={ratio} with resampling='over' would not add samples to the minority "
                    f"class ({counts[c]} of {counts[majority]}): use a larger ratio"
                )
            if c != majority:
                targets[c] = counts[c] + extra
    else:
        minority = counts.index(min(counts))
        for c in range(2):
            if c != minority:
                targets[c] = int(counts[minority] / ratio)
                if targets[c] > counts[c]:
                    raise ValueError(
                        f"samples_per_class={ratio} with resampling='under' would add samples to the majority "
                        f"class ({counts[minority]} / {ratio} > {counts[c]}): use a larger ratio"
                    )
    return targets


def _mapping_targets(groups: ClassGroups, counts: list[int], mapping: Mapping[Any, Any]) -> list[int]:
    """``{label: count}``; classes not named keep their size."""
    position = {groups.label(c): c for c in range(groups.num_classes)}
    targets = list(counts)
    for label, count in mapping.items():
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise TypeError(f"samples_per_class keys must be integer labels; got {short_repr(label)}")
        c = position.get(int(label))
        if c is None:
            raise ValueError(
                f"samples_per_class names class {int(label)}, which has no sample (the classes present are "
                f"{short_repr(groups.classes.tolist())})"
            )
        targets[c] = check_int(count, f"samples_per_class[{int(label)}]", min_value=0)
    return targets


def _sequence_targets(groups: ClassGroups, counts: list[int], values: Any) -> list[int]:
    """Counts indexed by label value ``0 .. K-1``; a label without samples must have count 0."""
    t = check_counts(values, "samples_per_class")
    top = groups.label(groups.num_classes - 1)
    if top >= t.numel():
        raise ValueError(
            f"samples_per_class has {t.numel()} counts (one per label value 0..{t.numel() - 1}) but the labels "
            f"go up to {top}"
        )
    present = torch.zeros(t.numel(), dtype=torch.bool)
    present[groups.classes] = True
    orphan = torch.nonzero((t > 0) & ~present).flatten()
    if orphan.numel():
        v = int(orphan[0])
        raise ValueError(f"samples_per_class[{v}] is {int(t[v])} but label {v} has no sample")
    return [int(t[groups.label(c)]) for c in range(len(counts))]


# ----- the plan ---------------------------------------------------------------------------------------------


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
        self.per_group = max(1, min(plans.CHUNK // self.n, -(-m // self.n)))
        self.block = min(plans.CHUNK, m)  # i.i.d. draws per generator call (with replacement)
        self._cache: tuple[int, torch.Tensor] | None = None

    def _group(self, grp: int) -> torch.Tensor:
        """Flattened permutations of group ``grp``: ``per_group`` passes of ``n`` (or ``CHUNK`` i.i.d. draws)."""
        if self._cache is not None and self._cache[0] == grp:
            return self._cache[1]
        g = epoch_generator(self.seed, self.epoch, STREAM_CLASS_PASSES, self.c, grp)
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

    def __init__(self, targets: list[int], seed: int, epoch: int) -> None:
        self.length = sum(targets)
        self.seed, self.epoch = seed, epoch
        chunk = plans.CHUNK
        self.depth = max(0, math.ceil(math.log2(self.length / chunk))) if self.length > chunk else 0
        self.root = torch.tensor(targets, dtype=torch.float64)
        self._memo: dict[tuple[int, int], torch.Tensor] = {}

    def _left(self, level: int, index: int, counts: torch.Tensor) -> torch.Tensor:
        key = (level, index)
        left = self._memo.get(key)
        if left is None:
            g = epoch_generator(self.seed, self.epoch, STREAM_BALANCED_TREE, level, index)
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
    groups: ClassGroups,
    m: int | Sequence[int],
    replacement: bool,
    seed: int,
    epoch: int,
    shuffle: bool,
    start: int = 0,
) -> Iterator[torch.Tensor]:
    """The class-balanced plan from position ``start``, in chunks: ``m`` indices of every class of ``groups``
    (or ``m[c]`` of the ``c``-th, a class with 0 left out)."""
    targets = [m] * groups.num_classes if isinstance(m, int) else list(m)
    present = [c for c in range(groups.num_classes) if targets[c] > 0]
    # a class's stream is keyed by its label value: the plan of a class does not depend on which others exist
    streams = [_ClassStream(groups.members(c), groups.label(c), targets[c], replacement, seed, epoch) for c in present]
    length = sum(targets[c] for c in present)
    if not shuffle:
        plan = torch.cat([s.sorted_all() for s in streams])  # class-major, ascending index within a class
        yield plan[start:]
        return
    layout = _BalancedLayout([targets[c] for c in present], seed, epoch)
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
        classes = classes[_randperm(size, epoch_generator(seed, epoch, STREAM_BALANCED_LEAF, leaf))]
        out = torch.empty_like(content)
        out[_stable_argsort_small(classes, len(streams))] = content
        yield out[pos - leaf_start :]
        pos = leaf_start + size


def class_balanced_plan(
    labels: Any,
    seed: int,
    epoch: int,
    *,
    samples_per_class: Any = "max",
    replacement: bool = False,
    shuffle: bool = True,
    resampling: str | None = None,
) -> torch.Tensor:
    """Class-balanced resampling: exactly ``m_c`` indices of every class ``c`` present in ``labels``.

    ``m_c`` from ``samples_per_class`` (see the module docstring; ``"max"``, ``"min"``, ``"mean"`` and an int
    as :func:`resolve_samples_per_class`). Without replacement a class of ``n`` samples contributes every sample
    ``floor(m/n)`` or ``ceil(m/n)`` times (even repetition; the ``m mod n`` extra ones drawn uniformly without
    replacement); with replacement ``m`` i.i.d. uniform draws from the class (like ``sklearn.utils.resample``).
    Fresh draws per ``epoch``.

    ``shuffle=True``: the classes of the ``sum(m_c)`` positions form a uniformly random arrangement; within a
    class its copies come in passes (each a fresh random permutation of the class), see ``_BalancedLayout``.
    ``shuffle=False``: the same multiset, class by class in ascending class id, ascending index within a class
    (copies of a sample adjacent).

    Args:
        labels: 1-D integer class labels (``>= 0``); the classes are the distinct label values (any int64).
            Classes with no sample are skipped.
        seed: base seed.
        epoch: epoch number (``>= 0``).
        samples_per_class: ``"max"``, ``"min"``, ``"mean"``, an int ``>= 1``, per-class counts (a mapping
            ``{label: count}``, or a sequence indexed by label value), or with ``resampling`` a float ratio or
            an imbalanced-learn strategy name.
        replacement: i.i.d. draws instead of even repetition.
        shuffle: random order or class-major order.
        resampling: ``"over"`` or ``"under"``: how a float ratio or a strategy name reads (as imbalanced-learn's
            ``RandomOverSampler`` / ``RandomUnderSampler``); with per-class counts, checks their direction.

    Returns:
        int64 tensor of shape ``(sum(m_c),)``.

    Example::

        >>> plan = class_balanced_plan(torch.tensor([0, 0, 0, 1]), seed=0, epoch=0)
        >>> torch.bincount(torch.tensor([0, 0, 0, 1])[plan])
        tensor([3, 3])
        >>> y = torch.tensor([0] * 8 + [1] * 2)
        >>> torch.bincount(y[class_balanced_plan(y, 0, 0, samples_per_class=0.5, resampling="over")])
        tensor([8, 4])
    """
    t, _ = check_labels(labels, "labels", max_classes=None)  # grouping only: any label value
    seed, epoch = check_seed_epoch(seed, epoch)
    replacement = check_bool(replacement, "replacement")
    shuffle = check_bool(shuffle, "shuffle")
    groups = ClassGroups(t)
    targets = class_targets(groups, samples_per_class, resampling)
    return torch.cat(list(_class_balanced_chunks(groups, targets, replacement, seed, epoch, shuffle)))
