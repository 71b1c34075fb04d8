"""``EntropySampler``: select (or weight the draw of) the samples the model is least sure about.

The seed's ``sample_by_entropy`` loops over rows in Python, takes ``np.log`` of zero probabilities (NaN)
and sorts everything to keep the top ``num_samples``. Here the scores come from
:mod:`torch_pretrain_update.scoring.scores` (vectorised, ``0 ln 0 = 0``) and the plan from
:func:`torch_pretrain_update.sampling.weighted_plans.entropy_plan`: exact top-k (ties by lower index) or power sampling
``p_i ∝ score_i ** (1 / temperature)``, optionally mixed with a uniform ``random_fraction``, restricted by
``exclude`` and stratified by class. The sampler splits the plan across ranks, resumes exactly under
``StatefulDataLoader`` (also after :meth:`EntropySampler.update`), and gives the importance weights that keep
a loss unbiased under proportional sampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from torch_pretrain_update._checks import as_tensor, check_bool, check_choice, check_int
from torch_pretrain_update.sampling.base import PlanSampler
from torch_pretrain_update.sampling.weighted_plans import (
    _check_scores,
    _mixture_probabilities,
    _plan_from_inputs,
    _PlanInputs,
    _validate_plan_args,
)
from torch_pretrain_update.scoring.scores import SCORE_NAMES, compute_scores

__all__ = ["EntropySampler"]

#: indices handed to the rank split at a time
_SLICE = 1 << 16


def _tensor_bytes(t: torch.Tensor | None) -> bytes:
    if t is None:
        return b"-"
    return np.ascontiguousarray(t.numpy()).tobytes()


class EntropySampler(PlanSampler):
    """Pick ``num_samples`` indices by an uncertainty score of model outputs, each epoch.

    - ``mode="topk"``: exactly the ``num_samples`` highest scores (ties broken by lower index), the seed's
      ``sample_by_entropy`` without its NaN and its Python loop. The set is the same every epoch (unless
      ``random_fraction > 0``); only the order is reshuffled.
    - ``mode="proportional"``: a draw with probability ``∝ score ** (1 / temperature)`` (power sampling: a
      small temperature approaches top-k, a large one uniform), with or without replacement, fresh each epoch.
      :meth:`importance_weights` gives ``1 / (N * p_i)`` to keep a loss unbiased.
    - ``random_fraction``: that fraction of ``num_samples`` (rounded half up) is drawn uniformly from the
      indices the score part did not pick (with replacement: uniformly from the pool). Measured on shifted
      data, a mix of random and uncertainty selection is what holds up (issue 9); pure top-k of an old model's
      uncertainty can lose to random selection.
    - ``exclude``: indices (or a bool mask) never to select, e.g. those already labelled.
    - ``stratify``: per-index labels (true or predicted); the score part is split into per-class quotas as in
      ``StratifiedSampler`` (:func:`torch_pretrain_update.sampling.plans.stratified_quotas` over the selectable
      indices' class counts, at least ``min_per_class``), and each class contributes its own top-``q_c`` (or
      draw).

    The epoch's global plan is :func:`torch_pretrain_update.sampling.weighted_plans.entropy_plan` of ``(scores, ...,
    seed, epoch)``: independent of ranks and DataLoader workers. ``shuffle=False`` gives ascending index
    order.

    **Updating scores.** :meth:`update` / :meth:`update_scores` replace the scores (e.g. re-scored by the
    current model) for the next ``iter()``; call them between epochs. The state dict records
    ``"plan_fingerprint"``, a hash of the scores and every plan input (``exclude``, ``stratify``,
    ``num_samples``, ``mode``, ``temperature``, ``replacement``, ``random_fraction``, ``min_per_class``,
    ``seed``, ``shuffle``), and ``"scores_version"`` (the number of updates so far, for messages). To resume,
    build the sampler as before, **re-apply the update that was in effect when the state was saved**, then
    load the state: :meth:`load_state_dict` raises ``ValueError`` if the fingerprint differs (e.g. the update
    was forgotten), instead of silently resuming a different plan.

    Args:
        probs: (N, C) probabilities (or logits with ``from_logits=True``), tensor or ndarray.
        num_samples: plan length per epoch (all ranks together). Without replacement at most the number of
            selectable (non-excluded) indices.
        from_logits: ``probs`` are logits.
        score: ``"entropy"``, ``"margin"`` or ``"least_confidence"`` (higher = less sure).
        mode: ``"topk"`` or ``"proportional"``.
        temperature: ``> 0``; the power ``1 / temperature`` of proportional sampling.
        replacement: draw with replacement (``mode="proportional"`` only).
        random_fraction: in ``[0, 1]``, the uniformly drawn share of ``num_samples``.
        exclude: indices or a length-N bool mask never to select.
        stratify: length-N integer labels for class-stratified selection, or None.
        min_per_class: with ``stratify``, the minimum quota of every class that has that many selectable
            samples (as ``StratifiedSampler``).
        seed, shuffle, num_replicas, rank, drop_last: as every sampler of this package (see
            ``WeightedSampler``).

    Example::

        >>> probs = torch.softmax(torch.randn(1000, 10), dim=1)
        >>> sampler = EntropySampler(probs, 100, mode="proportional", random_fraction=0.5, seed=0)
        >>> for epoch in range(3):  # doctest: +SKIP
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader: ...   # StatefulDataLoader(dataset, sampler=sampler, ...)
        ...     sampler.update(model_probs(dataset))  # re-score with the updated model
    """

    def __init__(
        self,
        probs: Any,
        num_samples: int,
        *,
        from_logits: bool = False,
        score: str = "entropy",
        mode: str = "topk",
        temperature: float = 1.0,
        replacement: bool = False,
        random_fraction: float = 0.0,
        exclude: Any = None,
        stratify: Any = None,
        min_per_class: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last
        )
        self.score = check_choice(score, "score", SCORE_NAMES)
        self.from_logits = check_bool(from_logits, "from_logits")
        self._pre_check(num_samples, mode)
        scores = compute_scores(probs, self.score, from_logits=self.from_logits, name="probs")
        self._setup(
            scores,
            num_samples,
            mode,
            temperature,
            replacement,
            random_fraction,
            exclude,
            stratify,
            min_per_class,
        )

    @classmethod
    def from_scores(
        cls,
        scores: Any,
        num_samples: int,
        *,
        from_logits: bool = False,
        score: str = "entropy",
        mode: str = "topk",
        temperature: float = 1.0,
        replacement: bool = False,
        random_fraction: float = 0.0,
        exclude: Any = None,
        stratify: Any = None,
        min_per_class: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> EntropySampler:
        """Build from precomputed 1-D scores (higher = select first / more often) instead of model outputs.

        Takes the same keyword arguments as the constructor; ``score`` and ``from_logits`` only matter for a
        later :meth:`update` with model outputs. Scores must be finite, and non-negative for
        ``mode="proportional"``.

        Example::

            >>> s = EntropySampler.from_scores(torch.tensor([0.1, 0.9, 0.4, 0.8]), 2, shuffle=False)
            >>> list(s)
            [1, 3]
        """
        self = cls.__new__(cls)
        PlanSampler.__init__(
            self, seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last
        )
        self.score = check_choice(score, "score", SCORE_NAMES)
        self.from_logits = check_bool(from_logits, "from_logits")
        self._pre_check(num_samples, mode)
        s = _check_scores(scores, "scores", non_negative=False)
        self._setup(
            s, num_samples, mode, temperature, replacement, random_fraction, exclude, stratify, min_per_class
        )
        return self

    # ----- set-up and updates -----
    @staticmethod
    def _pre_check(num_samples: Any, mode: Any) -> None:
        check_int(num_samples, "num_samples", min_value=1)
        check_choice(mode, "mode", ("topk", "proportional"))

    def _setup(
        self,
        scores: torch.Tensor,
        num_samples: Any,
        mode: Any,
        temperature: Any,
        replacement: Any,
        random_fraction: Any,
        exclude: Any,
        stratify: Any,
        min_per_class: Any,
    ) -> None:
        kw = _validate_plan_args(
            scores,
            num_samples,
            mode,
            temperature,
            replacement,
            random_fraction,
            exclude,
            stratify,
            min_per_class,
        )
        self._inputs = _PlanInputs(**kw)
        self.num_samples: int = kw["num_samples"]
        self.mode: str = kw["mode"]
        self.temperature: float = kw["temperature"]
        self.replacement: bool = kw["replacement"]
        self.random_fraction: float = kw["random_fraction"]
        self.min_per_class: int = kw["min_per_class"]
        self._version = 0
        self._fingerprint: str | None = None

    def _rebuild(self, scores: torch.Tensor, name: str) -> None:
        inp = self._inputs
        if scores.numel() != inp.n:
            raise ValueError(f"{name} must have {inp.n} rows (the sampler's N); got {scores.numel()}")
        kw = _validate_plan_args(
            scores,
            self.num_samples,
            self.mode,
            self.temperature,
            self.replacement,
            self.random_fraction,
            inp.mask,
            inp.labels,
            self.min_per_class,
        )
        self._inputs = _PlanInputs(**kw)  # built fully before replacing: a failed update changes nothing
        self._version += 1
        self._fingerprint = None

    def update(self, probs: Any) -> None:
        """Replace the scores with those of new model outputs (same ``score`` and ``from_logits``), for the
        next ``iter()``. ``probs`` must have the same N. Call between epochs; see the class docstring about
        resuming after an update."""
        scores = compute_scores(probs, self.score, from_logits=self.from_logits, name="probs")
        self._rebuild(scores, "probs")

    def update_scores(self, scores: Any) -> None:
        """Replace the scores with precomputed 1-D scores of the same length, for the next ``iter()``."""
        self._rebuild(_check_scores(scores, "scores", non_negative=False), "scores")

    @property
    def scores(self) -> torch.Tensor:
        """The current scores (1-D, length N)."""
        return self._inputs.scores

    @property
    def scores_version(self) -> int:
        """How many times the scores were updated since construction."""
        return self._version

    # ----- plan -----
    def _plan_length(self) -> int:
        return self.num_samples

    def _plan_version(self) -> Any:
        return self._version

    def _config(self) -> dict[str, Any]:
        # the scores, exclude and stratify are compared by plan_fingerprint (with its hint about update())
        return {**super()._config(), "num_items": self._inputs.n, "num_samples": self.num_samples, "mode": self.mode,
                "temperature": self.temperature, "replacement": self.replacement,
                "random_fraction": self.random_fraction, "min_per_class": self.min_per_class}

    def _plan(self, epoch: int) -> torch.Tensor:
        return _plan_from_inputs(self._inputs, self.seed, epoch, self.shuffle)

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        plan = self._cached_plan(epoch)  # captured: an update() during this iteration applies to the next one
        for s in range(start, plan.numel(), _SLICE):
            yield plan[s : s + _SLICE]

    def plan(self, epoch: int | None = None) -> torch.Tensor:
        """The global plan (all ranks) of ``epoch`` (default: the current epoch) as an int64 tensor."""
        epoch = self.epoch if epoch is None else check_int(epoch, "epoch", min_value=0)
        return self._cached_plan(epoch).clone()

    def rank_indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's full stream of ``epoch`` (default: the current epoch) from its start, as a tensor:
        exactly what ``iter()`` yields when not resumed, padding and truncation included."""
        epoch = self.epoch if epoch is None else check_int(epoch, "epoch", min_value=0)
        plan = self._cached_plan(epoch)
        positions = self.rank + self.num_replicas * torch.arange(self._rank_length())
        return plan[positions % plan.numel()]

    # ----- importance weights -----
    def importance_weights(self, indices: Any = None) -> torch.Tensor:
        """``1 / (N * p_i)``: per-sample loss weights that keep the mean loss over the pool unbiased.

        ``N`` is the number of selectable indices (not excluded) and ``p_i`` the per-draw probability of index
        ``i`` under this plan: ``p_i = (n_score * P_score(i) + n_random / N) / num_samples`` with
        ``P_score(i) = w_i / sum(w)``, ``w_i = score_i ** (1 / temperature)`` (with ``stratify``, class
        ``c``'s ``q_c`` draws use ``w_i / W_c``). Then ``E[weight * loss]`` over one draw equals the mean loss
        over the pool. Exact for ``replacement=True``; for ``replacement=False`` it is the usual approximation
        (the exact inclusion probabilities of a weighted draw without replacement have no closed form),
        close while ``num_samples`` is small compared with N.

        Alignment: with ``indices=None`` the result has ``len(self)`` entries and entry ``j`` belongs to the
        ``j``-th index this rank's ``iter()`` yields in the current epoch (``self.epoch``) **counted from the
        start of the epoch** (padding included; see :meth:`rank_indices`), whatever resume position is
        pending. Since the weight depends only on the index and the current scores, the robust way with a
        DataLoader is ``importance_weights(batch_indices)`` on the indices actually received.

        Args:
            indices: dataset indices (1-D integers); None for this rank's stream as described.

        Returns:
            float64 tensor.

        Raises:
            ValueError: ``mode="topk"`` (a deterministic selection has no draw probabilities), an index out of
                range, or an index that can never be drawn (excluded, or zero score without a random part).
        """
        if self.mode != "proportional":
            raise ValueError(
                "importance_weights() needs mode='proportional'; mode='topk' is a deterministic selection "
                "with no draw probabilities"
            )
        inp = self._inputs
        if indices is None:
            idx = self.rank_indices()
        else:
            t = as_tensor(indices, "indices")
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"indices must be integers; got dtype {t.dtype}")
            idx = t.detach().cpu().to(torch.int64).reshape(-1)
            bad = (idx < 0) | (idx >= inp.n)
            if bool(bad.any()):
                j = int(torch.nonzero(bad)[0, 0])
                raise ValueError(f"indices must be in [0, {inp.n}); got {int(idx[j])} at position {j}")
        p = _mixture_probabilities(inp, idx)
        zero = p <= 0
        if bool(zero.any()):
            j = int(torch.nonzero(zero)[0, 0])
            raise ValueError(
                f"indices: index {int(idx[j])} (position {j}) can never be drawn (excluded or zero weight)"
            )
        return 1.0 / (inp.pool_size * p)

    # ----- state -----
    def plan_fingerprint(self) -> str:
        """A short hash of the scores and every plan input (see the class docstring)."""
        if self._fingerprint is None:
            inp = self._inputs
            h = hashlib.blake2b(digest_size=8)
            h.update(str(inp.scores.dtype).encode())
            h.update(_tensor_bytes(inp.scores))
            h.update(_tensor_bytes(inp.mask))
            h.update(_tensor_bytes(inp.labels))
            config = (
                self.num_samples,
                self.mode,
                self.temperature,
                self.replacement,
                self.random_fraction,
                self.min_per_class,
                self.seed,
                self.shuffle,
            )
            h.update(repr(config).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "config", "scores_version", "plan_fingerprint"}``: plain values."""
        state = super().state_dict()
        state["scores_version"] = self._version
        state["plan_fingerprint"] = self.plan_fingerprint()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was saved (at an epoch boundary: as :class:`PlanSampler`). Raises
        ``ValueError`` when the settings (``config``, named in the message) or the scores and plan inputs differ
        from those in effect when it was saved (re-apply the same update first)."""
        self._check_state(state)  # settings first: a message that names them
        if "plan_fingerprint" not in state:
            raise ValueError(
                "state is missing key 'plan_fingerprint' (not saved by an EntropySampler?); "
                f"got keys {sorted(state)}"
            )
        saved, mine = state["plan_fingerprint"], self.plan_fingerprint()
        if saved != mine:
            raise ValueError(
                f"state['plan_fingerprint'] is {saved!r} (saved after {state.get('scores_version', '?')} "
                "score "
                f"update(s)) but this sampler's scores and settings give {mine!r} (after {self._version} "
                "update(s)): re-apply the update(probs) / update_scores(scores) that was in effect when the "
                "state was saved, with the same settings, before load_state_dict"
            )
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self._inputs.n}, num_samples={self.num_samples}, mode={self.mode!r}, "
            f"score={self.score!r}, random_fraction={self.random_fraction}, seed={self.seed}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )
