"""``WeightedSampler``: a distributed, resumable drop-in for ``torch.utils.data.WeightedRandomSampler``.

``WeightedRandomSampler`` calls ``torch.multinomial`` over all N weights (refused above 2**24 categories),
builds a Python list of the whole plan before the first index comes out, has no distributed form, and under
``StatefulDataLoader`` resumes to a different stream unless given a generator. ``WeightedSampler`` draws the
plan in chunks (:func:`torch_pretrain_update.sampling.weighted_plans.weighted_draw_chunk`), each a pure function of
``(weights, seed, epoch, chunk)``, so the first index is out after one chunk, any N works, ranks split one
global plan, and a resume jumps straight to its chunk.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch

from torch_pretrain_update._checks import check_bool, check_int
from torch_pretrain_update.sampling.base import PlanSampler
from torch_pretrain_update.sampling.weighted_plans import (
    CumulativeWeights,
    _count_positive,
    _index_dtype,
    _iter_draws,
    _without_replacement,
    check_weights,
)

__all__ = ["WeightedSampler"]

#: indices handed to the rank split at a time when the plan is materialised (without replacement)
_SLICE = 1 << 16


class WeightedSampler(PlanSampler):
    """Sample ``num_samples`` indices with probability proportional to ``weights``.

    A drop-in for ``WeightedRandomSampler(weights, num_samples, replacement)`` that also works for N > 2**24
    (tested at N = 1e8), is split across ranks like ``DistributedSampler`` and resumes exactly under
    ``torchdata``'s ``StatefulDataLoader``.

    - ``replacement=True``: i.i.d. draws, ``P(i) = w_i / sum(w)``, by inverse CDF on float64 cumulative sums
      (8 bytes per weight, built on the first ``iter()``). The plan is generated lazily in chunks of
      :data:`~torch_pretrain_update.sampling.weighted_plans.DRAW_CHUNK` draws; nothing of size ``num_samples`` is
      stored. ``num_samples`` may exceed N.
    - ``replacement=False``: ``num_samples`` distinct indices by exponential keys (Efraimidis-Spirakis), at
      most the number of positive weights. The epoch's selection is computed on the first ``iter()`` of that
      epoch (two streamed passes over the weights) and kept as int32 indices while N < 2**31.

    Zero weights are never drawn. The global plan of an epoch depends only on ``(weights, num_samples,
    replacement, seed, epoch, shuffle)``: not on the number of ranks or DataLoader workers.

    Args:
        weights: 1-D non-negative finite weights (tensor, ndarray or sequence), not all zero; need not sum
            to 1. A float32/float64 CPU tensor is used without a copy: do not modify it while the sampler is
        in use. num_samples: plan length per epoch (all ranks together).
        replacement: draw with replacement (the default, as ``WeightedRandomSampler``).
        seed: base seed; epoch ``e`` uses generators seeded by ``(seed, e, ...)``. Same on every rank.
        shuffle: random order. With ``replacement=False`` and ``shuffle=False`` the selection comes in
            ascending index order; with ``replacement=True`` and ``shuffle=False`` each chunk of
            ``DRAW_CHUNK`` draws is in ascending index order (good locality for memory-mapped data). The
            multiset of draws does not depend on ``shuffle``.
        num_replicas: number of ranks (default: the initialised process group, else 1).
        rank: this rank (default: the initialised process group, else 0).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it with its start.

    Example::

        >>> sampler = WeightedSampler(torch.tensor([0.1, 0.0, 0.9]), num_samples=4, seed=0)
        >>> sampler.set_epoch(0)
        >>> all(i in (0, 2) for i in sampler)
        True
        >>> # loader = StatefulDataLoader(dataset, sampler=sampler, batch_size=...)
        >>> # for epoch in range(E): sampler.set_epoch(epoch); for batch in loader: ...
    """

    def __init__(
        self,
        weights: Any,
        num_samples: int,
        *,
        replacement: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last
        )
        self.replacement = check_bool(replacement, "replacement")
        # at most 2**63 - 1: plan positions are int64 and len(sampler) must fit in a Py_ssize_t
        self.num_samples = check_int(num_samples, "num_samples", min_value=1, max_value=sys.maxsize)
        self.weights = check_weights(weights, "weights")
        if not self.replacement:
            positive = _count_positive(self.weights)
            if self.num_samples > positive:
                raise ValueError(
                    f"num_samples must be <= the number of positive weights ({positive} of "
                    f"{self.weights.numel()}) when replacement=False; got {self.num_samples}"
                )
        self._table: CumulativeWeights | None = None

    def _plan_length(self) -> int:
        return self.num_samples

    def _config(self) -> dict[str, Any]:
        # the weights are hashed once, on the first state_dict()/load_state_dict(): ~0.1 s per 10^7 float32
        return {**super()._config(), "num_items": self.weights.numel(), "num_samples": self.num_samples,
                "replacement": self.replacement, "weights": self._digest("weights", self.weights)}

    def _cumulative(self) -> CumulativeWeights:
        if self._table is None:
            self._table = CumulativeWeights(self.weights)
        return self._table

    def _plan(self, epoch: int) -> torch.Tensor:
        """The whole global plan of ``epoch`` (materialised; iteration itself never needs this for
        ``replacement=True``)."""
        if self.replacement:
            return torch.cat(list(self._plan_chunks(epoch, 0)))
        n = self.weights.numel()
        return _without_replacement(
            self.weights, self.num_samples, self.seed, epoch, self.shuffle, _index_dtype(n), ()
        )

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        if self.replacement:
            yield from _iter_draws(
                self._cumulative(), self.num_samples, self.seed, epoch, start, self.shuffle, ()
            )
            return
        plan = self._cached_plan(epoch)
        for s in range(start, plan.numel(), _SLICE):
            yield plan[s : s + _SLICE]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self.weights.numel()}, num_samples={self.num_samples}, "
            f"replacement={self.replacement}, seed={self.seed}, num_replicas={self.num_replicas}, "
            f"rank={self.rank})"
        )
