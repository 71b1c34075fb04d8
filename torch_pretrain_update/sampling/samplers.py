"""Selection and balancing samplers: random subset, class-stratified selection, class-balanced resampling.

Each sampler is a :class:`~torch_pretrain_update.sampling.base.PlanSampler`: its epoch's global plan comes
from a pure function of ``(inputs, seed, epoch)`` in :mod:`torch_pretrain_update.sampling.plans` or
:mod:`torch_pretrain_update.sampling.balanced`; the base class splits it across ranks like
``DistributedSampler`` and makes it resumable under ``StatefulDataLoader`` (``state_dict()`` =
``{"epoch", "position", "config"}``, O(1) resume, exact at epoch boundaries too; a state from a sampler built
with other inputs is refused: see :mod:`torch_pretrain_update.sampling.base`).

**A fresh selection every epoch.** The plan is a function of ``(seed, epoch)``, so :class:`RandomSubsetSampler`
and :class:`StratifiedSampler` select a *different* subset each epoch, and :class:`ClassBalancedSampler` draws
its copies afresh. As ``DistributedSampler``, they change epoch only when told: call ``set_epoch(epoch)``
before each epoch (every ``iter()`` without it repeats the current epoch's plan, on every rank alike). To
train on one fixed subset for every epoch, compute it once (e.g. ``random_subset_plan(N, k, seed, 0)``) and
wrap it in a ``torch.utils.data.Subset``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from torch_pretrain_update._checks import check_bool, check_labels
from torch_pretrain_update.sampling._inputs import check_indices, check_subset_size, exclude_pool, num_items
from torch_pretrain_update.sampling.balanced import _class_balanced_chunks, class_targets
from torch_pretrain_update.sampling.base import PlanSampler, ramp
from torch_pretrain_update.sampling.plans import (
    ClassGroups,
    _iid_chunks,
    _random_subset,
    _stratified,
    stratified_quotas,
)

__all__ = ["RandomSubsetSampler", "StratifiedSampler", "ClassBalancedSampler"]


class RandomSubsetSampler(PlanSampler):
    """Samples ``num_samples`` indices of ``range(N)`` uniformly at random, a fresh selection each epoch.

    The plan is :func:`~torch_pretrain_update.sampling.plans.random_subset_plan`: without replacement the first
    ``num_samples`` of a ``torch.randperm`` of the allowed indices; with replacement i.i.d. ``torch.randint``
    draws, generated lazily in chunks (any ``num_samples``, constant memory). ``shuffle=False`` yields the same
    selection in ascending index order.

    Args:
        data_source: a sized dataset or an int ``N``.
        num_samples: indices per epoch (``>= 1``; at most the allowed count without replacement).
        replacement: draw with replacement.
        exclude: indices never to select (e.g. already labelled): 1-D integer indices in ``[0, N)`` or a
            bool mask of length ``N``.
        seed: base seed (the same on every rank).
        shuffle: random order (``True``) or ascending index order.
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it.

    Example::

        >>> sampler = RandomSubsetSampler(1000, 100, exclude=already_labelled, seed=0)
        >>> loader = StatefulDataLoader(dataset, batch_size=32, sampler=sampler)
        >>> for epoch in range(3):
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader:
        ...         ...
    """

    def __init__(
        self,
        data_source: Any,
        num_samples: int,
        *,
        replacement: bool = False,
        exclude: Any = None,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        self.num_items = num_items(data_source)
        self.replacement = check_bool(replacement, "replacement")
        self._pool = exclude_pool(exclude, self.num_items)
        self.pool_size = self.num_items if self._pool is None else self._pool.numel()
        self.num_samples = check_subset_size(num_samples, self._pool, self.num_items, replacement=self.replacement)

    def _plan_length(self) -> int:
        return self.num_samples

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_items": self.num_items, "num_samples": self.num_samples,
                "replacement": self.replacement,
                "exclude": None if self._pool is None else self._digest("exclude", self._pool)}

    def _plan(self, epoch: int) -> torch.Tensor:
        return _random_subset(
            self.num_items, self._pool, self.num_samples, self.seed, epoch, self.replacement, self.shuffle
        )

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        if not (self.replacement and self.shuffle):
            return super()._plan_chunks(epoch, start)
        chunks = _iid_chunks(self.pool_size, self.num_samples, self.seed, epoch, start)
        return ramp(chunks if self._pool is None else (self._pool[c] for c in chunks))


class StratifiedSampler(PlanSampler):
    """Class-stratified selection without replacement, fresh each epoch.

    Per-class quotas from :func:`~torch_pretrain_update.sampling.plans.stratified_quotas` (proportional to the class
    sizes of the allowed samples, largest-remainder rounding, ties to the lower class, at least
    ``min_per_class`` from each class that has that many) are fixed at construction (``self.quotas``); each
    epoch picks that many samples of each class uniformly without replacement
    (:func:`~torch_pretrain_update.sampling.plans.stratified_plan`). ``shuffle=False`` yields the same selection in
    ascending index order.

    Args:
        labels: 1-D integer class labels (``>= 0``), one per sample (tensor, ndarray or sequence).
        num_samples: indices per epoch, in ``[1, allowed samples]``.
        min_per_class: the minimum per class (``>= 0``); more classes than ``num_samples`` allows is an error.
        exclude: indices never to select (integer indices or a bool mask of length ``N``).
        seed: base seed (the same on every rank).
        shuffle: random order (``True``) or ascending index order.
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it.

    Example::

        >>> sampler = StratifiedSampler(labels, 10_000, min_per_class=5, seed=0)
        >>> sampler.quotas  # per class, sums to 10_000
        tensor([...])
        >>> loader = StatefulDataLoader(dataset, batch_size=64, sampler=sampler)
    """

    def __init__(
        self,
        labels: Any,
        num_samples: int,
        *,
        min_per_class: int = 1,
        exclude: Any = None,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        t, _ = check_labels(labels, "labels", max_classes=None)  # grouping only: any label value
        pool = exclude_pool(exclude, t.numel())
        self._groups = ClassGroups(t, pool=pool)
        self.num_samples = check_subset_size(num_samples, pool, t.numel())
        self.quotas = stratified_quotas(self._groups.counts, self.num_samples, min_per_class=min_per_class)
        self.min_per_class = min_per_class
        self._num_items = t.numel()
        self._pool = pool  # for the state's config

    def _plan_length(self) -> int:
        return self.num_samples

    def _config(self) -> dict[str, Any]:
        # "labels": the class of every selectable sample (the grouped indices and the class sizes)
        return {**super()._config(), "num_items": self._num_items, "num_samples": self.num_samples,
                "min_per_class": self.min_per_class,
                "exclude": None if self._pool is None else self._digest("exclude", self._pool),
                "labels": self._digest("labels", self._groups.order, self._groups.counts)}

    def _plan(self, epoch: int) -> torch.Tensor:
        return _stratified(self._groups, self.quotas, self.seed, epoch, self.shuffle)


class ClassBalancedSampler(PlanSampler):
    """Class-balanced resampling: exactly ``m_c`` indices of every class ``c`` per epoch (over- and/or
    under-sampling), optionally over an index subset.

    ``samples_per_class`` sets ``m_c``: ``"max"`` (over-sample every class to the largest), ``"min"``
    (under-sample to the smallest present class), ``"mean"`` (``N // C``, ``C`` = classes present) or an int for
    every class alike (``self.num_per_class``); or per class (``self.class_targets``, label -> count): a mapping
    ``{label: count}`` (classes not named keep their size; 0 leaves a class out), a sequence of counts indexed
    by label value, or, for users of imbalanced-learn's ``RandomOverSampler`` / ``RandomUnderSampler``, their
    ``sampling_strategy`` with ``resampling="over"`` / ``"under"``: a float (binary labels: the minority /
    majority ratio after resampling) or ``"auto"``, ``"all"``, ``"not majority"``, ``"not minority"``,
    ``"majority"``, ``"minority"``, giving exactly their per-class counts. Classes absent from ``labels`` are
    skipped. Without replacement a class of ``n`` samples yields every sample ``floor(m/n)`` or ``ceil(m/n)``
    times (even repetition; the ``m mod n`` extra ones drawn uniformly without replacement, afresh each epoch);
    with replacement ``m`` i.i.d. uniform draws from the class (like ``sklearn.utils.resample``).

    Order: with ``shuffle=True`` the classes of the ``sum(m_c)`` positions are a uniformly random arrangement
    and a class's copies come in passes (each a fresh random permutation of the class), generated lazily in
    chunks, so the first index comes long before the plan is complete (see
    :func:`~torch_pretrain_update.sampling.balanced.class_balanced_plan`). ``shuffle=False`` yields the same
    multiset class by class (ascending class id), in the order of the samples within a class, copies of a
    sample adjacent.

    Args:
        labels: 1-D integer class labels (``>= 0``), one per sample of the dataset.
        samples_per_class: ``"max"``, ``"min"``, ``"mean"``, an int ``>= 1``, per-class counts (a mapping or a
            sequence), or with ``resampling`` a float ratio or an imbalanced-learn strategy name.
        replacement: i.i.d. draws instead of even repetition.
        resampling: ``"over"`` or ``"under"`` (as imbalanced-learn's ``RandomOverSampler`` /
            ``RandomUnderSampler``): how a float ratio or a strategy name reads; with per-class counts it
            checks that they only add (``"over"``) or only remove (``"under"``) samples.
        indices: balance only these dataset indices (e.g. a selection made by another sampler): the plan runs
            over ``labels[indices]`` and yields dataset indices from ``indices``. 1-D integer indices into
            ``labels`` (order kept, duplicates allowed) or a bool mask; part of the state's ``config``.
        seed: base seed (the same on every rank).
        shuffle: random order (``True``) or class-major order.
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it.

    Example::

        >>> sampler = ClassBalancedSampler(labels, samples_per_class="max", seed=0)
        >>> len(sampler) == sampler.num_classes_present * sampler.num_per_class
        True
        >>> # imbalanced-learn's RandomUnderSampler(sampling_strategy={0: 100}) on the selected samples only
        >>> sampler = ClassBalancedSampler(labels, samples_per_class={0: 100}, resampling="under", indices=selected)
        >>> loader = StatefulDataLoader(dataset, batch_size=64, sampler=sampler)
    """

    def __init__(
        self,
        labels: Any,
        *,
        samples_per_class: Any = "max",
        replacement: bool = False,
        resampling: str | None = None,
        indices: Any = None,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        t, _ = check_labels(labels, "labels", max_classes=None)  # grouping only: any label value
        self.replacement = check_bool(replacement, "replacement")
        if indices is not None:
            self._index_map = check_indices(indices, t.numel())
            t = t[self._index_map]  # the plan runs over positions of the subset
        self._groups = ClassGroups(t)
        self._targets = class_targets(self._groups, samples_per_class, resampling)
        self.samples_per_class = samples_per_class
        self.resampling = resampling
        self.num_classes_present = self._groups.num_classes
        #: per class label: how many indices of it one epoch holds
        self.class_targets = {self._groups.label(c): m for c, m in enumerate(self._targets)}
        #: the common count when every class gets the same (``"max"``, ``"min"``, ``"mean"``, an int), else None
        self.num_per_class: int | None = self._targets[0] if len(set(self._targets)) == 1 else None

    @property
    def indices(self) -> torch.Tensor | None:
        """The dataset indices the plan runs over (None: all of ``labels``)."""
        return self._index_map

    def _plan_length(self) -> int:
        return sum(self._targets)

    def _config(self) -> dict[str, Any]:
        config = {**super()._config(), "num_items": self._groups.order.numel(),
                  "labels": self._digest("labels", self._groups.order, self._groups.counts, self._groups.classes),
                  "replacement": self.replacement}
        if self.num_per_class is not None:  # the key states have always recorded
            config["num_per_class"] = self.num_per_class
        else:
            config["class_targets"] = [[label, m] for label, m in self.class_targets.items()]
        return config

    def _chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        return _class_balanced_chunks(
            self._groups, self._targets, self.replacement, self.seed, epoch, self.shuffle, start
        )

    def _plan(self, epoch: int) -> torch.Tensor:
        return torch.cat(list(self._chunks(epoch, 0)))

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        if not self.shuffle:  # class-major order is built whole: keep it for the epoch
            return super()._plan_chunks(epoch, start)
        return ramp(self._chunks(epoch, start))
