"""PlanSampler alone: the DistributedSampler rank split, chunked plans, positions, state and bad state."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import IndexDataset, check_resume
from torch_pretrain_update._rng import epoch_generator
from torch_pretrain_update.sampling.base import PlanSampler


class _Perm(PlanSampler):
    """Plan = a seeded permutation of range(n) (of 100 + range(n) when shuffle=False, to tell plan from index)."""

    def __init__(self, n: int, **kw) -> None:
        super().__init__(**kw)
        self.n = n

    def _plan_length(self) -> int:
        return self.n

    def _plan(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n) + 100
        return torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))


class _ChunkedPerm(_Perm):
    """The same plan handed out in chunks of 3 (regenerated from any start)."""

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        plan = self._plan(epoch)
        for a in range(start, self.n, 3):
            yield plan[a : a + 3]


@pytest.mark.parametrize("cls", [_Perm, _ChunkedPerm])
@pytest.mark.parametrize("n", [1, 5, 7, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_split_matches_distributed_sampler(cls, n, world, drop_last):
    plan = _Perm(n, seed=5)._plan(3).tolist()
    for rank in range(world):
        s = cls(n, seed=5, num_replicas=world, rank=rank, drop_last=drop_last)
        s.set_epoch(3)
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        expected = [plan[i] for i in ref]
        assert list(s) == expected
        assert len(s) == len(ref) == len(expected)


def test_chunked_and_whole_plans_agree_and_epochs_differ():
    a, b = _Perm(20, seed=1), _ChunkedPerm(20, seed=1)
    for e in (0, 1, 7):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(list(a)) == sorted(first)


@pytest.mark.parametrize("cls", [_Perm, _ChunkedPerm])
@pytest.mark.parametrize("world, rank, drop_last", [(1, 0, False), (3, 1, False), (3, 2, True), (4, 3, False)])
def test_resume_at_every_position(cls, world, rank, drop_last):
    def make():
        s = cls(13, seed=2, num_replicas=world, rank=rank, drop_last=drop_last)
        s.set_epoch(4)
        return s

    full = list(make())
    for k in range(len(full) + 1):
        s = make()
        it = iter(s)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(s.state_dict()))
        assert state == {"epoch": 4, "position": k, "config": s._config()}
        t = cls(13, seed=2, num_replicas=world, rank=rank, drop_last=drop_last)
        t.load_state_dict(state)
        t.set_epoch(4)  # the same epoch keeps the pending position
        assert head + list(t) == full
        assert list(t) == full  # the next iter() starts the epoch over


def test_set_epoch_to_another_epoch_drops_a_pending_position():
    s = _Perm(10, seed=0)
    s.load_state_dict({"epoch": 2, "position": 4})
    s.set_epoch(3)
    fresh = _Perm(10, seed=0)
    fresh.set_epoch(3)
    assert list(s) == list(fresh)
    # A state of an earlier epoch loaded into a sampler already at a later one (what StatefulDataLoader does
    # after the resumed loop's set_epoch(e + 1)): epoch 2 counts as finished, epoch 3 runs whole.
    s.load_state_dict({"epoch": 2, "position": 10})
    assert list(s) == list(fresh)
    s.set_epoch(2)  # back at the state's epoch: the state wins
    s.load_state_dict({"epoch": 2, "position": 10})  # at the end: nothing left this epoch
    assert list(s) == []
    with pytest.raises(ValueError, match=r"state\['position'\] must be <= 10; got 99"):
        s.load_state_dict({"epoch": 2, "position": 99})  # a state from a differently built sampler


def test_bad_state_and_bad_arguments():
    s = _Perm(10)
    with pytest.raises(TypeError, match="state must be a dict"):
        s.load_state_dict([0, 1])
    with pytest.raises(ValueError, match="missing key 'position'"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match=r"state\['position'\] must be >= 0; got -1"):
        s.load_state_dict({"epoch": 0, "position": -1})
    with pytest.raises(TypeError, match=r"state\['epoch'\] must be an int"):
        s.load_state_dict({"epoch": "0", "position": 0})
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\); got 2"):
        _Perm(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas must be >= 1; got 0"):
        _Perm(10, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="epoch must be >= 0; got -1"):
        s.set_epoch(-1)
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        _Perm(10, shuffle=1)




@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_base_resumes_under_stateful_dataloader(num_workers):
    def make():
        s = _ChunkedPerm(23, seed=9, num_replicas=2, rank=1)
        return StatefulDataLoader(IndexDataset(200), sampler=s, batch_size=3, num_workers=num_workers), s.set_epoch

    points = None if num_workers == 0 else [0, 1, 3]
    assert check_resume(make, epochs=2, break_points=points) >= 6
