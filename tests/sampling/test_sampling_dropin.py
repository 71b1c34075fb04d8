"""Drop-in fidelity of the samplers and index subsets.

- ``WeightedSampler`` takes ``WeightedRandomSampler``'s signature (``weights, num_samples, replacement=True,
  generator=None``, by position or keyword), the generator's seed feeding the plan; PyTorch's own
  ``WeightedRandomSampler`` tests (test/test_dataloader.py) run against it.
- Its epochs advance by themselves (a second ``iter()`` draws the next epoch, as ``WeightedRandomSampler`` draws
  afresh), deterministically and resumable under ``StatefulDataLoader`` in a loop that never calls
  ``set_epoch``; the ``DistributedSampler``-like samplers keep repeating their epoch until ``set_epoch``.
- ``ClassBalancedSampler`` per-class targets, checked count for count against imbalanced-learn's
  ``RandomOverSampler`` / ``RandomUnderSampler`` on the same labels.
- ``indices=`` on ``ClassBalancedSampler`` and ``WeightedSampler``: a selection feeds a second sampler.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import IndexDataset, check_resume, to_py
from torch_pretrain_update import (
    ClassBalancedSampler,
    EntropySampler,
    RandomSubsetSampler,
    StratifiedSampler,
    WeightedSampler,
    class_balanced_plan,
)

WEIGHTS = [0.1, 0.9, 0.4, 0.7, 3.0, 0.6]  # the weights of PyTorch's own sampler tests


def epoch_stream(make: Callable[[], Any], epoch: int) -> list[int]:
    """The stream of ``epoch`` from a fresh sampler told the epoch (the reference for advancing epochs)."""
    s = make()
    s.set_epoch(epoch)
    return list(s)


# ----- WeightedRandomSampler's signature and generator ---------------------------------------------------------


def test_replacement_and_generator_by_position_as_weighted_random_sampler():
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 4.0])
    without = WeightedSampler(w, 5, False)  # WeightedRandomSampler(weights, num_samples, replacement)
    assert without.replacement is False
    picked = list(without)
    assert len(set(picked)) == 5 and 1 not in picked  # distinct, and the zero weight never drawn
    g = torch.Generator().manual_seed(7)
    by_position = WeightedSampler(w, 40, True, g)
    g7 = torch.Generator().manual_seed(7)
    by_keyword = WeightedSampler(weights=w, num_samples=40, replacement=True, generator=g7)
    assert list(by_position) == list(by_keyword)
    # torch's class accepts the same call
    assert len(list(WeightedRandomSampler(w, 40, True, torch.Generator().manual_seed(7)))) == 40


def test_generator_initial_seed_is_the_plan_seed_and_is_never_advanced():
    w = torch.rand(50, generator=torch.Generator().manual_seed(0)) + 0.01
    g = torch.Generator().manual_seed(42)
    before = g.get_state().clone()
    s = WeightedSampler(w, 30, generator=g)
    assert s.seed == 42
    assert list(s) == list(WeightedSampler(w, 30, seed=42))
    assert torch.equal(g.get_state(), before)  # read once, never drawn from
    g.manual_seed(5)  # a later reseed does not change a sampler already built
    assert epoch_stream(lambda: s, 0) == list(WeightedSampler(w, 30, seed=42))
    assert list(WeightedSampler(w, 30, generator=torch.Generator().manual_seed(43))) != list(
        WeightedSampler(w, 30, generator=torch.Generator().manual_seed(42))
    )
    big = torch.Generator()  # the default seed of a fresh generator is a 64-bit number
    assert WeightedSampler(w, 3, generator=big).seed == big.initial_seed()


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"generator": torch.Generator().manual_seed(1), "seed": 1}, ValueError, ["seed or generator", "not both"]),
        ({"generator": 3}, TypeError, ["generator", "torch.Generator", "int"]),
        ({"generator": np.random.default_rng(0)}, TypeError, ["generator", "Generator"]),
    ],
)
def test_generator_bad_input(kwargs, exc, words):
    with pytest.raises(exc) as info:
        WeightedSampler(WEIGHTS, 5, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# PyTorch's own tests of WeightedRandomSampler (test/test_dataloader.py), with WeightedSampler in its place.


def test_torch_sampler_reproducibility():
    # TestDataLoader.test_sampler_reproducibility, first half: the same generator seed gives the same stream
    for fn in (
        lambda: WeightedSampler(WEIGHTS, num_samples=5, replacement=True, generator=torch.Generator().manual_seed(42)),
        lambda: WeightedSampler(WEIGHTS, num_samples=5, replacement=False, generator=torch.Generator().manual_seed(42)),
    ):
        assert list(fn()) == list(fn())
    # Second half, adapted: torch re-seeds its global generator (torch.manual_seed(0)) between the two runs of
    # list(sampler) + list(sampler); here the stream is a pure function of (seed, epoch) instead, so two
    # samplers built alike give the same epochs whatever the global seed, and each iter() draws afresh.
    for replacement in (True, False):
        torch.manual_seed(0)
        s = WeightedSampler(WEIGHTS, num_samples=5, replacement=replacement)
        l1 = list(s) + list(s)
        torch.manual_seed(123)
        t = WeightedSampler(WEIGHTS, num_samples=5, replacement=replacement)
        l2 = list(t) + list(t)
        assert l1 == l2
        assert l1[:5] == epoch_stream(lambda r=replacement: WeightedSampler(WEIGHTS, 5, r), 0)
        assert l1[5:] == epoch_stream(lambda r=replacement: WeightedSampler(WEIGHTS, 5, r), 1)
        # two iterators taken side by side, as the torch test does: the second to begin draws the next epoch
        its = (iter(s), iter(s))
        ls: tuple[list[int], list[int]] = ([], [])
        for _ in range(len(s)):
            for i in range(2):
                ls[i].append(next(its[i]))
        assert ls[0] == epoch_stream(lambda r=replacement: WeightedSampler(WEIGHTS, 5, r), 2)
        assert ls[1] == epoch_stream(lambda r=replacement: WeightedSampler(WEIGHTS, 5, r), 3)


def test_torch_sampler_len_with_replacement():
    # TestDataLoader.test_random_sampler_len_with_replacement, for the weighted sampler
    dataset = IndexDataset(100)
    num_samples = len(dataset) + 5
    sampler = WeightedSampler(torch.ones(len(dataset)), num_samples, replacement=True)
    assert len(sampler) == num_samples
    assert sum(1 for _ in sampler) == num_samples
    assert len(DataLoader(dataset, batch_size=1, sampler=sampler)) == num_samples
    assert len(DataLoader(dataset, batch_size=6, sampler=sampler)) == math.ceil(num_samples / 6)
    assert sum(len(b) for b in DataLoader(dataset, batch_size=6, sampler=sampler)) == num_samples


def test_torch_weighted_random_sampler_validation():
    # the argument checks torch's WeightedRandomSampler makes (num_samples > 0, 1-D weights), same exceptions
    for make in (WeightedRandomSampler, WeightedSampler):
        with pytest.raises(ValueError):
            make(WEIGHTS, 0, True)
        with pytest.raises(ValueError):
            make([[1.0, 2.0]], 5)


# ----- epochs that advance by themselves ----------------------------------------------------------------------


def test_weighted_sampler_second_iter_runs_the_next_epoch():
    w = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.05
    make = lambda: WeightedSampler(w, 25, seed=3)  # noqa: E731
    s = make()
    a, b, c = list(s), list(s), list(s)
    assert [a, b, c] == [epoch_stream(make, e) for e in range(3)] and a != b != c
    assert s.state_dict()["epoch"] == 2
    s.set_epoch(0)  # set_epoch wins, and the next iter() runs exactly that epoch
    assert list(s) == a
    assert list(s) == b
    it = iter(s)  # an iterator that is never started does not count
    del it
    assert list(s) == c


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomSubsetSampler(30, 10, seed=1),
        lambda: StratifiedSampler(torch.arange(30) % 3, 10, seed=1),
        lambda: ClassBalancedSampler(torch.arange(30) % 3, samples_per_class=7, seed=1),
        lambda: EntropySampler(torch.softmax(torch.randn(30, 4), 1), 10, mode="proportional", seed=1),
    ],
    ids=["random_subset", "stratified", "class_balanced", "entropy"],
)
def test_distributed_sampler_like_samplers_repeat_until_set_epoch(make):
    s = make()
    first = list(s)
    assert list(s) == first  # like DistributedSampler: same epoch on every rank whatever extra iter() calls
    s.set_epoch(1)
    assert list(s) != first


N, BATCH, EPOCHS = 26, 4, 3
_W = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.05


def _auto_loader(num_workers: int, replacement: bool = True) -> Callable[[], tuple[Any, Any]]:
    def make():
        sampler = WeightedSampler(_W, 22, replacement, seed=9)
        return StatefulDataLoader(IndexDataset(N), batch_size=BATCH, sampler=sampler, num_workers=num_workers), sampler

    return make


def train_without_set_epoch(make, *, start: int = 0, state: Any = None, stop: int | None = None,
                            at: str = "end", k: int = 0) -> tuple[list[list[Any]], Any]:
    """``for epoch in range(start, EPOCHS): for batch in loader: ...``, never calling ``set_epoch``; a checkpoint
    after the epoch's loop (``at="end"``) or after ``k`` batches inside it (``at="inside"``), then a crash at
    epoch ``stop``. Returns the batches seen per epoch and the checkpoint (through JSON)."""
    loader, _ = make()
    if state is not None:
        loader.load_state_dict(state)
    seen: list[list[Any]] = []
    for epoch in range(start, EPOCHS):
        batches = []
        for i, batch in enumerate(loader, 1):
            batches.append(to_py(batch))
            if epoch == stop and at == "inside" and i == k:
                return [*seen, batches], json.loads(json.dumps(loader.state_dict()))
        seen.append(batches)
        if epoch == stop and at == "end":
            return seen, json.loads(json.dumps(loader.state_dict()))
    return seen, None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_advancing_epochs_resume_under_stateful_dataloader(num_workers):
    make = _auto_loader(num_workers)
    full, _ = train_without_set_epoch(make)
    reference = [epoch_stream(lambda: make()[1], e) for e in range(EPOCHS)]
    assert [sum(e, []) for e in full] == reference  # epoch e of the loop is the sampler's epoch e
    assert full[0] != full[1] != full[2]
    n = len(full[1])
    cases = [("end", 0), ("end", 1), ("inside", 2), ("inside", n)] if num_workers == 0 else [("end", 0), ("inside", 2)]
    for at, k in cases:
        stop = 1 if at == "inside" or num_workers else k
        head, ckpt = train_without_set_epoch(make, stop=stop, at=at, k=k)
        resume_from = stop + 1 if at == "end" else stop  # the loop's own bookkeeping of where it was
        tail, _ = train_without_set_epoch(make, start=resume_from, state=ckpt)
        if at == "inside":  # the crashed epoch: its first k batches, then the resumed rest
            head[-1] = head[-1] + tail.pop(0)
        assert head + tail == full, (at, k)


def test_advancing_epochs_resume_without_replacement_and_with_set_epoch():
    # replacement=False (a materialised selection per epoch), and a loop that does call set_epoch: unchanged
    def make():
        sampler = WeightedSampler(_W, 15, False, seed=4)
        return StatefulDataLoader(IndexDataset(N), batch_size=BATCH, sampler=sampler), sampler.set_epoch

    assert check_resume(make, epochs=3, break_epochs=[1]) >= 5
    full, _ = train_without_set_epoch(_auto_loader(0, replacement=False))
    head, ckpt = train_without_set_epoch(_auto_loader(0, replacement=False), stop=0)
    tail, _ = train_without_set_epoch(_auto_loader(0, replacement=False), start=1, state=ckpt)
    assert head + tail == full and full[0] != full[1]


# ----- per-class targets, against imbalanced-learn --------------------------------------------------------------


def _labels(counts: dict[int, int], seed: int) -> np.ndarray:
    y = np.concatenate([np.full(n, label) for label, n in counts.items()])
    return np.random.default_rng(seed).permutation(y)


MULTI = _labels({0: 50, 2: 20, 5: 7, 9: 3}, 0)  # label values not 0..C-1, the majority not first in the data
BINARY = _labels({3: 9, 7: 40}, 1)


def _imblearn_counts(y: np.ndarray, strategy: Any, resampling: str) -> dict[int, int]:
    from imblearn.over_sampling import RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    cls = RandomOverSampler if resampling == "over" else RandomUnderSampler
    _, y_res = cls(sampling_strategy=strategy, random_state=0).fit_resample(np.arange(len(y)).reshape(-1, 1), y)
    return {int(k): int(v) for k, v in Counter(y_res.tolist()).items()}


def _our_counts(y: np.ndarray, strategy: Any, resampling: str | None, **kwargs: Any) -> dict[int, int]:
    s = ClassBalancedSampler(y, samples_per_class=strategy, resampling=resampling, seed=3, **kwargs)
    got = dict(Counter(y[list(s)].tolist()))
    assert s.class_targets == {k: got.get(k, 0) for k in s.class_targets}
    return {k: v for k, v in got.items() if v}


IMBLEARN_CASES = [
    (MULTI, strategy, resampling)
    for resampling, names in (
        ("over", ["auto", "all", "not majority", "not minority", "minority"]),
        ("under", ["auto", "all", "not majority", "not minority", "majority"]),
    )
    for strategy in names
] + [
    (MULTI, {2: 40, 9: 30}, "over"),
    (MULTI, {0: 10, 5: 4}, "under"),
    (MULTI, {0: 50, 2: 20, 5: 7, 9: 3}, "over"),
    (BINARY, 0.5, "over"),
    (BINARY, 0.8, "over"),
    (BINARY, 1.0, "over"),
    (BINARY, 0.5, "under"),
    (BINARY, 0.3, "under"),
    (BINARY, "auto", "under"),
]


@pytest.mark.parametrize("y, strategy, resampling", IMBLEARN_CASES, ids=[f"{c[2]}-{c[1]}" for c in IMBLEARN_CASES])
@pytest.mark.parametrize("replacement", [False, True])
def test_per_class_counts_equal_imbalanced_learn(y, strategy, resampling, replacement):
    want = _imblearn_counts(y, strategy, resampling)
    assert _our_counts(y, strategy, resampling, replacement=replacement) == want
    if isinstance(strategy, dict):  # a mapping needs no direction; a sequence by label value gives the same
        assert _our_counts(y, strategy, None) == want
        sequence = [strategy.get(label, int((y == label).sum())) for label in range(int(y.max()) + 1)]
        assert _our_counts(y, sequence, None) == want


def test_per_class_targets_plan_is_exact_and_resumes():
    y = torch.as_tensor(MULTI)
    targets = {0: 12, 2: 30, 5: 0, 9: 5}  # over- and under-sampling in one go; class 5 left out
    s = ClassBalancedSampler(y, samples_per_class=targets, seed=8)
    plan = class_balanced_plan(y, 8, 0, samples_per_class=targets)
    assert list(s) == plan.tolist() and len(s) == 47 and s.num_per_class is None
    assert dict(Counter(y[plan].tolist())) == {0: 12, 2: 30, 9: 5}
    per_sample = torch.bincount(plan, minlength=len(y))
    assert set(per_sample[y == 2].tolist()) == {1, 2}  # 30 of 20 samples: even repetition
    assert set(per_sample[y == 9].tolist()) == {1, 2} and int(per_sample[y == 9].sum()) == 5
    t = ClassBalancedSampler(y, samples_per_class=targets, seed=8)
    it = iter(t)
    head = [next(it) for _ in range(20)]
    state = json.loads(json.dumps(t.state_dict()))
    fresh = ClassBalancedSampler(y, samples_per_class=targets, seed=8)
    fresh.load_state_dict(state)
    assert head + list(fresh) == plan.tolist()
    other = ClassBalancedSampler(y, samples_per_class={**targets, 9: 6}, seed=8)
    with pytest.raises(ValueError, match="class_targets"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "y, kwargs, exc, words",
    [
        (BINARY, {"samples_per_class": 0.5}, TypeError, ["samples_per_class", "resampling='over'/'under'"]),
        (MULTI, {"samples_per_class": "auto"}, ValueError, ["resampling='over'", "'under'"]),
        (MULTI, {"samples_per_class": "minority", "resampling": "under"}, ValueError, ["'minority'", "under"]),
        (MULTI, {"samples_per_class": 0.5, "resampling": "over"}, ValueError, ["binary", "4 classes"]),
        (BINARY, {"samples_per_class": 1.5, "resampling": "over"}, ValueError, ["(0, 1]", "1.5"]),
        (BINARY, {"samples_per_class": 0.1, "resampling": "over"}, ValueError, ["larger ratio"]),
        (BINARY, {"samples_per_class": 0.1, "resampling": "under"}, ValueError, ["larger ratio"]),
        (MULTI, {"samples_per_class": {2: 10}, "resampling": "over"}, ValueError, ["10", "class 2", "20"]),
        (MULTI, {"samples_per_class": {0: 60}, "resampling": "under"}, ValueError, ["60", "class 0", "50"]),
        (MULTI, {"samples_per_class": {4: 10}}, ValueError, ["class 4", "no sample"]),
        (MULTI, {"samples_per_class": {2.0: 10}}, TypeError, ["keys", "2.0"]),
        (MULTI, {"samples_per_class": {2: -1}}, ValueError, ["samples_per_class[2]", "-1"]),
        (MULTI, {"samples_per_class": [1, 2, 3]}, ValueError, ["3 counts", "up to 9"]),
        (MULTI, {"samples_per_class": [1] * 10}, ValueError, ["samples_per_class[1]", "no sample"]),
        (MULTI, {"samples_per_class": {0: 0, 2: 0, 5: 0, 9: 0}}, ValueError, ["every class 0"]),
        (MULTI, {"samples_per_class": "max", "resampling": "over"}, ValueError, ["resampling", "every class alike"]),
        (MULTI, {"samples_per_class": {0: 5}, "resampling": "sideways"}, ValueError, ["resampling", "sideways"]),
    ],
)
def test_per_class_targets_bad_input(y, kwargs, exc, words):
    with pytest.raises(exc) as info:
        ClassBalancedSampler(y, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ----- index subsets ----------------------------------------------------------------------------------------------


LABELS = torch.tensor([i % 4 if i % 5 else 1 for i in range(60)])


@pytest.mark.parametrize("shuffle", [True, False])
def test_class_balanced_over_an_index_subset_is_the_mapped_plan(shuffle):
    subset = torch.tensor([57, 3, 14, 15, 16, 40, 41, 9, 22, 35, 36, 50, 2, 59])
    s = ClassBalancedSampler(LABELS, indices=subset, seed=5, shuffle=shuffle)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        plan = class_balanced_plan(LABELS[subset], 5, epoch, shuffle=shuffle)
        assert list(s) == subset[plan].tolist()
    assert set(list(s)) <= set(subset.tolist())
    counts = Counter(LABELS[list(s)].tolist())
    assert len(set(counts.values())) == 1 and set(counts) == set(LABELS[subset].tolist())
    mask = torch.zeros(60, dtype=torch.bool)
    mask[subset] = True  # a bool mask selects the same samples, in index order
    assert sorted(ClassBalancedSampler(LABELS, indices=mask, seed=5)) == sorted(
        ClassBalancedSampler(LABELS, indices=subset.sort().values, seed=5)
    )


def test_entropy_selection_feeds_a_class_balanced_sampler():
    probs = torch.softmax(torch.randn(60, 4, generator=torch.Generator().manual_seed(3)) * 3, dim=1)
    selector = EntropySampler(probs, 24, seed=0)
    selected = selector.plan()  # this epoch's selection (dataset indices), no data copied
    balanced = ClassBalancedSampler(LABELS, indices=selected, samples_per_class="max", seed=1)
    stream = list(balanced)
    assert set(stream) <= set(selected.tolist())
    per_class = Counter(LABELS[stream].tolist())
    largest = max(Counter(LABELS[selected].tolist()).values())
    assert per_class == {c: largest for c in set(LABELS[selected].tolist())}

    def make():  # through a StatefulDataLoader, resumed at every break point
        sampler = ClassBalancedSampler(LABELS, indices=selected, samples_per_class="max", seed=1)
        return StatefulDataLoader(IndexDataset(60), batch_size=5, sampler=sampler), sampler.set_epoch

    assert check_resume(make, epochs=2, break_epochs=[0]) >= 5


@pytest.mark.parametrize("replacement", [True, False])
def test_weighted_sampler_over_an_index_subset(replacement):
    w = torch.rand(80, generator=torch.Generator().manual_seed(4)) + 0.1
    w[[11, 13]] = 0.0
    subset = torch.tensor([70, 11, 5, 13, 60, 61, 62, 2, 30, 44, 45, 46])
    s = WeightedSampler(w, 9, replacement, indices=subset, seed=2)
    inner = WeightedSampler(w[subset], 9, replacement, seed=2)  # the same plan over the subset's positions
    for _ in range(2):  # two epochs, advancing by themselves in both
        got, positions = list(s), list(inner)
        assert got == subset[positions].tolist()
        assert set(got) <= set(subset.tolist()) - {11, 13}
    ranks = [list(WeightedSampler(w, 9, replacement, indices=subset, seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
    first = subset[list(WeightedSampler(w[subset], 9, replacement, seed=2))].tolist()
    assert [ranks[i % 2][i // 2] for i in range(9)] == first  # the rank split of the mapped plan


def test_index_subset_is_part_of_the_state():
    w = torch.ones(30)
    a = WeightedSampler(w, 6, indices=[1, 2, 3, 4], seed=0)
    b = WeightedSampler(w, 6, indices=[1, 2, 3, 5], seed=0)
    state = a.state_dict()
    with pytest.raises(ValueError, match="indices"):
        b.load_state_dict(state)
    WeightedSampler(w, 6, indices=[1, 2, 3, 4], seed=0).load_state_dict(state)
    c = ClassBalancedSampler(LABELS, indices=[1, 2, 3, 4], seed=0)
    with pytest.raises(ValueError, match="indices"):
        ClassBalancedSampler(LABELS, indices=[1, 2, 3, 6], seed=0).load_state_dict(c.state_dict())
    assert "indices" not in ClassBalancedSampler(LABELS).state_dict()["config"]  # older states stay valid


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: WeightedSampler(torch.ones(5), 2, indices=[0, 5]), ValueError, ["indices must be in [0, 5)", "5"]),
        (lambda: WeightedSampler(torch.ones(5), 2, indices=[0.5]), TypeError, ["indices", "integer"]),
        (lambda: WeightedSampler(torch.ones(5), 2, indices=[]), ValueError, ["indices", "at least one"]),
        (lambda: WeightedSampler(torch.tensor([1.0, 0, 0]), 2, False, indices=[0, 1]), ValueError,
         ["positive weights[indices]", "1 of 2"]),
        (lambda: WeightedSampler(torch.tensor([1.0, 0, 0]), 2, indices=[1, 2]), ValueError,
         ["weights[indices]", "positive"]),
        (lambda: ClassBalancedSampler([0, 1, 1], indices=[[0, 1]]), ValueError, ["indices", "1-D"]),
        (lambda: ClassBalancedSampler([0, 1, 1], indices=[True, False]), ValueError, ["indices", "length 3"]),
    ],
)
def test_index_subset_bad_input(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
