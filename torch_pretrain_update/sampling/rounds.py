"""``SelectionRounds``: spend a labelling (or training) budget over several rounds, re-scoring in between.

Measured on shifted data: one-shot top-k by the *old* model's uncertainty lost to random selection
(the old model is miscalibrated on the new data, and top-k picks redundant outliers), while selecting in
rounds, re-scoring the pool with the updated model each round, matched or beat random, and a half-random,
half-uncertain mix was best. Hence the defaults here: ``strategy="topk"`` with ``random_fraction=0.5``.

Each round is a plan of :func:`torch_pretrain_update.sampling.entropy_plan.entropy_plan_parts` (its settings an
``EntropyPlanConfig``) over the pool minus everything picked so far (and ``exclude``), seeded by
``(seed, round)``: a pure function of the scores given that round, so a run restored from
:meth:`SelectionRounds.state_dict` continues with the same picks.
"""

from __future__ import annotations

from typing import Any

import torch

from torch_pretrain_update._checks import check_choice, check_float, check_int
from torch_pretrain_update.sampling._inputs import check_scores, exclude_mask
from torch_pretrain_update.sampling.entropy_plan import EntropyPlanConfig, PlanInputs, plan_parts

__all__ = ["SelectionRounds"]

STRATEGIES = ("topk", "proportional", "random")

_CONFIG_KEYS = ("pool_size", "budget", "rounds", "strategy", "random_fraction", "temperature", "seed")


class SelectionRounds:
    """Multi-round selection with the model in the loop: score -> select -> train -> repeat.

    ``next_round(scores)`` takes the current model's scores of the whole pool (higher = less sure, e.g.
    :func:`torch_pretrain_update.entropy`) and returns this round's new indices: never one picked in an
    earlier round or listed in ``exclude``. Round ``r`` gets ``budget // rounds`` indices, plus one for the
    first ``budget % rounds`` rounds, so the rounds add up to exactly ``budget``.

    Within a round (``n`` indices): ``round(random_fraction * n)`` (half up) are drawn uniformly from the
    remaining pool minus the score picks, the rest by score: ``strategy="topk"`` takes the highest remaining
    scores (ties by lower index), ``"proportional"`` draws without replacement with probability
    ``∝ score ** (1 / temperature)``, ``"random"`` ignores the scores (the whole round is uniform).

    Args:
        pool_size: number of candidate samples N (indices ``0 .. N-1``).
        budget: total number of indices to pick over all rounds, at most ``N - len(exclude)``.
        rounds: number of rounds, in ``[1, budget]``.
        strategy: ``"topk"``, ``"proportional"`` or ``"random"``.
        random_fraction: in ``[0, 1]``; the uniformly drawn share of each round. Default 0.5: the mix that
            held up best under distribution shift (see the module docstring).
        temperature: ``> 0``, for ``strategy="proportional"``.
        exclude: indices (or a length-N bool mask) never to pick, e.g. already labelled.
        seed: round ``r`` draws from generators seeded by ``(seed, r)``.

    Example::

        >>> rounds = SelectionRounds(pool_size=1000, budget=100, rounds=4, seed=0)
        >>> for r in range(rounds.rounds):  # doctest: +SKIP
        ...     new = rounds.next_round(entropy(model(pool_x), from_logits=True))  # current model's scores
        ...     train(model, pool_x[rounds.chosen], labels_of(rounds.chosen))  # all picked so far
    """

    def __init__(
        self,
        pool_size: int,
        budget: int,
        rounds: int,
        *,
        strategy: str = "topk",
        random_fraction: float = 0.5,
        temperature: float = 1.0,
        exclude: Any = None,
        seed: int = 0,
    ) -> None:
        self.pool_size = check_int(pool_size, "pool_size", min_value=1)
        self.strategy = check_choice(strategy, "strategy", STRATEGIES)
        self.random_fraction = check_float(random_fraction, "random_fraction", low=0.0, high=1.0)
        self.temperature = check_float(temperature, "temperature", low=0.0, low_inclusive=False)
        self.seed = check_int(seed, "seed")
        mask = exclude_mask(exclude, self.pool_size)
        self._exclude = mask if mask is not None else torch.zeros(self.pool_size, dtype=torch.bool)
        available = self.pool_size - int(self._exclude.sum())
        if available == 0:
            raise ValueError(f"exclude removes all {self.pool_size} indices: nothing is left to select from")
        self.budget = check_int(budget, "budget", min_value=1)
        if self.budget > available:
            raise ValueError(
                f"budget must be <= the number of pickable indices ({available} of {self.pool_size} after "
                f"exclude); got {self.budget}"
            )
        self.rounds = check_int(rounds, "rounds", min_value=1)
        if self.rounds > self.budget:
            raise ValueError(
                f"rounds must be <= budget ({self.budget}) so that every round picks something; "
                f"got {self.rounds}"
            )
        self._picked: list[torch.Tensor] = []

    # ----- rounds -----
    @property
    def round_sizes(self) -> list[int]:
        """How many indices each round picks (``budget`` split as evenly as possible, larger rounds first)."""
        q, r = divmod(self.budget, self.rounds)
        return [q + (1 if i < r else 0) for i in range(self.rounds)]

    @property
    def rounds_done(self) -> int:
        return len(self._picked)

    @property
    def chosen(self) -> torch.Tensor:
        """All indices picked so far, round after round (each round in ascending order), int64."""
        if not self._picked:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(self._picked)

    @property
    def picked_per_round(self) -> list[torch.Tensor]:
        return [p.clone() for p in self._picked]

    def _round_config(self, size: int) -> EntropyPlanConfig:
        """The settings of a round of ``size`` indices (``"random"``: a top-k plan that is all random part)."""
        if self.strategy == "random":
            return EntropyPlanConfig(size, mode="topk", random_fraction=1.0, min_per_class=0)
        return EntropyPlanConfig(
            size, mode=self.strategy, temperature=self.temperature, random_fraction=self.random_fraction,
            min_per_class=0,
        )

    def next_round(self, scores: Any) -> torch.Tensor:
        """Pick this round's indices from the pool scored by the current model.

        Args:
            scores: 1-D finite scores of all ``pool_size`` candidates (higher = pick first / more likely);
                non-negative for ``strategy="proportional"``. Ignored (but still checked) for ``"random"``.

        Returns:
            int64 tensor of the new indices, ascending.

        Raises:
            RuntimeError: all rounds are done.
            ValueError / TypeError: bad scores (wrong length, NaN/inf, negative for proportional, too few
                positive scores for a proportional round without replacement).
        """
        r = self.rounds_done
        if r >= self.rounds:
            raise RuntimeError(f"all {self.rounds} rounds are done ({self.budget} indices picked)")
        config = self._round_config(self.round_sizes[r])
        s = check_scores(scores, "scores", non_negative=(config.mode == "proportional"))
        if s.numel() != self.pool_size:
            raise ValueError(
                f"scores must have one entry per pool sample ({self.pool_size}); got {s.numel()}"
            )
        mask = self._exclude.clone()
        if self._picked:
            mask[self.chosen] = True
        score_part, rand_part = plan_parts(PlanInputs(s, config, mask), self.seed, r)
        new = torch.sort(torch.cat([score_part, rand_part])).values
        self._picked.append(new)
        return new.clone()

    # ----- state -----
    def _config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _CONFIG_KEYS}

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state: the settings (checked on load) and each finished round's picks."""
        state = self._config()
        state["exclude"] = torch.nonzero(self._exclude).squeeze(1).tolist()
        state["picked"] = [p.tolist() for p in self._picked]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds done; the settings in ``state`` must equal this object's (else ValueError)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        for key in (*_CONFIG_KEYS, "exclude", "picked"):
            if key not in state:
                raise ValueError(f"state is missing key {key!r}; got keys {sorted(state)}")
        for key, mine in self._config().items():
            if state[key] != mine:
                raise ValueError(
                    f"state[{key!r}] is {state[key]!r} but this SelectionRounds has {key}={mine!r}"
                )
        if state["exclude"] != torch.nonzero(self._exclude).squeeze(1).tolist():
            raise ValueError("state['exclude'] differs from this SelectionRounds' exclude")
        picked = state["picked"]
        if not isinstance(picked, list) or len(picked) > self.rounds:
            raise ValueError(f"state['picked'] must be a list of at most {self.rounds} rounds")
        seen = self._exclude.clone()
        restored = []
        for r, p in enumerate(picked):
            t = torch.as_tensor(p, dtype=torch.int64)
            if t.ndim != 1 or t.numel() != self.round_sizes[r]:
                raise ValueError(
                    f"state['picked'][{r}] must hold {self.round_sizes[r]} indices; got {len(p)}"
                )
            out_of_range = bool(((t < 0) | (t >= self.pool_size)).any())
            if out_of_range or bool(seen[t].any()) or t.unique().numel() != t.numel():
                raise ValueError(f"state['picked'][{r}] has an index out of range, excluded, or picked twice")
            seen[t] = True
            restored.append(t)
        self._picked = restored

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pool_size={self.pool_size}, budget={self.budget}, rounds={self.rounds}, "
            f"strategy={self.strategy!r}, random_fraction={self.random_fraction}, done={self.rounds_done})"
        )
