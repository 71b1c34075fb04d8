"""Property-based tests (hypothesis) on the plan functions and the rank split of the samplers built on them.

For arbitrary sizes, seeds, epochs, world sizes and budgets: the plan is deterministic, has the documented length
and per-class counts, has no duplicates where there must be none, and the rank split covers it exactly with at
most W-1 padded positions that repeat the plan's start (``drop_last=False``) or drops at most W-1 (``True``).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_pretrain_update.sampling.balanced import class_balanced_plan
from torch_pretrain_update.sampling.plans import (
    random_subset_plan,
    stratified_plan,
    stratified_quotas,
)
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
epochs = st.integers(min_value=0, max_value=50)
worlds = st.integers(min_value=1, max_value=8)


def _labels(draw, max_classes: int = 6, max_n: int = 80) -> torch.Tensor:
    n = draw(st.integers(min_value=1, max_value=max_n))
    c = draw(st.integers(min_value=1, max_value=max_classes))
    values = draw(st.lists(st.integers(min_value=0, max_value=c - 1), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.int64)


def _check_rank_split(make_sampler, plan: list[int], world: int, drop_last: bool) -> None:
    streams = [list(make_sampler(world, r, drop_last)) for r in range(world)]
    lengths = {len(s) for s in streams}
    assert len(lengths) == 1, "ranks must have equal lengths"
    per_rank = lengths.pop()
    expected_len = len(plan) // world if drop_last else math.ceil(len(plan) / world)
    assert per_rank == expected_len
    interleaved = [streams[r][i] for i in range(per_rank) for r in range(world)]
    if drop_last:
        assert interleaved == plan[: per_rank * world]
        assert len(plan) - len(interleaved) <= world - 1
    else:
        padding = len(interleaved) - len(plan)
        assert 0 <= padding <= world - 1
        assert interleaved[: len(plan)] == plan
        assert interleaved[len(plan) :] == (plan * (padding // max(len(plan), 1) + 1))[:padding]


@SETTINGS
@given(data=st.data(), seed=seeds, epoch=epochs, world=worlds, replacement=st.booleans(), drop_last=st.booleans())
def test_random_subset_plan_properties(data, seed, epoch, world, replacement, drop_last):
    n = data.draw(st.integers(min_value=1, max_value=200))
    k = data.draw(st.integers(min_value=1, max_value=n if not replacement else 3 * n))
    excl = data.draw(st.lists(st.integers(min_value=0, max_value=n - 1), max_size=n // 3, unique=True))
    if not replacement and k > n - len(excl):
        k = n - len(excl)
    if k < 1:
        return
    plan = random_subset_plan(n, k, seed, epoch, replacement=replacement, exclude=excl or None)
    again = random_subset_plan(n, k, seed, epoch, replacement=replacement, exclude=excl or None)
    assert torch.equal(plan, again)
    assert plan.numel() == k and plan.dtype == torch.int64
    values = plan.tolist()
    assert all(0 <= v < n for v in values) and not set(values) & set(excl)
    if not replacement:
        assert len(set(values)) == k

    def make(w, r, dl):
        s = RandomSubsetSampler(n, k, replacement=replacement, exclude=excl or None, seed=seed,
                                num_replicas=w, rank=r, drop_last=dl)
        s.set_epoch(epoch)
        return s

    _check_rank_split(make, values, world, drop_last)


@SETTINGS
@given(data=st.data(), seed=seeds, epoch=epochs, world=worlds, drop_last=st.booleans())
def test_stratified_plan_properties(data, seed, epoch, world, drop_last):
    labels = _labels(data.draw)
    counts = torch.bincount(labels)
    present = int((counts > 0).sum())
    k = data.draw(st.integers(min_value=present, max_value=labels.numel()))
    plan = stratified_plan(labels, k, seed, epoch)
    assert torch.equal(plan, stratified_plan(labels, k, seed, epoch))
    values = plan.tolist()
    assert len(values) == k and len(set(values)) == k
    quotas = stratified_quotas(counts, k)
    assert int(quotas.sum()) == k
    assert torch.equal(torch.bincount(labels[plan], minlength=counts.numel()), quotas)
    assert bool(((quotas >= 1) | (counts == 0)).all())  # min_per_class=1: every present class is represented

    def make(w, r, dl):
        s = StratifiedSampler(labels, k, seed=seed, num_replicas=w, rank=r, drop_last=dl)
        s.set_epoch(epoch)
        return s

    _check_rank_split(make, values, world, drop_last)


@SETTINGS
@given(data=st.data(), seed=seeds, epoch=epochs, world=worlds, replacement=st.booleans(), drop_last=st.booleans())
def test_class_balanced_plan_properties(data, seed, epoch, world, replacement, drop_last):
    labels = _labels(data.draw, max_n=60)
    counts = torch.bincount(labels)
    m = data.draw(st.sampled_from(["max", "min", "mean"]) | st.integers(min_value=1, max_value=90))
    plan = class_balanced_plan(labels, seed, epoch, samples_per_class=m, replacement=replacement)
    assert torch.equal(plan, class_balanced_plan(labels, seed, epoch, samples_per_class=m, replacement=replacement))
    present = counts > 0
    per_class = torch.bincount(labels[plan], minlength=counts.numel())
    m_resolved = int(per_class[present][0])
    assert bool((per_class[present] == m_resolved).all()) and bool((per_class[~present] == 0).all())
    if isinstance(m, int):
        assert m_resolved == m
    else:
        expected = {"max": int(counts[present].max()), "min": int(counts[present].min())}.get(m)
        if expected is not None:
            assert m_resolved == expected
    if not replacement:  # even repetition: every sample floor(m/n) or ceil(m/n) times
        times = torch.bincount(plan, minlength=labels.numel())
        n_c = counts[labels]
        assert bool((times >= m_resolved // n_c).all()) and bool((times <= -(-m_resolved // n_c)).all())

    def make(w, r, dl):
        s = ClassBalancedSampler(labels, samples_per_class=m, replacement=replacement, seed=seed,
                                 num_replicas=w, rank=r, drop_last=dl)
        s.set_epoch(epoch)
        return s

    _check_rank_split(make, plan.tolist(), world, drop_last)
