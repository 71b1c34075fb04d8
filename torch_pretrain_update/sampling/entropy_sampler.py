"""``EntropySampler``: select (or weight the draw of) the samples the model is least sure about.

A per-row Python loop that takes ``np.log`` of zero probabilities (NaN) and sorts everything to keep the top
``num_samples`` is the naive way. Here the scores come from :mod:`torch_pretrain_update.scoring.scores`
(vectorised, ``0 ln 0 = 0``) and the plan from :func:`torch_pretrain_update.sampling.entropy_plan.entropy_plan`:
exact top-k (ties by lower index) or power sampling ``p_i ∝ score_i ** (1 / temperature)``, optionally mixed
with a uniform ``random_fraction``, restricted by ``exclude`` and stratified by class. The sampler splits the
plan across ranks, resumes exactly under ``StatefulDataLoader`` (also after :meth:`EntropySampler.update`), and
gives the importance weights that keep a loss unbiased under proportional sampling.
"""

from __future__ import annotations

from typing import Any

import torch

from torch_pretrain_update._checks import as_tensor, check_bool, check_choice, check_int
from torch_pretrain_update.sampling._inputs import check_indices, check_scores
from torch_pretrain_update.sampling.base import PlanSampler
from torch_pretrain_update.sampling.entropy_plan import (
    EntropyPlanConfig,
    PlanInputs,
    mixture_probabilities,
    plan_from_inputs,
)
from torch_pretrain_update.scoring.scores import SCORE_NAMES, compute_scores

__all__ = ["EntropySampler"]


class _Scores:
    """Precomputed scores passed to the constructor by :meth:`EntropySampler.from_scores`."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores


class EntropySampler(PlanSampler):
    """Pick ``num_samples`` indices by an uncertainty score of model outputs, each epoch.

    - ``mode="topk"``: exactly the ``num_samples`` highest scores (ties broken by lower index), without a NaN
      for zero probabilities and without a Python loop. The set is the same every epoch (unless
      ``random_fraction > 0``); only the order is reshuffled.
    - ``mode="proportional"``: a draw with probability ``∝ score ** (1 / temperature)`` (power sampling: a
      small temperature approaches top-k, a large one uniform), with or without replacement, fresh each epoch.
      :meth:`importance_weights` gives ``1 / (N * p_i)`` to keep a loss unbiased.
    - ``random_fraction``: that fraction of ``num_samples`` (rounded half up) is drawn uniformly from the
      indices the score part did not pick (with replacement: uniformly from the pool). Measured on shifted
      data, a mix of random and uncertainty selection is what holds up; pure top-k of an old model's
      uncertainty can lose to random selection (see ``SelectionRounds``).
    - ``exclude``: indices (or a bool mask) never to select, e.g. those already labelled.
    - ``stratify``: per-index labels (true or predicted); the score part is split into per-class quotas as in
      ``StratifiedSampler`` (:func:`torch_pretrain_update.sampling.plans.stratified_quotas` over the selectable
      indices' class counts, at least ``min_per_class``), and each class contributes its own top-``q_c`` (or
      draw).

    The plan settings (``num_samples``, ``mode``, ``temperature``, ``replacement``, ``random_fraction``,
    ``min_per_class``) form one :class:`~torch_pretrain_update.EntropyPlanConfig` (``self.config``; each also
    readable as an attribute, e.g. ``sampler.mode``); pass them as keywords or pass a config as
    ``num_samples``. The epoch's global plan is :func:`torch_pretrain_update.sampling.entropy_plan.entropy_plan`
    of ``(scores, config, exclude, stratify, seed, epoch)``: independent of ranks and DataLoader workers.
    ``shuffle=False`` gives ascending index order. As ``DistributedSampler``, the sampler changes epoch only
    on ``set_epoch``.

    **Updating scores.** :meth:`update` / :meth:`update_scores` replace the scores (e.g. re-scored by the
    current model) for the next ``iter()``; call them between epochs. The state records ``"plan_fingerprint"``
    (a hash of the scores, ``exclude``, ``stratify``, the settings, ``seed``, ``shuffle``) and
    ``"scores_version"`` (updates so far). To resume, build the sampler as before, **re-apply the update in
    effect when the state was saved**, then load it: :meth:`load_state_dict` raises ``ValueError`` if the
    fingerprint differs (e.g. a forgotten update) instead of silently resuming a different plan.

    Args:
        probs: (N, C) probabilities (or logits with ``from_logits=True``), tensor or ndarray.
        num_samples: plan length per epoch (all ranks together), or an ``EntropyPlanConfig``. Without
            replacement at most the number of selectable (non-excluded) indices.
        from_logits: ``probs`` are logits.
        score: ``"entropy"``, ``"margin"`` or ``"least_confidence"`` (higher = less sure).
        exclude: indices or a length-N bool mask never to select.
        stratify: length-N integer labels for class-stratified selection, or None.
        seed, shuffle, num_replicas, rank, drop_last: as every sampler of this package (see
            ``WeightedSampler``).
        **options: the plan settings of ``EntropyPlanConfig``: ``mode``, ``temperature``, ``replacement``,
            ``random_fraction``, ``min_per_class``.

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
        num_samples: int | EntropyPlanConfig,
        *,
        from_logits: bool = False,
        score: str = "entropy",
        exclude: Any = None,
        stratify: Any = None,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        self.score = check_choice(score, "score", SCORE_NAMES)
        self.from_logits = check_bool(from_logits, "from_logits")
        self.config = EntropyPlanConfig.build(num_samples, options, type(self).__name__)
        given = isinstance(probs, _Scores)
        scores = probs.scores if given else compute_scores(probs, self.score, from_logits=self.from_logits)
        self._inputs = PlanInputs(scores, self.config, exclude, stratify)
        self._version = 0
        self._fingerprint: str | None = None

    @classmethod
    def from_scores(cls, scores: Any, num_samples: int | EntropyPlanConfig, **kwargs: Any) -> EntropySampler:
        """Build from precomputed 1-D scores (higher = select first / more often) instead of model outputs.

        Takes the same keyword arguments as the constructor; ``score`` and ``from_logits`` only matter for a
        later :meth:`update` with model outputs. Scores must be finite, and non-negative for
        ``mode="proportional"``.

        Example::

            >>> s = EntropySampler.from_scores(torch.tensor([0.1, 0.9, 0.4, 0.8]), 2, shuffle=False)
            >>> list(s)
            [1, 3]
        """
        return cls(_Scores(check_scores(scores, "scores", non_negative=False)), num_samples, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # The plan settings read through to the one config (sampler.mode, sampler.num_samples, ...).
        config = self.__dict__.get("config")
        if config is not None and (name == "num_samples" or name in EntropyPlanConfig.option_names()):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ----- updates -----
    def _rebuild(self, scores: torch.Tensor, name: str) -> None:
        n = self._inputs.n
        if scores.numel() != n:
            raise ValueError(f"{name} must have {n} rows (the sampler's N); got {scores.numel()}")
        # built fully before replacing: a failed update changes nothing
        self._inputs = self._inputs.with_scores(scores)
        self._version += 1
        self._fingerprint = None

    def update(self, probs: Any) -> None:
        """Replace the scores with those of new model outputs (same ``score`` and ``from_logits``), for the
        next ``iter()``. ``probs`` must have the same N. Call between epochs; see the class docstring about
        resuming after an update."""
        self._rebuild(compute_scores(probs, self.score, from_logits=self.from_logits), "probs")

    def update_scores(self, scores: Any) -> None:
        """Replace the scores with precomputed 1-D scores of the same length, for the next ``iter()``."""
        self._rebuild(check_scores(scores, "scores", non_negative=False), "scores")

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
        return self.config.num_samples

    def _plan_version(self) -> Any:
        return self._version

    def _config(self) -> dict[str, Any]:
        # the scores, exclude and stratify are compared by plan_fingerprint (with its hint about update())
        return {**super()._config(), "num_items": self._inputs.n, **self.config.as_dict()}

    def _plan(self, epoch: int) -> torch.Tensor:
        return plan_from_inputs(self._inputs, self.seed, epoch, self.shuffle)

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
        if self.config.mode != "proportional":
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
            idx = check_indices(t.reshape(-1), inp.n)
        p = mixture_probabilities(inp, idx)
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
            self._fingerprint = self._inputs.fingerprint(self.seed, self.shuffle)
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
                f"state['plan_fingerprint'] is {saved!r} (saved after {state.get('scores_version', '?')} score "
                f"update(s)) but this sampler's scores and settings give {mine!r} (after {self._version} update(s)): "
                "re-apply the update(probs) / update_scores(scores) that was in effect when the state was saved, "
                "with the same settings, before load_state_dict"
            )
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self._inputs.n}, num_samples={self.config.num_samples}, "
            f"mode={self.config.mode!r}, score={self.score!r}, random_fraction={self.config.random_fraction}, "
            f"seed={self.seed}, num_replicas={self.num_replicas}, rank={self.rank})"
        )
