"""SelectionRounds (issue 9): disjoint rounds, exact budget, per-round selection rule, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.sampling.test_weighted_plans import numpy_topk
from torch_pretrain_update import SelectionRounds


def score_sequence(n: int, rounds: int, seed: int = 0) -> list[np.ndarray]:
    """The 'current model' scores of each round: different every round, with ties."""
    rng = np.random.default_rng(seed)
    return [np.round(rng.random(n), 2) for _ in range(rounds)]


@pytest.mark.parametrize("strategy", ["topk", "proportional", "random"])
@pytest.mark.parametrize("random_fraction", [0.0, 0.5, 1.0])
def test_rounds_disjoint_and_add_up_to_budget(strategy, random_fraction):
    n, budget, rounds = 300, 103, 5
    exclude = np.arange(0, 300, 7)
    sel = SelectionRounds(
        n, budget, rounds, strategy=strategy, random_fraction=random_fraction, exclude=exclude, seed=3
    )
    assert sel.round_sizes == [21, 21, 21, 20, 20]
    seen: set[int] = set()
    for r, scores in enumerate(score_sequence(n, rounds)):
        new = sel.next_round(scores + 0.01)
        assert new.dtype == torch.int64 and new.tolist() == sorted(new.tolist())
        assert new.numel() == sel.round_sizes[r] and len(set(new.tolist())) == new.numel()
        assert not seen & set(new.tolist()), "a round repeated an earlier pick"
        assert not set(new.tolist()) & set(exclude.tolist())
        seen |= set(new.tolist())
        assert sel.rounds_done == r + 1 and sel.chosen.numel() == len(seen)
    assert sel.chosen.numel() == budget and set(sel.chosen.tolist()) == seen
    with pytest.raises(RuntimeError, match="all 5 rounds are done"):
        sel.next_round(score_sequence(n, 1)[0])


def test_topk_round_rule_against_independent_computation():
    n, budget, rounds = 200, 60, 3
    sel = SelectionRounds(n, budget, rounds, strategy="topk", random_fraction=0.25, seed=1)
    taken = np.zeros(n, dtype=bool)
    for r, scores in enumerate(score_sequence(n, rounds, seed=5)):
        new = set(sel.next_round(scores).tolist())
        remaining = np.flatnonzero(~taken)
        size = sel.round_sizes[r]
        n_rand = int(np.floor(0.25 * size + 0.5))
        top = set(remaining[numpy_topk(scores[remaining], size - n_rand)].tolist())
        assert top <= new  # the score part: top-(size - n_rand) of the not-yet-picked scores, ties by index
        rand = new - top
        assert len(rand) == n_rand and rand <= set(remaining.tolist()) - top
        taken[list(new)] = True


def test_random_strategy_ignores_scores_and_topk_zero_fraction_is_pure_topk():
    n = 120
    a = SelectionRounds(n, 30, 3, strategy="random", seed=2)
    b = SelectionRounds(n, 30, 3, strategy="random", seed=2)
    for sa, sb in zip(score_sequence(n, 3, 0), score_sequence(n, 3, 1)):
        assert a.next_round(sa).tolist() == b.next_round(sb).tolist()
    pure = SelectionRounds(n, 30, 3, random_fraction=0.0)
    taken = np.zeros(n, dtype=bool)
    for scores in score_sequence(n, 3, 4):
        remaining = np.flatnonzero(~taken)
        expected = remaining[numpy_topk(scores[remaining], 10)]
        assert pure.next_round(scores).tolist() == expected.tolist()
        taken[expected] = True


@pytest.mark.parametrize("strategy", ["topk", "proportional"])
def test_resume_in_the_middle_gives_the_same_picks(strategy):
    n, budget, rounds = 250, 70, 6
    seq = score_sequence(n, rounds, seed=9)
    kw = {"strategy": strategy, "random_fraction": 0.5, "exclude": [1, 2, 3], "seed": 11}
    full = SelectionRounds(n, budget, rounds, **kw)
    unbroken = [full.next_round(s + 0.01).tolist() for s in seq]
    for stop in range(rounds + 1):
        first = SelectionRounds(n, budget, rounds, **kw)
        for s in seq[:stop]:
            first.next_round(s + 0.01)
        state = json.loads(json.dumps(first.state_dict()))
        second = SelectionRounds(n, budget, rounds, **kw)
        second.load_state_dict(state)
        assert second.rounds_done == stop and second.chosen.tolist() == first.chosen.tolist()
        rest = [second.next_round(s + 0.01).tolist() for s in seq[stop:]]
        assert [p.tolist() for p in first.picked_per_round] + rest == unbroken
    # the rounds really differ with the scores (the resume check is not trivially true)
    other = SelectionRounds(n, budget, rounds, **kw)
    assert other.next_round(seq[1] + 0.01).tolist() != unbroken[0]


def test_load_state_rejects_other_settings_and_corrupt_picks():
    sel = SelectionRounds(50, 10, 2, seed=0)
    sel.next_round(np.linspace(0, 1, 50))
    state = sel.state_dict()
    with pytest.raises(ValueError, match=r"state\['seed'\] is 0 but this SelectionRounds has seed=1"):
        SelectionRounds(50, 10, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\['budget'\] is 10"):
        SelectionRounds(50, 12, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="exclude"):
        SelectionRounds(50, 10, 2, exclude=[0]).load_state_dict(state)
    bad = json.loads(json.dumps(state))
    bad["picked"][0][1] = bad["picked"][0][0]
    with pytest.raises(ValueError, match="picked twice"):
        SelectionRounds(50, 10, 2).load_state_dict(bad)
    short = dict(state, picked=[state["picked"][0][:3]])
    with pytest.raises(ValueError, match=r"state\['picked'\]\[0\] must hold 5 indices; got 3"):
        SelectionRounds(50, 10, 2).load_state_dict(short)
    with pytest.raises(ValueError, match="state is missing key 'picked'"):
        SelectionRounds(50, 10, 2).load_state_dict({k: v for k, v in state.items() if k != "picked"})


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"),
    [
        ((0, 1, 1), {}, ValueError, "pool_size must be >= 1; got 0"),
        ((10, 11, 1), {}, ValueError, r"budget must be <= the number of pickable indices \(10 of 10"),
        ((10, 5, 1), {"exclude": range(6)}, ValueError, r"budget must be <= .* \(4 of 10 after exclude\)"),
        ((10, 3, 1), {"exclude": range(10)}, ValueError, "exclude removes all 10 indices"),
        ((10, 0, 1), {}, ValueError, "budget must be >= 1; got 0"),
        ((10, 3, 4), {}, ValueError, r"rounds must be <= budget \(3\)"),
        ((10, 3, 0), {}, ValueError, "rounds must be >= 1; got 0"),
        ((10, 3, 1.5), {}, TypeError, "rounds must be an int; got 1.5"),
        ((10, 3, 1), {"strategy": "margin"}, ValueError, "strategy must be one of 'topk', 'proportional'"),
        ((10, 3, 1), {"random_fraction": 2.0}, ValueError, "random_fraction must be <= 1.0; got 2.0"),
        ((10, 3, 1), {"temperature": 0.0}, ValueError, "temperature must be > 0.0; got 0.0"),
        ((10, 3, 1), {"exclude": [10]}, ValueError, r"exclude indices must be in \[0, 10\); got 10"),
    ],
)
def test_bad_construction(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SelectionRounds(*args, **kwargs)


def test_bad_scores():
    sel = SelectionRounds(10, 4, 2, strategy="proportional")
    with pytest.raises(ValueError, match=r"scores must have one entry per pool sample \(10\); got 9"):
        sel.next_round(np.ones(9))
    with pytest.raises(ValueError, match="scores must be finite; got nan at index 3"):
        sel.next_round(np.r_[np.ones(3), np.nan, np.ones(6)])
    with pytest.raises(ValueError, match="scores must be non-negative for mode='proportional'; got -1.0"):
        sel.next_round(np.r_[-1.0, np.ones(9)])
    with pytest.raises(ValueError, match=r"scores must be 1-D; got shape \(10, 1\)"):
        sel.next_round(np.ones((10, 1)))
    assert sel.rounds_done == 0  # failed rounds change nothing
