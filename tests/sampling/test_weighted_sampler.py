"""WeightedSampler: drop-in use, rank split, resume with StatefulDataLoader, N beyond 2**24, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import IndexDataset, check_resume
from torch_pretrain_update import WeightedSampler
from torch_pretrain_update.sampling import draws as wp
from torch_pretrain_update.sampling.draws import (
    weighted_draw_chunk,
    weighted_draws,
    weighted_sample_without_replacement,
)


def rank_streams(make, world: int) -> list[list[int]]:
    return [list(make(world, r)) for r in range(world)]


def check_split(plan: list[int], streams: list[list[int]], drop_last: bool) -> None:
    """Interleaving the rank streams gives back the plan (+ padding from its start, <= W-1), or its
    truncation to a multiple of W."""
    world = len(streams)
    lengths = {len(s) for s in streams}
    assert len(lengths) == 1, lengths
    per = lengths.pop()
    merged = [streams[r][i] for i in range(per) for r in range(world)]
    n = len(plan)
    if drop_last:
        assert merged == plan[: n - n % world]
    else:
        pad = per * world - n
        assert 0 <= pad <= world - 1
        assert merged == (plan + plan * world)[: per * world]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(wp, "DRAW_CHUNK", 32)
    monkeypatch.setattr(wp, "KEY_BLOCK", 64)
    monkeypatch.setattr(wp, "_KEY_SAMPLE", 16)


# ----- plan and rank split ----------------------------------------------------------------------------------


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_identical_for_every_world_size(small_chunks, replacement, drop_last):
    w = torch.rand(300) ** 2
    n = 157  # not a multiple of any world size > 1; crosses several chunks / key blocks
    if replacement:
        plan = weighted_draws(w, n, seed=7, epoch=3).tolist()
    else:
        plan = weighted_sample_without_replacement(w, n, seed=7, epoch=3).tolist()
        assert len(set(plan)) == n

    def make(world, r):
        s = WeightedSampler(
            w, n, replacement=replacement, seed=7, num_replicas=world, rank=r, drop_last=drop_last
        )
        s.set_epoch(3)
        return s

    for world in (1, 2, 3, 4, 8):
        streams = rank_streams(make, world)
        assert all(len(s) == len(make(world, 0)) for s in streams)
        check_split(plan, streams, drop_last)


def test_stream_depends_on_seed_and_epoch_only(small_chunks):
    w = torch.rand(100)
    a = WeightedSampler(w, 90, seed=1)
    b = WeightedSampler(w.clone(), 90, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    sa = list(a)
    assert sa == list(b)  # fresh objects agree
    a.set_epoch(2)
    assert list(a) == sa  # set_epoch again: the same epoch (without it, the next iter() runs epoch 3)
    b.set_epoch(3)
    assert list(b) != sa
    c = WeightedSampler(w, 90, seed=2)
    c.set_epoch(2)
    assert list(c) != sa


def test_drop_in_distribution_matches_weighted_random_sampler_target():
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 4.0, 0.0, 1.25])
    n = 60_000
    stream = list(WeightedSampler(w, n, seed=0))
    counts = np.bincount(stream, minlength=8)
    assert counts[[1, 6]].sum() == 0
    pos = (w > 0).numpy()
    expected = n * (w[pos] / w.sum()).numpy()
    # seeded, alpha 1e-4 (see test_weighted_plans.ALPHA)
    assert stats.chisquare(counts[pos], expected).pvalue > 1e-4


def test_without_replacement_sampler_distinct_across_ranks(small_chunks):
    w = torch.rand(200) + 0.1
    streams = []
    for r in range(3):
        s = WeightedSampler(w, 120, replacement=False, seed=4, num_replicas=3, rank=r)
        streams.append(list(s))
    merged = [i for st in streams for i in st]
    assert len(merged) == 120 and len(set(merged)) == 120


def test_unshuffled_without_replacement_is_ascending():
    w = torch.rand(500)
    s = WeightedSampler(w, 100, replacement=False, shuffle=False, seed=0)
    got = list(s)
    assert got == sorted(got) and len(set(got)) == 100


# ----- N beyond 2**24 ---------------------------------------------------------------------------------------


def test_more_than_2_pow_24_weights():
    n = 2**24 + 10
    w = torch.ones(n, dtype=torch.float32)
    w[::2] = 0.0  # only odd indices can be drawn
    w[-1] = 1e6  # the last index carries about 10% of the mass
    with pytest.raises(RuntimeError, match="2\\^24"):
        torch.multinomial(w, 1)  # the limit WeightedSampler removes
    s = WeightedSampler(w, n, seed=0)
    it = iter(s)
    first = torch.tensor([next(it) for _ in range(2000)])  # only the first chunk is generated
    assert s._table is not None and s._table.cumsum.numel() == n
    chunk0 = weighted_draw_chunk(s._table, n, 0, seed=0, epoch=0)
    assert first.tolist() == chunk0[:2000].tolist()
    assert bool((chunk0 % 2 == 1).all())
    assert int(chunk0.max()) == n - 1 and bool((chunk0 > 2**24).any())
    frac_last = float((chunk0 == n - 1).double().mean())
    expected = 1e6 / (1e6 + (n // 2 - 1))
    assert abs(frac_last - expected) < 0.005, (frac_last, expected)  # binomial sd ~ 0.0006
    again = WeightedSampler(w, n, seed=0)
    it2 = iter(again)
    assert [next(it2) for _ in range(2000)] == first.tolist()
    other = WeightedSampler(w, n, seed=0)
    other.set_epoch(1)
    it3 = iter(other)
    assert [next(it3) for _ in range(2000)] != first.tolist()


# ----- resume -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("replacement", [True, False])
def test_resume_with_stateful_dataloader(small_chunks, num_workers, batch_size, replacement):
    w = torch.rand(80) + 0.05
    ds = IndexDataset(80)

    def make():
        s = WeightedSampler(w, 45, replacement=replacement, seed=3)
        loader = StatefulDataLoader(ds, sampler=s, batch_size=batch_size, num_workers=num_workers)
        return loader, s.set_epoch

    points = None if num_workers == 0 else [0, 1, 5, 11]
    checked = check_resume(make, epochs=2, break_points=points)
    assert checked >= 8


def test_resume_is_o1_no_chunk_before_the_position_is_drawn(small_chunks, monkeypatch):
    calls = []
    real = wp._draw_chunk

    def spy(table, length, seed, epoch, stream, shuffle):
        calls.append(stream[-1])
        return real(table, length, seed, epoch, stream, shuffle)

    monkeypatch.setattr(wp, "_draw_chunk", spy)
    w = torch.rand(1000)
    s = WeightedSampler(w, 10_000, seed=0, num_replicas=2, rank=1)
    full = list(s)
    calls.clear()
    s2 = WeightedSampler(w, 10_000, seed=0, num_replicas=2, rank=1)
    s2.load_state_dict({"epoch": 0, "position": 4000})
    rest = list(s2)
    assert rest == full[4000:]
    assert calls[0] == (4000 * 2 + 1) // 32  # starts at the chunk holding plan position 8001
    assert {k: v for k, v in s2.state_dict().items() if k != "config"} == {"epoch": 0, "position": 5000}


# ----- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (
            {"weights": torch.tensor([1.0, float("nan")])},
            ValueError,
            "weights must be finite; got nan at index 1",
        ),
        (
            {"weights": torch.tensor([1.0, -2.0])},
            ValueError,
            "weights must be non-negative; got -2.0 at index 1",
        ),
        ({"weights": torch.zeros(3)}, ValueError, "weights must have at least one positive entry"),
        ({"weights": torch.ones(2, 2)}, ValueError, r"weights must be 1-D; got shape \(2, 2\)"),
        ({"weights": []}, ValueError, "weights must not be empty"),
        ({"weights": "x"}, TypeError, "weights must be a torch.Tensor"),
        ({"num_samples": 0}, ValueError, "num_samples must be >= 1; got 0"),
        ({"num_samples": -3}, ValueError, "num_samples must be >= 1; got -3"),
        ({"num_samples": 2.5}, TypeError, "num_samples must be an int; got 2.5"),
        ({"num_samples": True}, TypeError, "num_samples must be an int; got True"),
        ({"replacement": "yes"}, TypeError, "replacement must be a bool; got 'yes'"),
        (
            {"replacement": False, "num_samples": 4},
            ValueError,
            r"num_samples must be <= the number of positive weights \(3 of 4\) without replacement; got 4",
        ),
        ({"seed": 1.5}, TypeError, "seed must be an int; got 1.5"),
        ({"shuffle": 1}, TypeError, "shuffle must be a bool; got 1"),
        ({"num_replicas": 0}, ValueError, "num_replicas must be >= 1; got 0"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"rank must be in \[0, num_replicas=2\); got 2"),
        ({"drop_last": None}, TypeError, "drop_last must be a bool; got None"),
    ],
)
def test_bad_input(kwargs, exc, pattern):
    args = {"weights": torch.tensor([1.0, 0.0, 2.0, 3.0]), "num_samples": 3, **kwargs}
    w = args.pop("weights")
    n = args.pop("num_samples")
    with pytest.raises(exc, match=pattern):
        WeightedSampler(w, n, **args)


def test_bad_state():
    s = WeightedSampler(torch.ones(5), 5)
    with pytest.raises(ValueError, match="state is missing key 'position'"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match=r"state\['position'\] must be >= 0; got -1"):
        s.load_state_dict({"epoch": 0, "position": -1})
