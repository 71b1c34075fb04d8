"""RandomSubsetSampler, StratifiedSampler, ClassBalancedSampler: plan = plan function, rank split, resume, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import IndexDataset, check_resume
from torch_pretrain_update.sampling import base, plans
from torch_pretrain_update.sampling.balanced import class_balanced_plan
from torch_pretrain_update.sampling.plans import random_subset_plan, stratified_plan
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler

LABELS = torch.from_numpy(np.random.default_rng(0).choice(5, size=61, p=[0.5, 0.25, 0.15, 0.07, 0.03]))
LABELS[:2] = torch.tensor([3, 4])  # every class present
EXCLUDE = [0, 5, 6, 7, 30, 31, 60]




# (sampler factory, plan function) pairs: the sampler's stream on one rank must be the plan.
CASES = {
    "subset": (
        lambda **kw: RandomSubsetSampler(IndexDataset(61), 25, exclude=EXCLUDE, **kw),
        lambda seed, epoch, shuffle: random_subset_plan(61, 25, seed, epoch, exclude=EXCLUDE, shuffle=shuffle),
    ),
    "subset_replacement": (
        lambda **kw: RandomSubsetSampler(61, 40, replacement=True, exclude=EXCLUDE, **kw),
        lambda seed, epoch, shuffle: random_subset_plan(
            61, 40, seed, epoch, replacement=True, exclude=EXCLUDE, shuffle=shuffle
        ),
    ),
    "stratified": (
        lambda **kw: StratifiedSampler(LABELS, 23, min_per_class=2, exclude=EXCLUDE, **kw),
        lambda seed, epoch, shuffle: stratified_plan(
            LABELS, 23, seed, epoch, min_per_class=2, exclude=EXCLUDE, shuffle=shuffle
        ),
    ),
    "balanced": (
        lambda **kw: ClassBalancedSampler(LABELS, samples_per_class=7, **kw),
        lambda seed, epoch, shuffle: class_balanced_plan(LABELS, seed, epoch, samples_per_class=7, shuffle=shuffle),
    ),
    "balanced_replacement": (
        lambda **kw: ClassBalancedSampler(LABELS, samples_per_class="mean", replacement=True, **kw),
        lambda seed, epoch, shuffle: class_balanced_plan(
            LABELS, seed, epoch, samples_per_class="mean", replacement=True, shuffle=shuffle
        ),
    ),
}


@pytest.fixture(params=[8, plans.CHUNK], ids=["chunk8", "chunk_default"])
def chunk(request, monkeypatch):
    """Run with the real CHUNK and with a tiny one, so that plans span many chunks / key-tree leaves."""
    monkeypatch.setattr(plans, "CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_is_the_plan(case, shuffle, chunk):
    make, plan_fn = CASES[case]
    s = make(seed=3, shuffle=shuffle)
    for epoch in (0, 1, 5):
        s.set_epoch(epoch)
        plan = plan_fn(3, epoch, shuffle).tolist()
        assert list(s) == plan
        assert len(s) == len(plan)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0  # a fresh selection / fresh draws each epoch


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_does_not_depend_on_world_size(case, world, drop_last, chunk):
    make, plan_fn = CASES[case]
    plan = plan_fn(11, 2, True).tolist()
    streams = []
    for rank in range(world):
        s = make(seed=11, num_replicas=world, rank=rank, drop_last=drop_last)
        s.set_epoch(2)
        streams.append(list(s))
    per_rank = len(plan) // world if drop_last else math.ceil(len(plan) / world)
    assert all(len(st) == per_rank for st in streams)
    merged = [streams[r][i] for i in range(per_rank) for r in range(world)]
    if drop_last:
        assert merged == plan[: per_rank * world] and len(plan) - len(merged) <= world - 1
    else:
        padding = len(merged) - len(plan)
        assert 0 <= padding <= world - 1
        assert merged == plan + plan[:padding]


def _resume_factory(case: str, num_workers: int, batch_size: int | None, **kw):
    make_sampler, _ = CASES[case]

    def make():
        s = make_sampler(seed=4, **kw)
        loader = StatefulDataLoader(IndexDataset(61), sampler=s, batch_size=batch_size, num_workers=num_workers)
        return loader, s.set_epoch

    return make


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_resume_with_stateful_dataloader(case, num_workers, batch_size, monkeypatch):
    monkeypatch.setattr(plans, "CHUNK", 8)  # resume lands inside later chunks / key-tree leaves
    if num_workers == 0:
        points = None if batch_size else [0, 1, 2, 9, 10, 17, 22, 23, 24]  # many k; fewer when every k is a batch
    else:
        points = [0, 1, 5]  # each break spawns worker processes: a few points only
    make = _resume_factory(case, num_workers, batch_size)
    assert check_resume(make, epochs=2, break_points=points) >= 6  # breaks checked in each of the two epochs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["subset_replacement", "balanced"])
def test_resume_on_a_rank_of_three(case, monkeypatch):
    monkeypatch.setattr(plans, "CHUNK", 8)
    make = _resume_factory(case, 0, 2, num_replicas=3, rank=2, drop_last=False)
    assert check_resume(make, epochs=2) >= 10


def test_state_dict_is_plain_json_and_positions_are_o1():
    s = ClassBalancedSampler(LABELS, samples_per_class="max", seed=1)
    s.set_epoch(3)
    it = iter(s)
    head = [next(it) for _ in range(40)]
    state = s.state_dict()
    back = json.loads(json.dumps(state))
    assert back == state and {k: back[k] for k in ("epoch", "position")} == {"epoch": 3, "position": 40}
    t = ClassBalancedSampler(LABELS, samples_per_class="max", seed=1)
    t.load_state_dict(state)
    rest = list(t)
    s.set_epoch(3)
    assert head + rest == list(s)


def test_attributes():
    s = StratifiedSampler(LABELS, 10, min_per_class=1)
    counts = torch.bincount(LABELS)
    assert s.quotas.tolist() == plans.stratified_quotas(counts, 10).tolist() and int(s.quotas.sum()) == 10
    b = ClassBalancedSampler(LABELS, samples_per_class="min")
    assert b.num_per_class == int(counts.min()) and b.num_classes_present == 5 and len(b) == 5 * b.num_per_class
    absent = ClassBalancedSampler(torch.tensor([0, 0, 2]), samples_per_class="max")
    assert absent.num_classes_present == 2 and sorted(list(absent)) == [0, 1, 2, 2]
    r = RandomSubsetSampler(IndexDataset(61), 5, exclude=EXCLUDE)
    assert r.pool_size == 61 - len(EXCLUDE) and len(r) == 5


ERRORS = [
    (RandomSubsetSampler, (10, 0), {}, ValueError, ["num_samples", "0"]),
    (RandomSubsetSampler, (10, 11), {}, ValueError, ["num_samples", "11", "(10)"]),
    (RandomSubsetSampler, (10, 3), {"exclude": range(10)}, ValueError, ["exclude", "all 10"]),
    (RandomSubsetSampler, (10, 9), {"exclude": [1, 2]}, ValueError, ["num_samples", "9", "left after exclude (8)"]),
    (RandomSubsetSampler, (10, 3), {"exclude": [10]}, ValueError, ["exclude", "10"]),
    (RandomSubsetSampler, (0, 1), {}, ValueError, ["data_source", "0"]),
    (RandomSubsetSampler, ([], 1), {}, ValueError, ["data_source", "0"]),
    (RandomSubsetSampler, (10.0, 1), {}, TypeError, ["data_source", "float"]),
    (RandomSubsetSampler, (10, 2.0), {}, TypeError, ["num_samples", "2.0"]),
    (RandomSubsetSampler, (10, 2), {"replacement": "yes"}, TypeError, ["replacement", "yes"]),
    (RandomSubsetSampler, (10, 2), {"num_replicas": 2, "rank": 2}, ValueError, ["rank", "2"]),
    (RandomSubsetSampler, (10, 2), {"num_replicas": 2, "rank": -1}, ValueError, ["rank", "-1"]),
    (RandomSubsetSampler, (10, 2), {"seed": 1.5}, TypeError, ["seed", "1.5"]),
    (StratifiedSampler, ([0, 1, 1], 4), {}, ValueError, ["num_samples", "4", "(3)"]),
    (StratifiedSampler, ([0, 1, 1], 0), {}, ValueError, ["num_samples", "0"]),
    (StratifiedSampler, ([0.0, 1.0], 1), {}, TypeError, ["labels", "float"]),
    (StratifiedSampler, ([0, -2], 1), {}, ValueError, ["labels", "-2"]),
    (StratifiedSampler, ([], 1), {}, ValueError, ["labels", "empty"]),
    (StratifiedSampler, ([[0, 1]], 1), {}, ValueError, ["labels", "1-D"]),
    (StratifiedSampler, ([0, 1, 2], 2), {}, ValueError, ["min_per_class=1", "num_samples=2"]),
    (StratifiedSampler, ([0, 1], 2), {"min_per_class": -1}, ValueError, ["min_per_class", "-1"]),
    (StratifiedSampler, ([0, 1], 1), {"exclude": [0, 1]}, ValueError, ["exclude", "all 2"]),
    (StratifiedSampler, ([0, 1], 1), {"num_replicas": 1, "rank": 1}, ValueError, ["rank", "1"]),
    (ClassBalancedSampler, ([0, 1],), {"samples_per_class": "median"}, ValueError, ["samples_per_class", "median"]),
    (ClassBalancedSampler, ([0, 1],), {"samples_per_class": 0}, ValueError, ["samples_per_class", "0"]),
    (ClassBalancedSampler, ([0, 1],), {"samples_per_class": 1.5}, TypeError, ["samples_per_class", "1.5"]),
    (ClassBalancedSampler, ([0, 1],), {"samples_per_class": None}, TypeError, ["samples_per_class", "None"]),
    (ClassBalancedSampler, (np.array([0.5, 1.0]),), {}, TypeError, ["labels", "float"]),
    (ClassBalancedSampler, ([True, False],), {}, TypeError, ["labels", "bool"]),
    (ClassBalancedSampler, ([3, -1],), {}, ValueError, ["labels", "-1"]),
    (ClassBalancedSampler, (np.array([], dtype=np.int64),), {}, ValueError, ["labels", "empty"]),
    (ClassBalancedSampler, ("abc",), {}, TypeError, ["labels", "str"]),
    (ClassBalancedSampler, ([0, 1],), {"num_replicas": 4, "rank": 7}, ValueError, ["rank", "7"]),
    (ClassBalancedSampler, ([0, 1],), {"drop_last": None}, TypeError, ["drop_last", "None"]),
]


@pytest.mark.parametrize("cls, args, kwargs, exc, words", ERRORS)
def test_bad_input(cls, args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        cls(*args, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_ramp_recuts_without_changing_the_stream():
    chunks = [torch.arange(0, 5000), torch.arange(5000, 5003), torch.arange(5003, 200_000)]
    pieces = list(base.ramp(iter(chunks)))
    assert torch.equal(torch.cat(pieces), torch.arange(200_000))
    assert [p.numel() for p in pieces[:4]] == [1024, 2048, 1928, 3]  # 1024, 2048, rest of chunk 0, chunk 1
    assert max(p.numel() for p in pieces) <= 200_000 - 5003


def test_large_streams_through_the_ramp_equal_the_plans():
    s = RandomSubsetSampler(200_000, 150_000, seed=2, num_replicas=3, rank=1)
    plan = random_subset_plan(200_000, 150_000, 2, 0)
    assert list(s) == plan[1::3].tolist()
    b = ClassBalancedSampler(torch.arange(70_000) % 3, samples_per_class=50_000, seed=5)
    assert list(b) == class_balanced_plan(torch.arange(70_000) % 3, 5, 0, samples_per_class=50_000).tolist()
