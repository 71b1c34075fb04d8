"""Plan functions alone (no DataLoader): quotas, exact counts, even repetition, exclude, laziness, uniformity."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from torch_pretrain_update.sampling import balanced, plans
from torch_pretrain_update.sampling.balanced import (
    _class_balanced_chunks,
    class_balanced_plan,
    resolve_samples_per_class,
)
from torch_pretrain_update.sampling.plans import (
    ClassGroups,
    _iid_chunks,
    random_subset_plan,
    stratified_plan,
    stratified_quotas,
)

# ----- stratified_quotas ------------------------------------------------------------------------------------


def _reference_quotas(counts: list[int], total: int, min_per_class: int) -> list[int]:
    """Independent reference with exact fractions: Hamilton apportionment; classes below their minimum are
    fixed at it and the rest of the budget re-apportioned, until none falls short."""
    guaranteed = [min_per_class if n >= min_per_class else 0 for n in counts]
    fixed: set[int] = set()
    while True:
        free = [c for c in range(len(counts)) if c not in fixed]
        budget = total - sum(guaranteed[c] for c in fixed)
        pool = sum(counts[c] for c in free)
        quotas = {c: guaranteed[c] for c in fixed}
        if budget == 0 or pool == 0:
            quotas.update({c: 0 for c in free})
        else:
            shares = {c: Fraction(budget * counts[c], pool) for c in free}
            floors = {c: math.floor(shares[c]) for c in free}
            left = budget - sum(floors.values())
            # largest remainder first; equal remainders: lower class index first
            ranked = sorted(free, key=lambda c: (-(shares[c] - floors[c]), c))
            for c in free:
                quotas[c] = floors[c] + (1 if c in ranked[:left] else 0)
        short = [c for c in free if quotas[c] < guaranteed[c]]
        if not short:
            return [quotas[c] for c in range(len(counts))]
        fixed.update(short)


def test_quotas_documented_examples():
    assert stratified_quotas(torch.tensor([50, 30, 15, 5]), 10).tolist() == [5, 3, 1, 1]
    assert stratified_quotas(torch.tensor([97, 2, 1]), 10, min_per_class=2).tolist() == [8, 2, 0]


def test_quotas_proportional_when_exact():
    assert stratified_quotas([100, 300, 600], 100, min_per_class=0).tolist() == [10, 30, 60]
    assert stratified_quotas([100, 300, 600], 1000).tolist() == [100, 300, 600]  # everything


def test_quotas_equal_remainders_go_to_the_lower_class():
    assert stratified_quotas([1, 1, 1, 1], 2, min_per_class=0).tolist() == [1, 1, 0, 0]
    assert stratified_quotas([3, 5, 5, 3], 8, min_per_class=0).tolist() == [2, 3, 2, 1]  # all remainders 1/2
    assert stratified_quotas([2, 2, 2], 1, min_per_class=0).tolist() == [1, 0, 0]


def test_quotas_minimum_and_small_classes():
    # class 1 has 3 < min 5: only its proportional share (0 here); class 2 is raised to 5
    q = stratified_quotas([990, 3, 7], 20, min_per_class=5)
    assert q.tolist() == [15, 0, 5]
    assert stratified_quotas([0, 5, 0], 3).tolist() == [0, 3, 0]  # empty classes get nothing


def test_quotas_dtype_and_overflow_path():
    q = stratified_quotas(torch.tensor([2**40, 2**40 + 1, 3]), 2**40)
    assert q.dtype == torch.int64
    assert q.tolist() == _reference_quotas([2**40, 2**40 + 1, 3], 2**40, 1)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
    st.data(),
)
def test_quotas_match_reference(counts, data):
    total = data.draw(st.integers(1, sum(counts)))
    min_per_class = data.draw(st.integers(0, 4))
    need = sum(min_per_class for n in counts if n >= min_per_class)
    if need > total:
        with pytest.raises(ValueError, match="min_per_class"):
            stratified_quotas(counts, total, min_per_class=min_per_class)
        return
    q = stratified_quotas(torch.tensor(counts), total, min_per_class=min_per_class).tolist()
    assert q == _reference_quotas(counts, total, min_per_class)
    assert sum(q) == total
    assert all(0 <= qc <= n for qc, n in zip(q, counts))
    assert all(qc >= min_per_class for qc, n in zip(q, counts) if n >= min_per_class)
    if min_per_class == 0:  # plain Hamilton: within one of the exact share
        assert all(abs(qc - Fraction(total * n, sum(counts))) < 1 for qc, n in zip(q, counts))


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        (([5, 5], 0), {}, ValueError, ["num_samples", "0"]),
        (([5, 5], 11), {}, ValueError, ["num_samples", "11", "10"]),
        (([5, 5, 5], 2), {}, ValueError, ["min_per_class=1", "3 classes", "num_samples=2"]),
        (([5, 5], 2), {"min_per_class": -1}, ValueError, ["min_per_class", "-1"]),
        (([1.0, 2.0], 1), {}, TypeError, ["class_counts", "float"]),
        (([], 1), {}, ValueError, ["class_counts", "empty"]),
        (([-1, 3], 1), {}, ValueError, ["class_counts", "-1"]),
        (([[1, 2]], 1), {}, ValueError, ["class_counts", "1-D"]),
        (([1, 2], 1.5), {}, TypeError, ["num_samples", "1.5"]),
    ],
)
def test_quotas_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        stratified_quotas(*args, **kwargs)
    for w in words:
        assert w in str(info.value)


# ----- random subset ----------------------------------------------------------------------------------------


def test_random_subset_without_replacement_is_a_subset_without_duplicates():
    for epoch in range(5):
        p = random_subset_plan(100, 37, seed=3, epoch=epoch)
        assert p.dtype == torch.int64 and p.shape == (37,)
        assert len(set(p.tolist())) == 37 and 0 <= int(p.min()) and int(p.max()) < 100
    assert torch.equal(random_subset_plan(100, 37, 3, 1), random_subset_plan(100, 37, 3, 1))
    assert not torch.equal(random_subset_plan(100, 37, 3, 1), random_subset_plan(100, 37, 3, 2))
    assert not torch.equal(random_subset_plan(100, 37, 3, 1), random_subset_plan(100, 37, 4, 1))
    assert random_subset_plan(100, 100, 0, 0).sort().values.tolist() == list(range(100))


def test_random_subset_accepts_a_dataset_and_unshuffled_is_the_sorted_same_set():
    data = list(range(50))
    for replacement in (False, True):
        a = random_subset_plan(data, 20, 1, 2, replacement=replacement)
        b = random_subset_plan(50, 20, 1, 2, replacement=replacement, shuffle=False)
        assert b.tolist() == sorted(a.tolist())


@pytest.mark.parametrize("replacement", [False, True])
def test_random_subset_exclude_is_honoured(replacement):
    exclude = torch.arange(0, 60, 2)  # the even half
    for epoch in range(4):
        p = random_subset_plan(60, 25, 0, epoch, replacement=replacement, exclude=exclude)
        assert all(i % 2 == 1 for i in p.tolist())
    mask = torch.zeros(60, dtype=torch.bool)
    mask[exclude] = True
    assert torch.equal(
        random_subset_plan(60, 25, 0, 0, replacement=replacement, exclude=mask),
        random_subset_plan(60, 25, 0, 0, replacement=replacement, exclude=exclude.tolist() + [0, 2]),
    )
    if not replacement:  # everything that is left
        p = random_subset_plan(60, 30, 0, 0, exclude=exclude)
        assert sorted(p.tolist()) == list(range(1, 60, 2))
    assert torch.equal(random_subset_plan(60, 5, 0, 0, exclude=[]), random_subset_plan(60, 5, 0, 0))


def test_random_subset_exclude_errors():
    with pytest.raises(ValueError, match="exclude removes all 6 samples"):
        random_subset_plan(6, 1, 0, 0, exclude=range(6))
    with pytest.raises(ValueError, match=r"num_samples must be <= the number of samples left after exclude \(2\)"):
        random_subset_plan(6, 3, 0, 0, exclude=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"exclude indices must be in \[0, 6\); got 6 at position 1"):
        random_subset_plan(6, 1, 0, 0, exclude=[0, 6])
    with pytest.raises(ValueError, match="one entry per sample"):
        random_subset_plan(6, 1, 0, 0, exclude=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="exclude"):
        random_subset_plan(6, 1, 0, 0, exclude=[0.5])
    # with replacement, asking for more than remains is fine (draws repeat)
    assert random_subset_plan(6, 10, 0, 0, replacement=True, exclude=[0, 1, 2, 3]).unique().tolist() == [4, 5]


def test_random_subset_inclusion_is_uniform():
    # each index is in a k-of-N subset with probability k/N; 400 epochs, chi-square over the N indices
    n, k, epochs = 40, 10, 400
    hits = torch.zeros(n)
    for e in range(epochs):
        hits += torch.bincount(random_subset_plan(n, k, 7, e), minlength=n)
    expected = np.full(n, epochs * k / n)
    assert stats.chisquare(hits.numpy(), expected).pvalue > 1e-3


def test_random_subset_with_replacement_is_uniform_and_chunked():
    n, k = 50, 3 * plans.CHUNK + 123
    p = random_subset_plan(n, k, 5, 0, replacement=True)
    counts = torch.bincount(p, minlength=n).numpy()
    assert stats.chisquare(counts, np.full(n, k / n)).pvalue > 1e-3
    for start in (0, 1, plans.CHUNK - 1, plans.CHUNK, 2 * plans.CHUNK + 7, k - 1):
        tail = torch.cat(list(_iid_chunks(n, k, 5, 0, start)))
        assert torch.equal(tail, p[start:])


# ----- stratified -------------------------------------------------------------------------------------------

def _shuffled(t: torch.Tensor, seed: int) -> torch.Tensor:
    return t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(seed))]


LABELS = _shuffled(torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5), 0)


def test_stratified_counts_equal_quotas_and_no_duplicates():
    for epoch in range(5):
        p = stratified_plan(LABELS, 10, seed=1, epoch=epoch)
        assert len(set(p.tolist())) == 10
        assert torch.bincount(LABELS[p], minlength=4).tolist() == [5, 3, 1, 1]
    p = stratified_plan(LABELS, 97, seed=1, epoch=0, min_per_class=4)
    q = stratified_quotas(torch.bincount(LABELS), 97, min_per_class=4)
    assert torch.equal(torch.bincount(LABELS[p], minlength=4), q)
    assert len(set(p.tolist())) == 97


def test_stratified_unshuffled_is_the_sorted_same_set_and_epochs_differ():
    a = stratified_plan(LABELS, 30, 2, 3)
    b = stratified_plan(LABELS, 30, 2, 3, shuffle=False)
    assert b.tolist() == sorted(a.tolist())
    assert set(stratified_plan(LABELS, 30, 2, 4).tolist()) != set(a.tolist())


def test_stratified_exclude_is_honoured_and_quotas_use_what_is_left():
    exclude = torch.nonzero(LABELS == 0).flatten()[:45].tolist() + torch.nonzero(LABELS == 3).flatten().tolist()
    left = torch.ones(100, dtype=torch.bool)
    left[exclude] = False
    counts_left = torch.bincount(LABELS[left], minlength=4)
    assert counts_left.tolist() == [5, 30, 15, 0]
    for epoch in range(4):
        p = stratified_plan(LABELS, 20, 0, epoch, exclude=exclude)
        assert not set(p.tolist()) & set(exclude)
        assert torch.equal(torch.bincount(LABELS[p], minlength=4), stratified_quotas(counts_left, 20))
    with pytest.raises(ValueError, match=r"left after exclude \(50\)"):
        stratified_plan(LABELS, 51, 0, 0, exclude=exclude)
    with pytest.raises(ValueError, match="exclude removes all 100"):
        stratified_plan(LABELS, 1, 0, 0, exclude=torch.ones(100, dtype=torch.bool))


def test_stratified_picks_are_uniform_within_a_class():
    # class 1 (30 samples) gets 3 per epoch: each member with probability 1/10
    epochs = 600
    members = torch.nonzero(LABELS == 1).flatten()
    hits = torch.zeros(100)
    for e in range(epochs):
        hits += torch.bincount(stratified_plan(LABELS, 10, 9, e), minlength=100)
    observed = hits[members].numpy()
    assert observed.sum() == 3 * epochs
    assert stats.chisquare(observed, np.full(30, epochs * 3 / 30)).pvalue > 1e-3


# ----- class-balanced ---------------------------------------------------------------------------------------

IMB = _shuffled(torch.tensor([2] * 7 + [0] * 3 + [4] * 12 + [1] * 1), 1)
IMB_COUNTS = {0: 3, 1: 1, 2: 7, 4: 12}  # class 3 absent


@pytest.mark.parametrize("spc, m", [("max", 12), ("min", 1), ("mean", 23 // 4), (10, 10), (1, 1), (40, 40)])
@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_class_balanced_exact_counts(spc, m, replacement, shuffle):
    assert resolve_samples_per_class(torch.bincount(IMB), spc) == m
    p = class_balanced_plan(IMB, 0, 1, samples_per_class=spc, replacement=replacement, shuffle=shuffle)
    assert p.shape == (4 * m,)
    assert torch.bincount(IMB[p], minlength=5).tolist() == [m, m, m, 0, m]


@pytest.mark.parametrize("spc", ["max", "min", "mean", 5, 25])
def test_class_balanced_even_repetition(spc):
    m = resolve_samples_per_class(torch.bincount(IMB), spc)
    for epoch in range(3):
        p = class_balanced_plan(IMB, 4, epoch, samples_per_class=spc)
        per_sample = torch.bincount(p, minlength=23)
        for c, n in IMB_COUNTS.items():
            got = per_sample[IMB == c]
            q, r = divmod(m, n)
            assert set(got.tolist()) <= {q, q + 1}
            assert int((got == q + 1).sum()) == r  # the remainder: r distinct samples, one extra copy each


def test_class_balanced_remainder_is_uniform_without_replacement():
    # class 2 has 7 samples; m = 10 -> 3 extra copies per epoch: each sample with probability 3/7
    epochs = 700
    members = torch.nonzero(IMB == 2).flatten()
    extra = torch.zeros(7)
    for e in range(epochs):
        extra += torch.bincount(class_balanced_plan(IMB, 2, e, samples_per_class=10), minlength=23)[members] - 1
    assert extra.sum() == 3 * epochs
    assert stats.chisquare(extra.numpy(), np.full(7, epochs * 3 / 7)).pvalue > 1e-3


def test_class_balanced_with_replacement_is_iid_uniform_within_a_class():
    labels = torch.tensor([0] * 20 + [1] * 5)
    m = 2000
    p = class_balanced_plan(labels, 0, 0, samples_per_class=m, replacement=True)
    counts = torch.bincount(p, minlength=25).numpy()
    assert stats.chisquare(counts[:20], np.full(20, m / 20)).pvalue > 1e-3
    assert stats.chisquare(counts[20:], np.full(5, m / 5)).pvalue > 1e-3
    # i.i.d., not even repetition: per-sample counts spread like Binomial(m, 1/20) (variance m p (1-p))
    assert 0.5 * m / 20 * 19 / 20 < counts[:20].var() < 2.0 * m / 20 * 19 / 20


@pytest.mark.parametrize("replacement", [False, True])
def test_class_balanced_unshuffled_is_class_major_same_multiset(replacement):
    a = class_balanced_plan(IMB, 3, 0, samples_per_class=9, replacement=replacement)
    b = class_balanced_plan(IMB, 3, 0, samples_per_class=9, replacement=replacement, shuffle=False)
    assert sorted(a.tolist()) == sorted(b.tolist())
    classes = IMB[b].tolist()
    assert classes == sorted(classes)  # class 0 first, then 1, 2, 4
    for c in IMB_COUNTS:
        part = b[IMB[b] == c].tolist()
        assert part == sorted(part)  # ascending index within the class, copies adjacent


def test_class_balanced_passes_spread_copies():
    # shuffle=True without replacement: a class's copies come in passes, each a permutation of the class
    p = class_balanced_plan(IMB, 0, 0, samples_per_class=12)
    for c, n in IMB_COUNTS.items():
        stream = p[IMB[p] == c].tolist()
        members = sorted(torch.nonzero(IMB == c).flatten().tolist())
        full = len(stream) // n
        for t in range(full):
            assert sorted(stream[t * n : (t + 1) * n]) == members


def _big_labels() -> torch.Tensor:
    # sizes 5 / 300 / 70_000: one class per pass-generation path (many passes by sorting keys, a loop of
    # randperms, one randperm larger than CHUNK); "max" gives a plan of 210_000 over a key tree of depth 2.
    return _shuffled(torch.tensor([0] * 5 + [1] * 300 + [2] * 70_000), 2)


@pytest.mark.parametrize("replacement", [False, True])
def test_class_balanced_large_plan_counts_passes_and_lazy_tail(replacement):
    labels = _big_labels()
    groups = ClassGroups(labels, 3)
    m = 70_000
    p = class_balanced_plan(labels, 11, 2, replacement=replacement)
    assert p.numel() == 3 * m
    assert torch.bincount(labels[p]).tolist() == [m, m, m]
    per_sample = torch.bincount(p, minlength=labels.numel())
    if not replacement:
        for c, n in ((0, 5), (1, 300), (2, 70_000)):
            got = per_sample[labels == c]
            q, r = divmod(m, n)
            assert set(got.tolist()) <= {q, q + 1} and int((got == q + 1).sum()) == r
            stream = p[labels[p] == c]
            for t in {0, min(1, q - 1), q - 1}:  # passes are permutations of the class
                assert torch.equal(stream[t * n : (t + 1) * n].sort().values, groups.members(c))
    for start in (1, plans.CHUNK - 3, 2 * plans.CHUNK + 1, 3 * m - 1):
        tail = torch.cat(list(_class_balanced_chunks(groups, m, replacement, 11, 2, True, start)))
        assert torch.equal(tail, p[start:])


def _arrangements(monkeypatch, length_per_class: int, epochs: int, chunk: int) -> np.ndarray:
    """Class sequences of a 2-class balanced plan over many epochs, with a small CHUNK so the key tree is deep."""
    monkeypatch.setattr(plans, "CHUNK", chunk)
    labels = torch.tensor([0, 1])
    rows = [
        labels[class_balanced_plan(labels, 0, e, samples_per_class=length_per_class)].numpy()
        for e in range(epochs)
    ]
    return np.stack(rows)


def test_class_sequence_is_a_uniform_arrangement(monkeypatch):
    # 2 classes x 32 copies, CHUNK 8 -> a key tree of depth 3. For a uniformly random arrangement the number
    # of class-0 copies among the first 16 positions is Hypergeometric(64, 32, 16), and every position holds
    # class 0 with probability 1/2.
    epochs = 1500
    seqs = _arrangements(monkeypatch, 32, epochs, 8)
    assert (seqs.sum(axis=1) == 32).all()
    first = (seqs[:, :16] == 0).sum(axis=1)
    support = np.arange(0, 17)
    pmf = stats.hypergeom(64, 32, 16).pmf(support)
    observed = np.bincount(first, minlength=17)
    # pool the thin tails (expected < 5) so the chi-square approximation holds
    lo, hi = 4, 12
    obs = np.concatenate([[observed[:lo].sum()], observed[lo : hi + 1], [observed[hi + 1 :].sum()]])
    exp = epochs * np.concatenate([[pmf[:lo].sum()], pmf[lo : hi + 1], [pmf[hi + 1 :].sum()]])
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    zeros_per_position = (seqs == 0).sum(axis=0)
    assert stats.chisquare(zeros_per_position, np.full(64, epochs / 2)).pvalue > 1e-3


@pytest.mark.parametrize(
    "fn, args, kwargs, exc, words",
    [
        (class_balanced_plan, ([0, 1],), {"samples_per_class": "median"}, ValueError, ["samples_per_class", "median"]),
        (class_balanced_plan, ([0, 1],), {"samples_per_class": 0}, ValueError, ["samples_per_class", "0"]),
        (class_balanced_plan, ([0, 1],), {"samples_per_class": 2.5}, TypeError, ["samples_per_class", "2.5"]),
        (class_balanced_plan, ([0.0, 1.0],), {}, TypeError, ["labels", "float"]),
        (class_balanced_plan, ([0, -1],), {}, ValueError, ["labels", "-1"]),
        (class_balanced_plan, ([],), {}, ValueError, ["labels", "empty"]),
        (stratified_plan, ([0, 1], 3), {}, ValueError, ["num_samples", "3"]),
        (stratified_plan, ([0, 1], 0), {}, ValueError, ["num_samples", "0"]),
        (random_subset_plan, (0, 1), {}, ValueError, ["data_source", "0"]),
        (random_subset_plan, (5, 6), {}, ValueError, ["num_samples", "6", "(5)"]),
        (random_subset_plan, (object(), 1), {}, TypeError, ["data_source", "object"]),
    ],
)
def test_plan_bad_input(fn, args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        fn(*args, 0, 0, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_docstring_examples():
    import doctest

    results = [
        doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
        for module in (plans, balanced)  # the class-balanced plan moved to its own module
    ]
    assert sum(r.attempted for r in results) >= 8 and sum(r.failed for r in results) == 0
