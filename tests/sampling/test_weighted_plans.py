"""Weighted draws, top-k and power weights, alone (no DataLoader), against independent numpy/scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from torch_pretrain_update.sampling import draws as wp
from torch_pretrain_update.sampling.draws import (
    CumulativeWeights,
    check_weights,
    exclude_mask,
    iter_weighted_draws,
    weighted_draw_chunk,
    weighted_draws,
    weighted_sample_without_replacement,
)
from torch_pretrain_update.sampling.entropy_plan import power_weights, topk_indices

# Goodness-of-fit tests use a fixed seed, so they are deterministic; the significance level 1e-4 means that a
# correct implementation would fail for only 1 in 10^4 seeds, while a wrong one (e.g. an off-by-one in the
# inverse CDF, which shifts whole weights between neighbours) gives p-values far below 1e-12 at these sizes.
ALPHA = 1e-4


def numpy_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: sort by (-score, index) and take k; returned ascending."""
    order = np.lexsort((np.arange(scores.size), -scores.astype(np.float64)))
    return np.sort(order[:k])


# ----- check_weights / exclude_mask -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "exc", "words"),
    [
        (torch.tensor([1.0, float("nan"), 2.0]), ValueError, ["weights", "nan", "index 1"]),
        (torch.tensor([1.0, 2.0, float("inf")]), ValueError, ["weights", "inf", "index 2"]),
        (torch.tensor([1.0, -0.5, 2.0]), ValueError, ["weights", "non-negative", "-0.5", "index 1"]),
        (torch.zeros(4), ValueError, ["weights", "positive", "zero"]),
        (torch.ones(2, 3), ValueError, ["weights", "1-D", "(2, 3)"]),
        (torch.ones(0), ValueError, ["weights", "empty"]),
        (torch.tensor([True, False]), TypeError, ["weights", "bool"]),
        ("abc", TypeError, ["weights", "str"]),
    ],
)
def test_check_weights_rejects_bad_input(bad, exc, words):
    with pytest.raises(exc) as info:
        check_weights(bad)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_check_weights_no_copy_and_conversions():
    w = torch.rand(10)
    assert check_weights(w).data_ptr() == w.data_ptr()  # no copy
    assert check_weights([1, 2, 3]).dtype == torch.float64
    assert check_weights(np.array([1, 0, 2], dtype=np.float16)).dtype == torch.float32


def test_exclude_mask_forms_and_errors():
    m = exclude_mask([1, 3, 3], 5)
    assert m.tolist() == [False, True, False, True, False]
    mask = torch.tensor([True, False, False, False, True])
    assert exclude_mask(mask, 5).tolist() == mask.tolist()
    assert exclude_mask([], 5).tolist() == [False] * 5
    assert exclude_mask(None, 5) is None
    with pytest.raises(ValueError, match=r"exclude indices must be in \[0, 5\); got 7 at position 1"):
        exclude_mask([0, 7], 5)
    with pytest.raises(ValueError, match="exclude indices must be in .* got -1"):
        exclude_mask([-1], 5)
    with pytest.raises(ValueError, match="exclude as a bool mask must have length 5; got length 4"):
        exclude_mask(torch.zeros(4, dtype=torch.bool), 5)
    with pytest.raises(TypeError, match="exclude must be integer indices or a bool mask"):
        exclude_mask([0.5], 5)


# ----- with replacement -------------------------------------------------------------------------------------


def test_cumulative_probabilities_match_weights():
    w = torch.tensor([0.0, 1.0, 0.0, 3.0, 4.0, 0.0])
    t = CumulativeWeights(w)
    assert t.total == 8.0
    assert t.last == 4  # trailing zero weight is not the last drawable index
    np.testing.assert_allclose(t.probabilities(torch.arange(6)).numpy(), (w / 8).numpy())


def test_with_replacement_matches_target_distribution():
    rng = np.random.default_rng(0)
    w = rng.gamma(0.5, size=200)
    w[[0, 17, 199]] = 0.0  # zero weights at the edges and inside are never drawn
    n = 400_000
    plan = weighted_draws(torch.from_numpy(w), n, seed=3, epoch=1)
    assert plan.dtype == torch.int64 and plan.numel() == n
    counts = np.bincount(plan.numpy(), minlength=200)
    assert counts[[0, 17, 199]].sum() == 0
    pos = w > 0
    expected = n * w[pos] / w[pos].sum()
    p = stats.chisquare(counts[pos], expected).pvalue
    assert p > ALPHA, p


def test_with_replacement_chunks_are_regenerable_and_resume_anywhere(monkeypatch):
    monkeypatch.setattr(wp, "DRAW_CHUNK", 100)
    w = torch.rand(1000) + 0.01
    n = 1234
    full = weighted_draws(w, n, seed=5, epoch=2)
    assert full.numel() == n
    for c in range(13):
        chunk = weighted_draw_chunk(w, n, c, seed=5, epoch=2)
        assert torch.equal(chunk, full[c * 100 : (c + 1) * 100])
    for start in (0, 1, 99, 100, 101, 777, 1233, 1234):
        rest = list(iter_weighted_draws(w, n, seed=5, epoch=2, start=start))
        got = torch.cat(rest) if rest else torch.empty(0, dtype=torch.int64)
        assert torch.equal(got, full[start:]), start
    # the chunk's stream depends on (seed, epoch): other epochs and seeds differ
    assert not torch.equal(weighted_draws(w, n, seed=5, epoch=3), full)
    assert not torch.equal(weighted_draws(w, n, seed=6, epoch=2), full)
    with pytest.raises(ValueError, match="chunk must be <= 12; got 13"):
        weighted_draw_chunk(w, n, 13, seed=5, epoch=2)


def test_with_replacement_unshuffled_chunks_are_sorted_same_multiset(monkeypatch):
    monkeypatch.setattr(wp, "DRAW_CHUNK", 64)
    w = torch.rand(50)
    a = weighted_draws(w, 300, seed=1, epoch=0, shuffle=True)
    b = weighted_draws(w, 300, seed=1, epoch=0, shuffle=False)
    for s in range(0, 300, 64):
        ca, cb = a[s : s + 64], b[s : s + 64]
        assert torch.equal(torch.sort(ca).values, cb)
    assert not torch.equal(a, b)


def test_float64_cumsum_beyond_float32_precision():
    # 2**25 equal weights: in float32 the cumulative sum stops growing at 2**24 (1 + 2**24 == 2**24), so a
    # float32 inverse CDF could never draw the upper half. The first chunk must reach it.
    n = 2**25
    t = CumulativeWeights(torch.ones(n, dtype=torch.float32))
    assert t.total == float(n) and t.last == n - 1
    first = weighted_draw_chunk(t, n, 0, seed=0, epoch=0)
    upper = (first >= 2**24).double().mean().item()
    assert abs(upper - 0.5) < 0.01, upper  # binomial sd of the fraction: 0.5 / sqrt(2**18) ~ 0.001


# ----- without replacement ----------------------------------------------------------------------------------


def test_without_replacement_distinct_and_zero_weights_never_chosen():
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 5.0, 1.0, 0.0, 3.0])
    for epoch in range(20):
        plan = weighted_sample_without_replacement(w, 5, seed=0, epoch=epoch)
        assert sorted(plan.tolist()) == [1, 2, 4, 5, 7]  # all 5 positive weights, no duplicates
    with pytest.raises(ValueError, match=r"num_samples must be <= the number of positive weights \(5 of 8\)"):
        weighted_sample_without_replacement(w, 6, seed=0, epoch=0)


def test_without_replacement_first_pick_and_inclusion_probabilities():
    # k = 1: P(i) = w_i / sum(w).  k = 2: successive sampling gives
    # P(i in S) = p_i + sum_{j != i} p_j * p_i / (1 - p_j); both computed here in float64.
    w = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    p = w / w.sum()
    epochs = 6000
    first = np.zeros(5)
    incl = np.zeros(5)
    for e in range(epochs):
        one = weighted_sample_without_replacement(torch.from_numpy(w), 1, seed=11, epoch=e)
        first[int(one)] += 1
        two = weighted_sample_without_replacement(torch.from_numpy(w), 2, seed=12, epoch=e)
        assert len(set(two.tolist())) == 2
        incl[two.numpy()] += 1
    assert stats.chisquare(first, epochs * p).pvalue > ALPHA
    pi = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)])
    assert math.isclose(pi.sum(), 2.0)
    # inclusion indicators are not independent across i; compare each with its binomial sd (5 sd bound)
    sd = np.sqrt(epochs * pi * (1 - pi))
    assert np.all(np.abs(incl - epochs * pi) < 5 * sd), (incl, epochs * pi)


@pytest.mark.parametrize("k", [1, 7, 500, 2500, 4990, 5000])
def test_without_replacement_streamed_blocks_equal_exact_k_smallest_keys(monkeypatch, k):
    # Force the multi-block path (KEY_BLOCK=256 -> 20 blocks) and compare with the k smallest keys computed
    # densely (stable argsort = ties by lower index).
    monkeypatch.setattr(wp, "KEY_BLOCK", 256)
    monkeypatch.setattr(wp, "_KEY_SAMPLE", 64)
    rng = np.random.default_rng(k)
    w = torch.from_numpy(rng.random(5000) ** 4)
    plan = weighted_sample_without_replacement(w, k, seed=4, epoch=9, shuffle=False)
    keys = torch.cat([wp._key_block(w, b, 4, 9, ()) for b in range(20)])
    ref = np.sort(np.argsort(keys.numpy(), kind="stable")[:k])
    assert plan.tolist() == ref.tolist()
    shuffled = weighted_sample_without_replacement(
        w, k, seed=4, epoch=9, shuffle=True, index_dtype=torch.int32
    )
    assert shuffled.dtype == torch.int32
    assert sorted(shuffled.tolist()) == ref.tolist()


def test_without_replacement_widening_fallback_is_exact(monkeypatch):
    # A tiny sample makes the cut-off estimate miss often; the retries must still give the exact answer.
    monkeypatch.setattr(wp, "KEY_BLOCK", 100)
    monkeypatch.setattr(wp, "_KEY_SAMPLE", 3)
    w = torch.linspace(0.0, 1.0, 1000) ** 8  # very uneven, one zero
    for k in (10, 333, 999):
        plan = weighted_sample_without_replacement(w, k, seed=0, epoch=1, shuffle=False)
        keys = torch.cat([wp._key_block(w, b, 0, 1, ()) for b in range(10)])
        ref = np.sort(np.argsort(keys.numpy(), kind="stable")[:k])
        assert plan.tolist() == ref.tolist(), k


# ----- top-k and power weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_topk_exact_with_ties_against_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    scores = np.round(rng.random(n) * 5) / 5  # only 6 distinct values: ties everywhere
    for k in sorted({1, 2, n // 3 + 1, n // 2 + 1, max(1, n - 1), n}):
        got = topk_indices(torch.from_numpy(scores).float(), k)
        assert got.tolist() == numpy_topk(scores, k).tolist(), (n, k)
    big_k = topk_indices(torch.from_numpy(rng.random(20_000)), 9000)  # the kthvalue path (k > 4096)
    assert big_k.numel() == 9000


@pytest.mark.parametrize("layout", ["ascending", "descending", "few_values", "constant"])
def test_topk_block_bound_path_exact(layout):
    # n >= 64 k takes the block-extreme bound; sorted inputs are its worst case (many candidates), constant
    # input is all ties; smallest-k (used for exponential keys) goes through the same code.
    n = 100_003  # not a multiple of the block count: the tail is outside every block
    base = {
        "ascending": np.arange(n, dtype=np.float64),
        "descending": -np.arange(n, dtype=np.float64),
        "few_values": np.random.default_rng(0).integers(0, 3, size=n).astype(np.float64),
        "constant": np.zeros(n),
    }[layout]
    for k in (1, 10, 1000):
        assert topk_indices(torch.from_numpy(base), k).tolist() == numpy_topk(base, k).tolist()
        smallest = wp._select_k(torch.from_numpy(base), k, largest=False)
        assert smallest.tolist() == np.sort(np.argsort(base, kind="stable")[:k]).tolist()


def test_topk_large_k_path_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 50, size=30_000).astype(np.float32)
    for k in (4097, 12_345, 29_999):
        assert topk_indices(torch.from_numpy(scores), k).tolist() == numpy_topk(scores, k).tolist()


def test_topk_exclude_and_errors():
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert topk_indices(s, 2, exclude=[0, 2]).tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"k must be <= the number of selectable scores \(3\); got 4"):
        topk_indices(s, 4, exclude=[0, 2])
    with pytest.raises(ValueError, match="scores must be finite; got nan at index 1"):
        topk_indices(torch.tensor([0.1, float("nan")]), 1)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_indices(s, 1.0)


def test_power_weights():
    s = torch.tensor([0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(power_weights(s, 0.5).numpy(), (np.array([0, 0.5, 1, 2]) / 2) ** 2)
    np.testing.assert_allclose(power_weights(s.double() * 1e300, 0.01).numpy()[-1], 1.0)  # no overflow
    with pytest.raises(ValueError, match="temperature must be > 0.0; got 0.0"):
        power_weights(s, 0.0)
    with pytest.raises(ValueError, match="scores must be non-negative for mode='proportional'; got -1.0"):
        power_weights(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="at least one positive entry"):
        power_weights(torch.zeros(3))
