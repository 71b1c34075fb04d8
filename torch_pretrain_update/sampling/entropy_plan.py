"""The score-driven plan of :class:`~torch_pretrain_update.EntropySampler` and ``SelectionRounds``.

``(scores, config, exclude, stratify, seed, epoch) -> LongTensor``: top-k, or a draw proportional to
``score ** (1 / temperature)`` (power sampling), optionally mixed with a uniformly drawn ``random_fraction``,
restricted by ``exclude`` and stratified by class. The settings are one frozen :class:`EntropyPlanConfig`,
validated once; every user of the plan (the functions below, the sampler, its state fingerprint, the selection
rounds) takes that object, so a new setting is added in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from torch_pretrain_update._checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_labels,
    compact_labels,
)
from torch_pretrain_update._rng import STREAM_CLASS_DRAW, STREAM_RANDOM_PART, epoch_generator
from torch_pretrain_update.sampling._inputs import check_num_samples, check_scores, check_seed_epoch, exclude_mask
from torch_pretrain_update.sampling.draws import (
    CumulativeWeights,
    _iter_draws,
    _order,
    _select_k,
    _without_replacement,
)
from torch_pretrain_update.sampling.plans import stratified_quotas

__all__ = ["EntropyPlanConfig", "topk_indices", "power_weights", "entropy_plan_parts", "entropy_plan"]

MODES = ("topk", "proportional")


# ----- scores: top-k and power weights ----------------------------------------------------------------------


def topk_indices(scores: Any, k: int, *, exclude: Any = None) -> torch.Tensor:
    """Exactly the ``k`` highest-score indices, ties broken by lower index, in ascending index order.

    Args:
        scores: 1-D finite scores.
        k: how many, in ``[1, N - excluded]``.
        exclude: indices or a bool mask never to select.

    Example::

        >>> topk_indices(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)
        tensor([1, 3])
    """
    s = check_scores(scores, non_negative=False)
    k = check_int(k, "k", min_value=1)
    mask = exclude_mask(exclude, s.numel())
    pool = s.numel() - (int(mask.sum()) if mask is not None else 0)
    if k > pool:
        raise ValueError(f"k must be <= the number of selectable scores ({pool}); got {k}")
    return _topk(s, k, mask)


def _topk(s: torch.Tensor, k: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None or not bool(mask.any()):
        return _select_k(s, k, largest=True)
    pool_idx = torch.nonzero(~mask).squeeze(1)
    return pool_idx[_select_k(s[pool_idx], k, largest=True)]  # pool_idx is ascending: order and ties kept


def power_weights(scores: Any, temperature: float = 1.0) -> torch.Tensor:
    """Sampling weights ``(score / max(score)) ** (1 / temperature)`` in float64 (power sampling).

    Dividing by the maximum first makes the result scale-free and keeps small temperatures from overflowing
    (they may underflow small scores to 0: such indices are then never drawn).

    Args:
        scores: 1-D non-negative finite scores, at least one positive.
        temperature: ``> 0``; 1 = proportional to the score, -> 0 approaches top-k, large -> uniform.
    """
    s = check_scores(scores, non_negative=True)
    temperature = check_float(temperature, "temperature", low=0.0, low_inclusive=False)
    m = float(s.max())
    if m <= 0:
        raise ValueError(
            f"scores must have at least one positive entry for mode='proportional'; all {s.numel()} are 0"
        )
    return _power(s, temperature, m)


def _power(s: torch.Tensor, temperature: float, m: float) -> torch.Tensor:
    w = s.to(torch.float64) / m
    if temperature != 1.0:
        w.pow_(1.0 / temperature)
    return w


# ----- the settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntropyPlanConfig:
    """The settings of a score-driven plan, validated once on construction.

    The plan functions, :class:`~torch_pretrain_update.EntropySampler` (whose keyword arguments ``mode``,
    ``temperature``, ``replacement``, ``random_fraction`` and ``min_per_class`` build one) and
    ``SelectionRounds`` all take this object; the sampler's state fingerprint and ``config`` record it whole.

    Args:
        num_samples: plan length (all ranks together), ``>= 1``. Without replacement at most the number of
            selectable (not excluded) indices.
        mode: ``"topk"`` (exactly the highest scores, ties by lower index) or ``"proportional"`` (a draw with
            probability ``∝ score ** (1 / temperature)``).
        temperature: ``> 0``, the power ``1 / temperature`` of proportional sampling (small: close to top-k,
            large: close to uniform).
        replacement: draw with replacement (``mode="proportional"`` only).
        random_fraction: in ``[0, 1]``; ``round(random_fraction * num_samples)`` (half up) indices are drawn
            uniformly from the selectable indices the score part did not pick.
        min_per_class: with ``stratify``, the minimum quota of every class that has that many selectable
            samples (as ``StratifiedSampler``).

    Raises:
        TypeError / ValueError: a setting of the wrong type or out of range (the message names it), or
            ``replacement=True`` with ``mode="topk"``.

    Example::

        >>> config = EntropyPlanConfig(100, mode="proportional", random_fraction=0.5)
        >>> config.split
        (50, 50)
    """

    num_samples: int
    mode: str = "topk"
    temperature: float = 1.0
    replacement: bool = False
    random_fraction: float = 0.0
    min_per_class: int = 1

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: store the checked (normalised) values
        put(self, "num_samples", check_num_samples(self.num_samples))
        put(self, "mode", check_choice(self.mode, "mode", MODES))
        put(self, "temperature", check_float(self.temperature, "temperature", low=0.0, low_inclusive=False))
        put(self, "replacement", check_bool(self.replacement, "replacement"))
        put(self, "random_fraction", check_float(self.random_fraction, "random_fraction", low=0.0, high=1.0))
        put(self, "min_per_class", check_int(self.min_per_class, "min_per_class", min_value=0))
        if self.replacement and self.mode == "topk":
            raise ValueError(
                "replacement=True needs mode='proportional' (top-k selects distinct indices); got mode='topk'"
            )

    @classmethod
    def build(cls, num_samples: int | EntropyPlanConfig, options: dict[str, Any], owner: str) -> EntropyPlanConfig:
        """``num_samples`` and keyword ``options`` as a config (or a config passed in place of ``num_samples``,
        then without options). ``owner`` names the caller in the error for an unknown option."""
        if isinstance(num_samples, EntropyPlanConfig):
            if options:
                raise TypeError(
                    f"{owner}: pass the plan settings in the EntropyPlanConfig or as keywords, not both; got "
                    f"keywords {sorted(options)}"
                )
            return num_samples
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise TypeError(
                f"{owner} got an unexpected keyword argument {unknown[0]!r}; the plan settings are "
                f"{', '.join(cls.option_names())}"
            )
        return cls(num_samples, **options)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The settings other than ``num_samples``."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "num_samples")

    def as_dict(self) -> dict[str, Any]:
        """Every setting as a plain value (what a sampler's state records)."""
        return dataclasses.asdict(self)

    @property
    def split(self) -> tuple[int, int]:
        """``(score part, random part)``: the random part is ``round(random_fraction * num_samples)``, half
        up."""
        n_rand = min(self.num_samples, math.floor(self.random_fraction * self.num_samples + 0.5))
        return self.num_samples - n_rand, n_rand


# ----- the plan's inputs ----------------------------------------------------------------------------------


class PlanInputs:
    """Scores, exclusion and classes of one plan, checked against ``config`` and precomputed (power weights,
    the selectable pool, per-class quotas). Built once per scores (and rebuilt by :meth:`with_scores`)."""

    def __init__(self, scores: Any, config: EntropyPlanConfig, exclude: Any = None, stratify: Any = None) -> None:
        self.config = config
        proportional = config.mode == "proportional"
        self.scores = s = check_scores(scores, non_negative=proportional)
        self.n = n = s.numel()
        self.mask = mask = exclude_mask(exclude, n)
        self.pool_size = n - (int(mask.sum()) if mask is not None else 0)
        if self.pool_size == 0:
            raise ValueError(f"exclude removes all {n} indices: nothing is left to select from")
        if not config.replacement:
            check_num_samples(
                config.num_samples, self.pool_size, "the number of selectable indices",
                f"{self.pool_size} of {n} after exclude",
            )
        self.labels: Optional[torch.Tensor] = None
        self.class_ids: Optional[torch.Tensor] = None
        self.classes: Optional[torch.Tensor] = None
        if stratify is not None:
            self.labels, _ = check_labels(stratify, "stratify", max_classes=None)  # grouping only: any label value
            if self.labels.numel() != n:
                raise ValueError(f"stratify must have one label per score ({n}); got {self.labels.numel()} labels")
            self.class_ids, self.classes = compact_labels(self.labels)  # the distinct label values, ascending
        self.num_classes = 0 if self.classes is None else self.classes.numel()
        self.n_score, self.n_rand = config.split
        self._pool: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.quotas: Optional[torch.Tensor] = None
        if proportional and self.n_score > 0:
            m = float(s.max() if mask is None else s[~mask].max())
            if m <= 0:
                raise ValueError(
                    f"scores must have a positive entry among the {self.pool_size} selectable indices for "
                    "mode='proportional'; all are 0"
                )
            w = _power(s, config.temperature, m)
            if mask is not None:
                w[mask] = 0.0
            self.weights = w
        if self.class_ids is not None and self.n_score > 0:  # the same quotas as StratifiedSampler
            counts = torch.bincount(self.class_ids[self.pool], minlength=self.num_classes)
            self.quotas = stratified_quotas(counts, self.n_score, min_per_class=config.min_per_class)
        if self.weights is not None:
            self._check_positive(self.weights)

    def with_scores(self, scores: Any) -> PlanInputs:
        """The same plan over new scores (same exclusion and classes)."""
        return PlanInputs(scores, self.config, self.mask, self.labels)

    def _check_positive(self, w: torch.Tensor) -> None:
        """Enough positive weights for the score part (per class with ``stratify``)."""
        if self.quotas is None:
            if self.config.replacement:  # any positive weight will do (checked above)
                return
            positive = int(torch.count_nonzero(w > 0))
            if self.n_score > positive:
                raise ValueError(
                    f"num_samples asks for {self.n_score} score-drawn indices without replacement but only "
                    f"{positive} selectable scores are positive after score ** (1 / temperature); use "
                    "replacement=True, a larger temperature, random_fraction > 0 or mode='topk'"
                )
            return
        ids = self.class_ids
        if ids is None or self.classes is None:
            return
        pos_per_class = torch.bincount(ids[w > 0], minlength=self.num_classes)
        need = (self.quotas > 0).long() if self.config.replacement else self.quotas
        short = torch.nonzero(need > pos_per_class).squeeze(1)
        if short.numel():
            c = int(short[0])
            label, quota = int(self.classes[c]), int(self.quotas[c])
            if self.config.replacement:
                raise ValueError(
                    f"stratify: class {label} has quota {quota} but no positive selectable score to draw from; "
                    "use mode='topk' or a larger temperature"
                )
            raise ValueError(
                f"stratify: class {label} has quota {quota} but only {int(pos_per_class[c])} positive selectable "
                "scores for a proportional draw without replacement; use replacement=True or mode='topk'"
            )

    @property
    def pool(self) -> torch.Tensor:
        """Ascending indices of the selectable pool (built on first use: top-k alone never needs it)."""
        if self._pool is None:
            self._pool = torch.arange(self.n) if self.mask is None else torch.nonzero(~self.mask).squeeze(1)
        return self._pool

    def class_members(self, c: int) -> torch.Tensor:
        """Selectable indices of the ``c``-th class present (label value ``classes[c]``)."""
        ids = self.class_ids
        if ids is None:
            return self.pool
        return self.pool[ids[self.pool] == c]

    def fingerprint(self, seed: int, shuffle: bool) -> str:
        """A short hash of the scores, the exclusion, the classes, every setting, ``seed`` and ``shuffle``."""
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.scores.dtype).encode())
        for t in (self.scores, self.mask, self.labels):
            h.update(b"-" if t is None else np.ascontiguousarray(t.numpy()).tobytes())
        h.update(repr((*dataclasses.astuple(self.config), seed, shuffle)).encode())
        return h.hexdigest()


# ----- the plan -------------------------------------------------------------------------------------------


def _score_part(inp: PlanInputs, seed: int, epoch: int) -> torch.Tensor:
    k = inp.n_score
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if inp.quotas is None or inp.classes is None:
        return _score_draw(inp, inp.scores, inp.weights, inp.mask, k, seed, epoch, ())
    parts = []
    for c in range(inp.num_classes):
        q = int(inp.quotas[c])
        if q == 0:
            continue
        members = inp.class_members(c)
        w = inp.weights[members] if inp.weights is not None else None
        # the class's draws are keyed by its label value, not by its rank among the classes present
        stream = (STREAM_CLASS_DRAW, int(inp.classes[c]))
        parts.append(members[_score_draw(inp, inp.scores[members], w, None, q, seed, epoch, stream)])
    return torch.cat(parts)


def _score_draw(
    inp: PlanInputs,
    scores: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    k: int,
    seed: int,
    epoch: int,
    stream: tuple[int, ...],
) -> torch.Tensor:
    if inp.config.mode == "topk" or weights is None:
        return _topk(scores, k, mask)
    if inp.config.replacement:
        return torch.cat(list(_iter_draws(CumulativeWeights(weights), k, seed, epoch, 0, True, stream)))
    return _without_replacement(weights, k, seed, epoch, False, torch.int64, stream)


def _random_part(inp: PlanInputs, picked: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    k = inp.n_rand
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    g = epoch_generator(seed, epoch, STREAM_RANDOM_PART)
    if inp.config.replacement:  # i.i.d. uniform over the pool ("not picked" has no meaning with replacement)
        return inp.pool[torch.randint(inp.pool_size, (k,), generator=g)]
    avail = torch.ones(inp.n, dtype=torch.bool)
    if inp.mask is not None:
        avail &= ~inp.mask
    avail[picked] = False
    rest = torch.nonzero(avail).squeeze(1)
    return torch.sort(rest[torch.randperm(rest.numel(), generator=g)[:k]]).values


def plan_parts(inp: PlanInputs, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score part, random part)`` of checked inputs (see :func:`entropy_plan_parts`)."""
    score = _score_part(inp, seed, epoch)
    return score, _random_part(inp, score, seed, epoch)


def plan_from_inputs(inp: PlanInputs, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The whole plan of checked inputs (see :func:`entropy_plan`)."""
    score, rand = plan_parts(inp, seed, epoch)
    return _order(torch.cat([score, rand]), seed, epoch, shuffle, ()).to(torch.int64)


def entropy_plan_parts(
    scores: Any,
    num_samples: int | EntropyPlanConfig,
    *,
    seed: int,
    epoch: int,
    exclude: Any = None,
    stratify: Any = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of the EntropySampler plan before ordering: ``(score_part, random_part)``.

    - ``n_rand = round(random_fraction * num_samples)`` (half up) indices form the random part, the other
      ``n_score`` the score part.
    - Score part over the selectable pool (all indices not in ``exclude``): ``mode="topk"``: exactly the
      ``n_score`` highest scores, ties by lower index (ascending index order). ``mode="proportional"``: a
      draw with probability proportional to ``score ** (1 / temperature)``, with replacement (i.i.d., in draw
      order) or without (ascending index order). With ``stratify=labels`` the ``n_score`` are split into
      per-class quotas (:func:`~torch_pretrain_update.sampling.plans.stratified_quotas` over the pool's class
      counts, ``min_per_class``) and each class contributes its top-``q_c`` (or its own draw), classes in
      ascending order.
    - Random part: without replacement, uniform over the pool minus the score part (ascending index order);
      with replacement, i.i.d. uniform over the pool.

    Args:
        scores: 1-D finite scores (non-negative for ``mode="proportional"``).
        num_samples: plan length, or an :class:`EntropyPlanConfig` (then no ``options``).
        seed, epoch: the plan's seed and epoch (top-k without ``random_fraction`` does not depend on them).
        exclude: indices or a bool mask never to select.
        stratify: per-index class labels (true or predicted), or None.
        **options: the settings of :class:`EntropyPlanConfig` (``mode``, ``temperature``, ``replacement``,
            ``random_fraction``, ``min_per_class``).

    Returns:
        two int64 tensors of lengths ``n_score`` and ``n_rand``.
    """
    config = EntropyPlanConfig.build(num_samples, options, "entropy_plan_parts()")
    seed, epoch = check_seed_epoch(seed, epoch)
    return plan_parts(PlanInputs(scores, config, exclude, stratify), seed, epoch)


def entropy_plan(
    scores: Any,
    num_samples: int | EntropyPlanConfig,
    *,
    seed: int,
    epoch: int,
    exclude: Any = None,
    stratify: Any = None,
    shuffle: bool = True,
    **options: Any,
) -> torch.Tensor:
    """The EntropySampler's global plan of one epoch: :func:`entropy_plan_parts` concatenated, then in a
    uniformly random order (``shuffle=True``, a ``randperm`` seeded by ``(seed, epoch)``) or in ascending
    index order (``shuffle=False``). Arguments as :func:`entropy_plan_parts`.

    Example::

        >>> s = torch.tensor([0.2, 0.7, 0.1, 0.9, 0.5])
        >>> entropy_plan(s, 2, seed=0, epoch=0, shuffle=False)
        tensor([1, 3])
        >>> entropy_plan(s, 2, seed=0, epoch=0, mode="proportional").shape
        torch.Size([2])
    """
    config = EntropyPlanConfig.build(num_samples, options, "entropy_plan()")
    seed, epoch = check_seed_epoch(seed, epoch)
    shuffle = check_bool(shuffle, "shuffle")
    return plan_from_inputs(PlanInputs(scores, config, exclude, stratify), seed, epoch, shuffle)


def mixture_probabilities(inp: PlanInputs, indices: torch.Tensor) -> torch.Tensor:
    """Per-draw probability ``m_i`` of index ``i`` under the plan's mixture of parts (for
    ``EntropySampler.importance_weights``).

    The plan is ``n_score`` draws from ``P_score`` plus ``n_rand`` from the uniform ``1 / pool_size``;
    ``m_i = (n_score * P_score(i) + n_rand / pool_size) / num_samples``. Without stratify
    ``P_score(i) = w_i / sum(w)``; with stratify, class ``c`` contributes ``q_c`` draws of ``w_i / W_c``, so
    ``n_score * P_score(i) = q_c * w_i / W_c``.
    """
    idx = indices.to(torch.int64)
    num = torch.zeros(idx.numel(), dtype=torch.float64)
    if inp.n_score > 0 and inp.weights is not None:
        w = inp.weights[idx]
        if inp.quotas is None or inp.class_ids is None:
            num += inp.n_score * w / float(inp.weights.sum())
        else:
            class_w = torch.zeros(inp.num_classes, dtype=torch.float64)
            class_w.index_add_(0, inp.class_ids, inp.weights)
            c = inp.class_ids[idx]
            qc = inp.quotas[c].to(torch.float64)
            wc = class_w[c]
            # w / W_c first: both may be tiny (a class of subnormal weights) while their ratio is not
            ratio = w / torch.where(wc > 0, wc, torch.ones((), dtype=torch.float64))
            num += torch.where(wc > 0, qc * ratio, torch.zeros((), dtype=torch.float64))
    if inp.n_rand > 0:
        num += inp.n_rand / inp.pool_size
    if inp.mask is not None:
        num[inp.mask[idx]] = 0.0
    return num / inp.config.num_samples
