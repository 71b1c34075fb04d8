"""Target matching: hashed n-gram features, importance weights, domain-classifier ratios and the resampling draw.

References are independent: n-gram counts by a per-token Python loop over ``re.findall`` and ``hashlib.sha256``
(text) or Python-integer splitmix64 (token ids); log ratios by the smoothed-categorical formula in float64 numpy;
the draw against the package's samplers and against exact inclusion probabilities.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import torch_pretrain_update.scoring.domain as domain_mod
import torch_pretrain_update.scoring.ngrams as ngrams_mod
import torch_pretrain_update.scoring.target as target_mod
from tests._support.resume_harness import IndexDataset, check_resume
from torch_pretrain_update import (
    EntropySampler,
    WeightedSampler,
    domain_log_ratio,
    hashed_ngram_features,
    importance_resample,
    resampling_weights,
    target_log_ratio,
)

ROOT = Path(__file__).resolve().parents[2]

TEXTS = [
    "The cat sat on the mat. The cat!",
    "def f(x):\n    return x ** 2  # square",
    "Ünïcödé wörds, ñandú and ÉCOLE; 3.5% off -- café\u00a0au\u2028lait",
    "a  b\tc\n\nd... e?! (f) [g] {h}",
    "İstanbul straße ΣΟΦΊΑ ﬁne ½ ² ٣ 日本語テキスト",
    "one",
]


def _ref_text_counts(text, n, num_buckets):
    words = re.findall(r"\w+|[^\w\s]+", text.lower())
    counts = np.zeros(num_buckets, dtype=np.int64)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = " ".join(words[i : i + k])
            counts[int(hashlib.sha256(gram.encode("utf-8")).hexdigest(), 16) % num_buckets] += 1
    return counts


_MASK = (1 << 64) - 1


def _ref_mix(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _ref_id_counts(ids, n, num_buckets):
    counts = np.zeros(num_buckets, dtype=np.int64)
    h1 = [_ref_mix(int(i)) for i in ids]
    prev = h1
    for h in h1:
        counts[h % num_buckets] += 1
    for k in range(2, n + 1):
        cur = [_ref_mix((prev[i] * 0x100000001B3 + h1[i + k - 1]) & _MASK) for i in range(len(ids) - k + 1)]
        for h in cur:
            counts[h % num_buckets] += 1
        prev = cur
    return counts


def _dense(f):
    assert f.layout == torch.sparse_csr and f.values().dtype == torch.float32
    return f.to_dense().numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,num_buckets", [(1, 10_000), (2, 10_000), (2, 7), (3, 101)])
def test_text_features_match_reference(n, num_buckets):
    f = hashed_ngram_features(TEXTS, n=n, num_buckets=num_buckets)
    assert tuple(f.shape) == (len(TEXTS), num_buckets)
    ref = np.stack([_ref_text_counts(t, n, num_buckets) for t in TEXTS])
    assert np.array_equal(_dense(f), ref)


def test_text_features_batches_and_hash_collisions_are_exact(monkeypatch):
    ref = np.stack([_ref_text_counts(t, 2, 97) for t in TEXTS + ["ab ba ab", "ba"]])
    # many small batches: the vocabulary and its buckets carry over from batch to batch
    monkeypatch.setattr(ngrams_mod, "_BATCH_CHARS", 8)
    assert np.array_equal(_dense(hashed_ngram_features(TEXTS + ["ab ba ab", "ba"], num_buckets=97)), ref)
    monkeypatch.undo()
    # a degenerate token hash (the sum of the characters: "ab" == "ba"): the character check sees the collision
    # and the exact path gives the same features
    monkeypatch.setattr(ngrams_mod, "_P", 1)
    monkeypatch.setattr(ngrams_mod, "_P_INV", 1)
    monkeypatch.setattr(ngrams_mod, "_mix64", lambda x: x * np.uint64(0))
    codes = np.frombuffer("ab ba".encode("utf-32-le"), dtype=np.uint32)
    assert ngrams_mod._identify_tokens(codes, np.array([0, 3]), np.array([2, 5])) == (None, None)
    assert np.array_equal(_dense(hashed_ngram_features(TEXTS + ["ab ba ab", "ba"], num_buckets=97)), ref)


def test_text_features_match_data_selection_package():
    dsir = pytest.importorskip("data_selection.hashed_ngram_dsir")
    ascii_texts = [t for t in TEXTS if t.isascii()]
    f = hashed_ngram_features(ascii_texts, n=2, num_buckets=10_000)
    ref = np.stack([dsir.get_ngram_counts(t, n=2, num_buckets=10_000) for t in ascii_texts])
    assert np.array_equal(_dense(f), ref)


def test_features_are_the_same_in_another_process():
    code = (
        "import sys, torch; from torch_pretrain_update import hashed_ngram_features as h;"
        "f = h(['the cat sat', 'on the mat'], num_buckets=50); g = h([[5, 9, 5], [2**40, 3]], num_buckets=50);"
        "print(f.col_indices().tolist(), f.values().tolist(), g.col_indices().tolist(), g.values().tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    f = hashed_ngram_features(["the cat sat", "on the mat"], num_buckets=50)
    g = hashed_ngram_features([[5, 9, 5], [2**40, 3]], num_buckets=50)
    here = f"{f.col_indices().tolist()} {f.values().tolist()} {g.col_indices().tolist()} {g.values().tolist()}"
    assert out.stdout.strip() == here


@pytest.mark.parametrize("n", [1, 2, 3])
def test_token_id_features_match_reference(n):
    seqs = [[5, 9, 5, 5, 9], [0], [2**40, 3, 7, 2**40, 3], list(range(12))]
    ref = np.stack([_ref_id_counts(s, n, 31) for s in seqs])
    f = hashed_ngram_features(seqs, n=n, num_buckets=31)
    assert np.array_equal(_dense(f), ref)
    as_tensors = hashed_ngram_features([torch.tensor(s) for s in seqs], n=n, num_buckets=31)
    as_arrays = hashed_ngram_features([np.array(s, dtype=np.uint64) for s in seqs], n=n, num_buckets=31)
    assert np.array_equal(_dense(as_tensors), ref) and np.array_equal(_dense(as_arrays), ref)
    block = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    assert np.array_equal(_dense(hashed_ngram_features(block, n=n, num_buckets=31)),
                          np.stack([_ref_id_counts(r.tolist(), n, 31) for r in block]))


def test_feature_bad_input():
    with pytest.raises(ValueError, match="texts must not be empty"):
        hashed_ngram_features([])
    with pytest.raises(ValueError, match=r"texts\[2\] has no word or punctuation token"):
        hashed_ngram_features(["a", "b", "  \n\t "])
    with pytest.raises(ValueError, match=r"texts\[1\] has no word"):
        hashed_ngram_features(["a", ""])
    with pytest.raises(TypeError, match="not a single string"):
        hashed_ngram_features("the cat")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str like texts\[0\]"):
        hashed_ngram_features(["a", [1, 2]])
    with pytest.raises(TypeError, match=r"texts\[1\] is a str but texts\[0\] is token ids"):
        hashed_ngram_features([[1, 2], "a"])
    with pytest.raises(ValueError, match=r"texts\[0\] has a negative token id -100 at position 1"):
        hashed_ngram_features([[1, -100, 2]])
    with pytest.raises(ValueError, match=r"texts\[1\] has no token id"):
        hashed_ngram_features([[1], []])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str or a 1-D sequence of integer token ids"):
        hashed_ngram_features([[1.5, 2.0]])
    with pytest.raises(ValueError, match="n must be >= 1"):
        hashed_ngram_features(["a"], n=0)
    with pytest.raises(ValueError, match="num_buckets must be >= 1"):
        hashed_ngram_features(["a"], num_buckets=0)
    with pytest.raises(TypeError, match="texts must be a sequence"):
        hashed_ngram_features(5)


# ------------------------------------------------------------------------------------------------------
# log ratios
# ------------------------------------------------------------------------------------------------------


def _ref_log_ratio(raw, tgt, s):
    raw, tgt = np.asarray(raw, dtype=np.float64), np.atleast_2d(np.asarray(tgt, dtype=np.float64))
    b = raw.shape[1]
    cr, ct = raw.sum(axis=0), tgt.sum(axis=0)
    lp_t = np.log((ct / ct.sum() + s) / (1 + b * s))  # smoothed, renormalised categorical of each side
    lp_r = np.log((cr / cr.sum() + s) / (1 + b * s))
    return np.array([sum(raw[i, j] * (lp_t[j] - lp_r[j]) for j in range(b)) for i in range(raw.shape[0])])


@pytest.mark.parametrize("smoothing", [1e-8, 0.01])
def test_target_log_ratio_matches_formula(smoothing):
    raw = hashed_ngram_features(TEXTS, num_buckets=64)
    tgt = hashed_ngram_features(["the cat sat on the mat", "a cat, a mat"], num_buckets=64)
    want = _ref_log_ratio(_dense(raw), _dense(tgt), smoothing)
    got = target_log_ratio(raw, tgt, smoothing=smoothing)
    assert got.dtype == torch.float64 and got.shape == (len(TEXTS),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-10)
    # dense tensors, ndarrays, a summed target vector and COO give the same numbers
    for r, t in [(raw.to_dense(), tgt.to_dense()), (_dense(raw), _dense(tgt).sum(axis=0)),
                 (raw.to_dense().to_sparse(), tgt)]:
        np.testing.assert_allclose(target_log_ratio(r, t, smoothing=smoothing).numpy(), want, rtol=1e-12,
                                   atol=1e-10)
    if smoothing == 1e-8:  # the default
        assert torch.equal(target_log_ratio(raw, tgt), got)
    if smoothing == 0.01:  # (with 1e-8 the short document 5 wins: it has no n-gram the target lacks)
        assert int(got.argmax()) == 0  # the document about the cat on the mat


def test_target_log_ratio_bad_input():
    raw = hashed_ngram_features(["a b", "c d"], num_buckets=16)
    tgt = hashed_ngram_features(["a b"], num_buckets=16)
    with pytest.raises(ValueError, match="as many buckets as raw_features"):
        target_log_ratio(raw, hashed_ngram_features(["a b"], num_buckets=8))
    dense = raw.to_dense()
    dense[1] = 0
    with pytest.raises(ValueError, match="raw_features row 1 is empty"):
        target_log_ratio(dense, tgt)
    with pytest.raises(ValueError, match="target_features must have at least one positive count"):
        target_log_ratio(raw, torch.zeros(16))
    disjoint = torch.zeros(16)
    free = torch.nonzero(raw.to_dense().sum(0) == 0)[0, 0]
    disjoint[free] = 3
    with pytest.raises(ValueError, match="share no bucket with raw_features"):
        target_log_ratio(raw, disjoint)
    nan = raw.to_dense()
    nan[0, 0] = math.nan
    with pytest.raises(ValueError, match="raw_features must be finite"):
        target_log_ratio(nan, tgt)
    with pytest.raises(ValueError, match="target_features must be non-negative"):
        target_log_ratio(raw, -tgt.to_dense())
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        target_log_ratio(raw, tgt, smoothing=0.0)
    with pytest.raises(ValueError, match="raw_features must be 2-D"):
        target_log_ratio(torch.ones(16), tgt)


def test_importance_resampling_picks_the_target_domain():
    """A pool of two kinds of text; the target is a sample of one: the draw takes (almost only) that kind."""
    rng = np.random.default_rng(0)
    prose = "the of and a to in is was that for it with as his on be at by".split()
    code = "def return self if else for in import from class lambda none true yield".split()

    def doc(words):
        return " ".join(rng.choice(words, size=40))

    pool = [doc(prose) if i % 3 == 0 else doc(code + prose[:3]) for i in range(300)]
    target = [doc(prose) for _ in range(20)]
    lr = target_log_ratio(hashed_ngram_features(pool), hashed_ngram_features(target))
    picked = importance_resample(lr, 100, seed=0)
    assert sum(1 for i in picked.tolist() if i % 3 == 0) >= 95


# ------------------------------------------------------------------------------------------------------
# the draw
# ------------------------------------------------------------------------------------------------------


def _log_ratio(n=500, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 40.0


def test_importance_resample_is_the_weighted_sampler_draw():
    lr = _log_ratio()
    for seed, epoch in [(0, 0), (7, 3)]:
        picked = importance_resample(lr, 60, seed=seed, epoch=epoch)
        assert picked.dtype == torch.int64 and picked.numel() == 60 and bool((picked.diff() > 0).all())
        sampler = WeightedSampler(resampling_weights(lr, 60), 60, replacement=False, seed=seed, shuffle=False)
        sampler.set_epoch(epoch)
        assert list(sampler) == picked.tolist()
        # world-size independent: the ranks' shares are the same set for any number of ranks
        for world in (2, 3, 4):
            union = set()
            for rank in range(world):
                s = WeightedSampler(resampling_weights(lr, 60), 60, replacement=False, seed=seed,
                                    num_replicas=world, rank=rank)
                s.set_epoch(epoch)
                union |= set(s)
            assert union == set(picked.tolist())


def test_exclude_and_entropy_sampler_route():
    lr = _log_ratio(200, seed=1)
    dup = torch.zeros(200, dtype=torch.bool)
    dup[lr.argsort(descending=True)[:10]] = True  # the best-looking documents are duplicates
    picked = importance_resample(lr, 30, seed=4, exclude=dup)
    assert not bool(dup[picked].any())
    w = resampling_weights(lr, 30, exclude=dup)
    assert bool((w[dup] == 0).all()) and int((w > 0).sum()) >= 30
    s = EntropySampler.from_scores(w, 30, mode="proportional", exclude=dup, seed=4, shuffle=False)
    assert list(s) == picked.tolist()


def test_inclusion_probabilities_follow_the_weights():
    """One draw among three with weights 1 : 2 : 5, over 2000 seeds: frequencies within 5 standard deviations."""
    lr = torch.log(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)) + 900.0  # exp() alone would overflow
    hits = np.bincount([int(importance_resample(lr, 1, seed=s)[0]) for s in range(2000)], minlength=3)
    p = np.array([1, 2, 5]) / 8
    sd = np.sqrt(2000 * p * (1 - p))
    assert np.all(np.abs(hits - 2000 * p) < 5 * sd), hits


def test_extreme_log_ratios():
    lr = torch.tensor([-1e6, -1e4, 0.0, 1e4, 1e6, 5.0], dtype=torch.float64)
    w = resampling_weights(lr, 3)
    assert bool(torch.isfinite(w).all()) and w.tolist()[:2] == [0.0, 0.0]
    for seed in range(20):
        picked = set(importance_resample(lr, 3, seed=seed).tolist())
        assert {3, 4} <= picked and picked <= {2, 3, 4, 5}
    assert importance_resample(lr, 6).tolist() == [0, 1, 2, 3, 4, 5]  # all: weights stay positive enough


def test_resampling_bad_input():
    with pytest.raises(ValueError, match="log_ratio must be finite; got nan at index 1"):
        importance_resample(torch.tensor([0.0, math.nan]), 1)
    with pytest.raises(ValueError, match=r"num_samples must be <= the number of selectable indices \(1 of 3\)"):
        importance_resample(torch.zeros(3), 2, exclude=[0, 2])
    with pytest.raises(ValueError, match="log_ratio must be 1-D"):
        resampling_weights(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        resampling_weights(torch.zeros(3), 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_plan_resumes_exactly(workers):
    w = resampling_weights(_log_ratio(64, seed=2), 24)

    def make():
        sampler = WeightedSampler(w, 24, replacement=False, seed=3)
        loader = StatefulDataLoader(IndexDataset(64), sampler=sampler, batch_size=5, num_workers=workers)
        return loader, sampler.set_epoch

    assert check_resume(make, epochs=2, break_points=[0, 2, 5], break_epochs=[1]) == 3


# ------------------------------------------------------------------------------------------------------
# domain classifier
# ------------------------------------------------------------------------------------------------------


def _gaussians(n_raw, n_tgt, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    raw = torch.randn(n_raw, 3, generator=g, dtype=torch.float64)
    tgt = torch.randn(n_tgt, 3, generator=g, dtype=torch.float64) + mu
    true = raw @ mu - 0.5 * float(mu @ mu)  # log N(x; mu, I) - log N(x; 0, I)
    return raw, tgt, true


@pytest.mark.parametrize("n_tgt", [4000, 500])
def test_domain_log_ratio_recovers_gaussian_ratio(n_tgt):
    raw, tgt, true = _gaussians(4000, n_tgt)
    est = domain_log_ratio(raw.float(), tgt.float())
    assert est.dtype == torch.float64 and est.shape == (4000,)
    assert float(torch.corrcoef(torch.stack([est, true]))[0, 1]) > 0.99
    # the class prior log(n_target / n_raw) is removed: no offset (it would be -2.08 at n_tgt=500)
    assert abs(float((est - true).mean())) < 0.15
    assert float((est - true).abs().mean()) < 0.2


def test_domain_log_ratio_fit_subset_and_bad_input():
    raw, tgt, true = _gaussians(3000, 1000, seed=1)
    a = domain_log_ratio(raw, tgt, fit_size=800, seed=5)
    assert torch.equal(a, domain_log_ratio(raw, tgt, fit_size=800, seed=5))
    assert float(torch.corrcoef(torch.stack([a, true]))[0, 1]) > 0.98
    with pytest.raises(ValueError, match="raw embeddings' dimension 3; got 2"):
        domain_log_ratio(raw, tgt[:, :2])
    bad = raw.clone()
    bad[7, 1] = math.nan
    with pytest.raises(ValueError, match="raw_embeddings must be finite; row 7"):
        domain_log_ratio(bad, tgt)
    with pytest.raises(ValueError, match="target_embeddings must be a non-empty 2-D"):
        domain_log_ratio(raw, tgt[0])
    with pytest.raises(TypeError, match="raw_embeddings must be a floating-point"):
        domain_log_ratio(raw.long(), tgt)
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        domain_log_ratio(raw, tgt, l2=-1.0)


def test_docstring_examples_run():
    import doctest

    for module in (ngrams_mod, target_mod, domain_mod):
        result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
