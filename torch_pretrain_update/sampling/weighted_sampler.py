"""``WeightedSampler``: a distributed, resumable drop-in for ``torch.utils.data.WeightedRandomSampler``.

``WeightedRandomSampler`` calls ``torch.multinomial`` over all N weights (refused above 2**24 categories),
builds a Python list of the whole plan before the first index comes out, has no distributed form, and under
``StatefulDataLoader`` resumes to a different stream unless given a generator. ``WeightedSampler`` draws the
plan in chunks (:func:`torch_pretrain_update.sampling.draws.weighted_draw_chunk`), each a pure function of
``(weights, seed, epoch, chunk)``, so the first index is out after one chunk, any N works, ranks split one
global plan, and a resume jumps straight to its chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from torch_pretrain_update._checks import check_bool, check_int
from torch_pretrain_update.sampling._inputs import (
    check_indices,
    check_num_samples,
    check_weights,
    count_positive,
    index_dtype,
)
from torch_pretrain_update.sampling.base import PlanSampler
from torch_pretrain_update.sampling.draws import CumulativeWeights, _iter_draws, _without_replacement

__all__ = ["WeightedSampler"]


def _plan_seed(seed: Any, generator: Any) -> int:
    """The plan's seed: ``seed`` (default 0), or the initial seed of a ``torch.Generator``."""
    if generator is None:
        return 0 if seed is None else check_int(seed, "seed")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if seed is not None:
        raise ValueError(
            f"pass seed or generator, not both (the generator's initial seed is the plan's seed); got seed={seed!r}"
        )
    return int(generator.initial_seed())


class WeightedSampler(PlanSampler):
    """Sample ``num_samples`` indices with probability proportional to ``weights``.

    A drop-in for ``WeightedRandomSampler(weights, num_samples, replacement=True, generator=None)`` (the same
    arguments, by position or keyword) that also works for N > 2**24 (tested at N = 1e8), is split across ranks
    like ``DistributedSampler`` and resumes exactly under ``torchdata``'s ``StatefulDataLoader``.

    - ``replacement=True``: i.i.d. draws, ``P(i) = w_i / sum(w)``, by inverse CDF on float64 cumulative sums
      (8 bytes per weight, built on the first ``iter()``). The plan is generated lazily in chunks of
      :data:`~torch_pretrain_update.sampling.draws.DRAW_CHUNK` draws; nothing of size ``num_samples`` is
      stored. ``num_samples`` may exceed N.
    - ``replacement=False``: ``num_samples`` distinct indices by exponential keys (Efraimidis-Spirakis), at
      most the number of positive weights. The epoch's selection is computed on the first ``iter()`` of that
      epoch (two streamed passes over the weights) and kept as int32 indices while N < 2**31.

    Zero weights are never drawn. The global plan of an epoch depends only on ``(weights, indices,
    num_samples, replacement, seed, epoch, shuffle)``: not on the number of ranks or DataLoader workers.

    **Epochs advance by themselves**, as ``WeightedRandomSampler`` draws afresh on every iteration: an
    ``iter()`` after one of the same epoch began runs the next epoch (epoch ``e + 1``, a pure function of the
    seed and the epoch), unless ``set_epoch`` (which always wins) or ``load_state_dict`` came in between. A
    state of a finished epoch resumes at the next epoch; a state taken mid-epoch continues that epoch.

    **Generator.** ``WeightedRandomSampler`` draws from ``generator`` (or torch's global generator). Here a
    generator's *initial seed* (``generator.initial_seed()``, read once, at construction) is the plan's seed,
    as if passed as ``seed``: the stream is then a pure function of that seed and the epoch. The generator is
    never advanced, and its later state (``manual_seed`` after construction, draws made with it) is not read.
    Without ``generator`` or ``seed`` the seed is 0: every run draws the same epochs, and torch's global seed
    (``torch.manual_seed``) has no effect.

    Args:
        weights: 1-D non-negative finite weights (tensor, ndarray or sequence), not all zero; need not sum to
            1. A float32/float64 CPU tensor is used without a copy: do not modify it while the sampler is in
            use.
        num_samples: plan length per epoch (all ranks together).
        replacement: draw with replacement (the default, as ``WeightedRandomSampler``).
        generator: a ``torch.Generator`` whose initial seed is the plan's seed (see above), or None.
        seed: base seed (default 0; not together with ``generator``); epoch ``e`` uses generators seeded by
            ``(seed, e, ...)``. Same on every rank.
        shuffle: random order. With ``replacement=False`` and ``shuffle=False`` the selection comes in
            ascending index order; with ``replacement=True`` and ``shuffle=False`` each chunk of
            ``DRAW_CHUNK`` draws is in ascending index order (good locality for memory-mapped data). The
            multiset of draws does not depend on ``shuffle``.
        num_replicas: number of ranks (default: the initialised process group, else 1).
        rank: this rank (default: the initialised process group, else 0).
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it with its start.
        indices: draw only among these dataset indices (e.g. a selection made by another sampler), with
            weights ``weights[indices]``; yields dataset indices. 1-D integer indices into ``weights`` (order
            kept; an index listed twice is two candidates) or a bool mask; part of the state's ``config``.

    Example::

        >>> sampler = WeightedSampler(torch.tensor([0.1, 0.0, 0.9]), 4, True, torch.Generator().manual_seed(1))
        >>> all(i in (0, 2) for i in sampler)
        True
        >>> a, b = list(sampler), list(sampler)  # epochs 1 and 2: fresh draws, as WeightedRandomSampler
        >>> # loader = StatefulDataLoader(dataset, sampler=sampler, batch_size=...)
        >>> # for epoch in range(E): for batch in loader: ...   (set_epoch(epoch) optional)
    """

    _advances_epoch = True

    def __init__(
        self,
        weights: Any,
        num_samples: int,
        replacement: bool = True,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        indices: Any = None,
    ) -> None:
        super().__init__(
            seed=_plan_seed(seed, generator), shuffle=shuffle, num_replicas=num_replicas, rank=rank,
            drop_last=drop_last,
        )
        self.replacement = check_bool(replacement, "replacement")
        self.num_samples = check_num_samples(num_samples)
        self.weights = check_weights(weights, "weights")
        self._draw_weights = self.weights  # over the plan's positions
        if indices is not None:
            self._index_map = check_indices(indices, self.weights.numel())
            self._draw_weights = check_weights(self.weights[self._index_map], "weights[indices]")
        if not self.replacement:
            positive = count_positive(self._draw_weights)
            what = "the number of positive weights" if indices is None else "the number of positive weights[indices]"
            check_num_samples(self.num_samples, positive, what, f"{positive} of {self._draw_weights.numel()}")
        self._table: CumulativeWeights | None = None

    @property
    def indices(self) -> torch.Tensor | None:
        """The dataset indices drawn among (None: all of ``weights``)."""
        return self._index_map

    def _plan_length(self) -> int:
        return self.num_samples

    def _config(self) -> dict[str, Any]:
        # the weights are hashed once, on the first state_dict()/load_state_dict(): ~0.1 s per 10^7 float32
        return {**super()._config(), "num_items": self.weights.numel(), "num_samples": self.num_samples,
                "replacement": self.replacement, "weights": self._digest("weights", self.weights)}

    def _cumulative(self) -> CumulativeWeights:
        if self._table is None:
            self._table = CumulativeWeights(self._draw_weights)
        return self._table

    def _plan(self, epoch: int) -> torch.Tensor:
        """The whole global plan of ``epoch`` over the plan's positions (materialised; iteration itself never
        needs this for ``replacement=True``)."""
        if self.replacement:
            return torch.cat(list(self._plan_chunks(epoch, 0)))
        n = self._draw_weights.numel()
        return _without_replacement(
            self._draw_weights, self.num_samples, self.seed, epoch, self.shuffle, index_dtype(n), ()
        )

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        if self.replacement:
            return _iter_draws(self._cumulative(), self.num_samples, self.seed, epoch, start, self.shuffle, ())
        return super()._plan_chunks(epoch, start)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self.weights.numel()}, num_samples={self.num_samples}, "
            f"replacement={self.replacement}, seed={self.seed}, num_replicas={self.num_replicas}, "
            f"rank={self.rank})"
        )
