"""Selection and balancing samplers: random subset, class-stratified selection, class-balanced resampling.

Each sampler is a :class:`~torch_pretrain_update.sampling.base.PlanSampler`: its epoch's global plan comes
from a pure function in :mod:`torch_pretrain_update.sampling.plans` of ``(inputs, seed, epoch)``; the base class splits
it across ranks like ``DistributedSampler`` and makes it resumable under ``StatefulDataLoader``
(``state_dict()`` = ``{"epoch", "position", "config"}``, O(1) resume, exact at epoch boundaries too; a state
from a sampler built with other inputs is refused: see :mod:`torch_pretrain_update.sampling.base`).

**A fresh selection every epoch.** The plan is a function of ``(seed, epoch)``, so :class:`RandomSubsetSampler`
and :class:`StratifiedSampler` select a *different* subset each epoch (call ``set_epoch``), and
:class:`ClassBalancedSampler` draws its copies afresh. To train on one fixed subset for every epoch, compute it
once (e.g. ``random_subset_plan(N, k, seed, 0)``) and wrap it in a ``torch.utils.data.Subset``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from torch_pretrain_update._checks import check_bool, check_labels
from torch_pretrain_update.sampling.base import PlanSampler
from torch_pretrain_update.sampling.plans import (
    ClassGroups,
    _check_exclude,
    _check_num_samples,
    _chunks_of,
    _class_balanced_chunks,
    _iid_chunks,
    _num_items,
    _ramp,
    _random_subset,
    _stratified,
    resolve_samples_per_class,
    stratified_quotas,
)

__all__ = ["RandomSubsetSampler", "StratifiedSampler", "ClassBalancedSampler"]


class _MaterialisedPlan(PlanSampler):
    """A plan computed whole per epoch (cached by the base) and handed out in chunks of ``CHUNK``."""

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        return _ramp(_chunks_of(self._cached_plan(epoch), start))


class RandomSubsetSampler(_MaterialisedPlan):
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
        self.num_items = _num_items(data_source)
        self.replacement = check_bool(replacement, "replacement")
        self._pool = _check_exclude(exclude, self.num_items)
        self.pool_size = self.num_items if self._pool is None else self._pool.numel()
        what = "the number of samples" if self._pool is None else "the number of samples left after exclude"
        self.num_samples = _check_num_samples(num_samples, self.pool_size, self.replacement, what)

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
        return _ramp(chunks if self._pool is None else (self._pool[c] for c in chunks))


class StratifiedSampler(_MaterialisedPlan):
    """Class-stratified selection without replacement (the seed's "select by class"), fresh each epoch.

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
        pool = _check_exclude(exclude, t.numel())
        self._groups = ClassGroups(t, pool=pool)
        what = "the number of samples" if pool is None else "the number of samples left after exclude"
        self.num_samples = _check_num_samples(num_samples, self._groups.order.numel(), False, what)
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
    """Class-balanced resampling: exactly ``m`` indices of every class per epoch (over- and/or under-sampling).

    ``m`` is ``samples_per_class``: ``"max"`` (over-sample every class to the largest), ``"min"``
    (under-sample to the smallest present class), ``"mean"`` (``N // C``, ``C`` = classes present) or an int;
    resolved at construction (``self.num_per_class``). Classes absent from ``labels`` are skipped. Without
    replacement a class of ``n`` samples yields every sample ``floor(m/n)`` or ``ceil(m/n)`` times (even
    repetition; the ``m mod n`` extra ones drawn uniformly without replacement, afresh each epoch); with
    replacement ``m`` i.i.d. uniform draws from the class (like ``sklearn.utils.resample``).

    Order: with ``shuffle=True`` the classes of the ``C*m`` positions are a uniformly random arrangement and a
    class's copies come in passes (each a fresh random permutation of the class), generated lazily in chunks,
    so the first index comes long before the plan is complete (see
    :func:`~torch_pretrain_update.sampling.plans.class_balanced_plan`). ``shuffle=False`` yields the same multiset class
    by class (ascending class id), ascending index within a class, copies of a sample adjacent.

    Args:
        labels: 1-D integer class labels (``>= 0``), one per sample.
        samples_per_class: ``"max"``, ``"min"``, ``"mean"`` or an int ``>= 1``.
        replacement: i.i.d. draws instead of even repetition.
        seed: base seed (the same on every rank).
        shuffle: random order (``True``) or class-major order.
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it.

    Example::

        >>> sampler = ClassBalancedSampler(labels, samples_per_class="max", seed=0)
        >>> len(sampler) == sampler.num_classes_present * sampler.num_per_class
        True
        >>> loader = StatefulDataLoader(dataset, batch_size=64, sampler=sampler)
    """

    def __init__(
        self,
        labels: Any,
        *,
        samples_per_class: int | str = "max",
        replacement: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        t, _ = check_labels(labels, "labels", max_classes=None)  # grouping only: any label value
        self.replacement = check_bool(replacement, "replacement")
        self._groups = ClassGroups(t)
        self.num_per_class = resolve_samples_per_class(self._groups.counts, samples_per_class)
        self.samples_per_class = samples_per_class
        self.num_classes_present = int((self._groups.counts > 0).sum())

    def _plan_length(self) -> int:
        return self.num_classes_present * self.num_per_class

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_items": self._groups.order.numel(), "num_per_class": self.num_per_class,
                "replacement": self.replacement,
                "labels": self._digest("labels", self._groups.order, self._groups.counts, self._groups.classes)}

    def _chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        return _class_balanced_chunks(
            self._groups, self.num_per_class, self.replacement, self.seed, epoch, self.shuffle, start
        )

    def _plan(self, epoch: int) -> torch.Tensor:
        return torch.cat(list(self._chunks(epoch, 0)))

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        if not self.shuffle:  # class-major order is built whole: keep it for the epoch
            return _ramp(_chunks_of(self._cached_plan(epoch), start))
        return _ramp(self._chunks(epoch, start))
