"""EntropySampler: exact top-k, power sampling, random_fraction/exclude/stratify, ranks, resume, updates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import check_resume
from tests.sampling.test_weighted_plans import numpy_topk
from tests.sampling.test_weighted_sampler import IndexDataset, check_split
from torch_pretrain_update import EntropySampler
from torch_pretrain_update.sampling.entropy_plan import entropy_plan, entropy_plan_parts
from torch_pretrain_update.sampling.plans import stratified_quotas

ALPHA = 1e-4  # seeded goodness-of-fit tests; see test_weighted_plans.ALPHA


def make_probs(n: int, c: int, seed: int) -> np.ndarray:
    """Softmax rows of varied sharpness, some one-hot (zero probabilities), some exact duplicates (ties)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * rng.uniform(0.1, 6.0, size=(n, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[:: max(1, n // 7)] = np.eye(c)[0]  # entropy exactly 0
    p[5::11] = p[3]  # exact ties with row 3
    return p.astype(np.float32)


def numpy_entropy(p: np.ndarray) -> np.ndarray:
    p64 = p.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p64 > 0, -p64 * np.log(p64), 0.0)
    return terms.sum(axis=1)


# ----- top-k ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 17, 100, 399, 400])
def test_topk_exact_set_against_numpy(k):
    probs = make_probs(400, 6, seed=k)
    s = EntropySampler(probs, k, seed=1)
    # the scores are the entropies (float32) of the rows...
    np.testing.assert_allclose(s.scores.numpy(), numpy_entropy(probs), atol=2e-6)
    # ...and the selection is exactly numpy's top-k of them, ties by lower index
    expected = numpy_topk(s.scores.numpy(), k).tolist()
    for epoch in range(3):
        s.set_epoch(epoch)
        got = list(s)
        assert sorted(got) == expected
    unshuffled = EntropySampler(probs, k, shuffle=False)
    assert list(unshuffled) == expected


def test_topk_ties_broken_by_lower_index():
    probs = np.tile(np.array([[0.5, 0.5], [0.9, 0.1]], dtype=np.float32), (10, 1))  # 10 rows each, tied
    s = EntropySampler(probs, 4, shuffle=False)
    assert list(s) == [0, 2, 4, 6]  # the four lowest indices of the high-entropy rows


def test_topk_order_reshuffled_each_epoch_same_set():
    s = EntropySampler(make_probs(300, 4, 0), 50, seed=5)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    assert sorted(a) == sorted(b) and a != b


def test_from_logits_and_other_scores():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 5)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    a = EntropySampler(torch.from_numpy(logits), 30, from_logits=True, shuffle=False)
    np.testing.assert_allclose(a.scores.numpy(), numpy_entropy(p), atol=1e-5)
    top2 = -np.sort(-p, axis=1)[:, :2]
    m = EntropySampler(p, 30, score="margin", shuffle=False)
    np.testing.assert_allclose(m.scores.numpy(), 1 - (top2[:, 0] - top2[:, 1]), atol=1e-6)
    assert list(m) == numpy_topk(m.scores.numpy(), 30).tolist()
    lc = EntropySampler(p, 30, score="least_confidence", shuffle=False)
    np.testing.assert_allclose(lc.scores.numpy(), 1 - top2[:, 0], atol=1e-6)


def test_from_scores_matches_direct():
    probs = make_probs(300, 5, 2)
    a = EntropySampler(probs, 40, seed=2)
    b = EntropySampler.from_scores(a.scores, 40, seed=2)
    assert list(a) == list(b)
    assert list(EntropySampler.from_scores([0.1, 0.9, 0.4, 0.8], 2, shuffle=False)) == [1, 3]
    neg = EntropySampler.from_scores(torch.tensor([-3.0, -1.0, -2.0]), 1, shuffle=False)  # top-k allows < 0
    assert list(neg) == [1]


# ----- proportional -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_proportional_with_replacement_matches_power_distribution(temperature):
    rng = np.random.default_rng(0)
    scores = rng.gamma(1.0, size=60)
    scores[[4, 40]] = 0.0
    n = 120_000
    s = EntropySampler.from_scores(scores, n, mode="proportional", replacement=True, temperature=temperature)
    counts = np.bincount(np.asarray(list(s)), minlength=60)
    assert counts[[4, 40]].sum() == 0
    w = scores ** (1.0 / temperature)
    pos = w > 0
    assert stats.chisquare(counts[pos], n * w[pos] / w[pos].sum()).pvalue > ALPHA


def test_proportional_without_replacement_first_pick_distribution_and_no_duplicates():
    scores = np.array([0.5, 1.0, 2.0, 0.0, 4.0, 0.5])
    firsts = np.zeros(6)
    epochs = 3000
    s = EntropySampler.from_scores(scores, 1, mode="proportional", temperature=0.5, seed=3)
    for e in range(epochs):
        s.set_epoch(e)
        firsts[list(s)[0]] += 1
    w = scores**2
    pos = w > 0
    assert firsts[3] == 0
    assert stats.chisquare(firsts[pos], epochs * w[pos] / w.sum()).pvalue > ALPHA
    big = EntropySampler.from_scores(np.random.default_rng(1).random(500), 300, mode="proportional")
    for e in range(3):
        big.set_epoch(e)
        got = list(big)
        assert len(got) == 300 and len(set(got)) == 300


# ----- random_fraction / exclude / stratify (issue 9) -------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.999, 1.0])
def test_random_fraction_parts(fraction):
    rng = np.random.default_rng(7)
    scores = rng.random(500).astype(np.float32)
    exclude = rng.choice(500, 60, replace=False)
    k = 101
    score_part, rand_part = entropy_plan_parts(
        scores, k, seed=2, epoch=4, random_fraction=fraction, exclude=exclude
    )
    n_rand = int(np.floor(fraction * k + 0.5))
    assert score_part.numel() == k - n_rand and rand_part.numel() == n_rand
    allp = torch.cat([score_part, rand_part]).tolist()
    assert len(set(allp)) == k  # no duplicates within or across the parts
    assert not set(allp) & set(exclude.tolist())
    pool = np.setdiff1d(np.arange(500), exclude)
    # the score part is exactly the top-(k - n_rand) of the remaining (non-excluded) scores
    expected = pool[numpy_topk(scores[pool], k - n_rand)] if k - n_rand else np.array([], dtype=np.int64)
    assert score_part.tolist() == expected.tolist()
    plan = entropy_plan(scores, k, seed=2, epoch=4, random_fraction=fraction, exclude=exclude)
    assert sorted(plan.tolist()) == sorted(allp)


def test_random_fraction_one_is_uniform_over_the_pool():
    rng = np.random.default_rng(0)
    n, k = 40, 10
    exclude = [3, 9, 27]
    pool = np.setdiff1d(np.arange(n), exclude)
    a_scores, b_scores = rng.random(n), rng.random(n) * 100
    counts = np.zeros(n)
    epochs = 2000
    for e in range(epochs):
        a = entropy_plan(a_scores, k, seed=1, epoch=e, random_fraction=1.0, exclude=exclude)
        b = entropy_plan(
            b_scores, k, seed=1, epoch=e, random_fraction=1.0, exclude=exclude, mode="proportional"
        )
        assert a.tolist() == b.tolist()  # the scores play no part
        assert len(set(a.tolist())) == k
        counts[a.numpy()] += 1
    assert counts[exclude].sum() == 0
    # uniform without replacement: every pool index is included with probability k / |pool|
    expected = np.full(pool.size, epochs * k / pool.size)
    assert stats.chisquare(counts[pool], expected).pvalue > ALPHA


def test_exclude_honoured_by_every_mode_and_errors():
    rng = np.random.default_rng(4)
    scores = rng.random(200)
    exclude = np.argsort(-scores)[:30]  # exclude the 30 best: top-k must look past them
    settings = [
        {"mode": "topk"},
        {"mode": "proportional"},
        {"mode": "proportional", "replacement": True},
        {"mode": "topk", "random_fraction": 0.5},
        {"mode": "proportional", "replacement": True, "random_fraction": 0.3},
    ]
    for kw in settings:
        s = EntropySampler.from_scores(scores, 120, exclude=exclude, seed=9, **kw)
        for e in range(3):
            s.set_epoch(e)
            assert not set(s) & set(exclude.tolist()), kw
    mask = np.zeros(200, dtype=bool)
    mask[exclude] = True
    a = EntropySampler.from_scores(scores, 50, exclude=exclude, shuffle=False)
    b = EntropySampler.from_scores(scores, 50, exclude=torch.from_numpy(mask), shuffle=False)
    assert list(a) == list(b)
    with pytest.raises(ValueError, match="exclude removes all 200 indices"):
        EntropySampler.from_scores(scores, 1, exclude=np.arange(200))
    with pytest.raises(
        ValueError, match=r"num_samples must be <= the number of selectable indices \(170 of 200"
    ):
        EntropySampler.from_scores(scores, 171, exclude=exclude)
    s = EntropySampler.from_scores(scores, 171, exclude=exclude, mode="proportional", replacement=True)
    assert len(list(s)) == 171  # with replacement more than the pool is fine


def test_stratify_quotas_and_within_class_topk():
    rng = np.random.default_rng(8)
    n = 600
    labels = rng.choice(4, size=n, p=[0.55, 0.3, 0.1, 0.05])
    scores = np.round(rng.random(n), 2).astype(np.float32)  # ties inside classes
    exclude = rng.choice(n, 50, replace=False)
    k = 90
    s = EntropySampler.from_scores(scores, k, stratify=labels, exclude=exclude, shuffle=False)
    got = np.array(list(s))
    pool = np.setdiff1d(np.arange(n), exclude)
    quotas = stratified_quotas(np.bincount(labels[pool], minlength=4), k).numpy()
    assert np.bincount(labels[got], minlength=4).tolist() == quotas.tolist()
    expected = []
    for c in range(4):
        members = pool[labels[pool] == c]
        expected += members[numpy_topk(scores[members], quotas[c])].tolist()
    assert got.tolist() == sorted(expected)
    # proportional within class: counts still exact per class, members only of their class
    p = EntropySampler.from_scores(scores + 0.01, k, stratify=labels, mode="proportional", seed=3)
    got_p = np.array(list(p))
    all_q = stratified_quotas(np.bincount(labels, minlength=4), k).numpy()
    assert np.bincount(labels[got_p], minlength=4).tolist() == all_q.tolist()
    assert len(set(got_p.tolist())) == k


def test_stratify_with_random_fraction_and_min_per_class():
    labels = np.array([0] * 95 + [1] * 5)
    scores = np.linspace(0, 1, 100)
    s = EntropySampler.from_scores(scores, 10, stratify=labels, min_per_class=2, random_fraction=0.2, seed=1)
    score_part, rand_part = entropy_plan_parts(
        scores, 10, seed=1, epoch=0, stratify=labels, min_per_class=2, random_fraction=0.2
    )
    assert np.bincount(labels[score_part.numpy()], minlength=2).tolist() == [6, 2]
    assert rand_part.numel() == 2
    assert sorted(s) == sorted(torch.cat([score_part, rand_part]).tolist())


# ----- ranks and resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "topk"},
        {"mode": "proportional", "replacement": True, "random_fraction": 0.3},
        {"mode": "proportional", "temperature": 0.5},
    ],
)
def test_plan_identical_for_every_world_size(kw):
    probs = make_probs(250, 5, 1)
    ref = EntropySampler(probs, 77, seed=4, **kw)
    ref.set_epoch(2)
    plan = ref.plan().tolist()
    assert plan == entropy_plan(ref.scores, 77, seed=4, epoch=2, **kw).tolist()
    for drop_last in (False, True):
        for world in (1, 2, 3, 4, 8):
            streams = []
            for r in range(world):
                s = EntropySampler(probs, 77, seed=4, num_replicas=world, rank=r, drop_last=drop_last, **kw)
                s.set_epoch(2)
                streams.append(list(s))
                assert s.rank_indices().tolist() == streams[-1]
            check_split(plan, streams, drop_last)


PROBS_A = make_probs(90, 4, 11)
PROBS_B = make_probs(90, 4, 12)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("mode", ["topk", "proportional"])
def test_resume_with_stateful_dataloader_after_update(num_workers, batch_size, mode):
    ds = IndexDataset(90)

    def make():
        s = EntropySampler(PROBS_A, 37, mode=mode, random_fraction=0.25, seed=6)

        def set_epoch(e: int) -> None:
            if e >= 1 and s.scores_version == 0:
                s.update(PROBS_B)  # the model re-scores the pool after epoch 0
            s.set_epoch(e)

        return StatefulDataLoader(ds, sampler=s, batch_size=batch_size, num_workers=num_workers), set_epoch

    points = None if num_workers == 0 else [0, 1, 4]
    assert check_resume(make, epochs=2, break_points=points) >= 6
    # the update really changed the plan, so the resume check of epoch 1 covers the updated scores
    s = EntropySampler(PROBS_A, 37, mode=mode, random_fraction=0.25, seed=6)
    s.set_epoch(1)
    before = list(s)
    s.update(PROBS_B)
    assert list(s) != before


def test_resume_without_reapplying_update_is_a_clear_error():
    s = EntropySampler(PROBS_A, 30, seed=0)
    s.update(PROBS_B)
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(s.state_dict()))
    assert state["scores_version"] == 1 and isinstance(state["plan_fingerprint"], str)
    fresh = EntropySampler(PROBS_A, 30, seed=0)
    with pytest.raises(ValueError, match=r"re-apply the update\(probs\)") as info:
        fresh.load_state_dict(state)
    assert "saved after 1 score update(s)" in str(info.value) and "after 0 update(s)" in str(info.value)
    fresh.update(PROBS_B)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert head + list(fresh) == list(s)
    other_settings = EntropySampler(PROBS_A, 30, seed=1)
    other_settings.update(PROBS_B)
    with pytest.raises(ValueError, match="an EntropySampler with seed=0; this one has seed=1"):
        other_settings.load_state_dict(state)
    with pytest.raises(ValueError, match="state is missing key 'plan_fingerprint'"):
        fresh.load_state_dict({"epoch": 0, "position": 0})


def test_update_checks_and_failed_update_changes_nothing():
    scores = np.linspace(0.1, 1, 50)
    s = EntropySampler.from_scores(scores, 10, mode="proportional", seed=0)
    plan = s.plan().tolist()
    fp = s.plan_fingerprint()
    with pytest.raises(ValueError, match="scores must have 50 rows"):
        s.update_scores(np.ones(49))
    with pytest.raises(
        ValueError, match="scores must be non-negative for mode='proportional'; got -1.0 at index 2"
    ):
        s.update_scores(np.r_[1.0, 1.0, -1.0, np.ones(47)])
    with pytest.raises(ValueError, match="only 3 selectable scores are positive"):
        s.update_scores(np.r_[np.ones(3), np.zeros(47)])
    assert s.plan().tolist() == plan and s.plan_fingerprint() == fp and s.scores_version == 0
    with pytest.raises(ValueError, match="probs must have 50 rows"):
        s.update(make_probs(51, 3, 0))
    s.update_scores(scores[::-1].copy())
    assert s.scores_version == 1 and s.plan_fingerprint() != fp


# ----- importance weights -----------------------------------------------------------------------------------


def test_importance_weights_formula_alignment_and_unbiasedness():
    rng = np.random.default_rng(5)
    scores = rng.random(80) + 0.05
    exclude = [0, 1, 2, 3]
    t = 0.7
    s = EntropySampler.from_scores(
        scores,
        20_000,
        mode="proportional",
        replacement=True,
        temperature=t,
        exclude=exclude,
        random_fraction=0.25,
        seed=2,
        num_replicas=3,
        rank=1,
    )
    pool = np.setdiff1d(np.arange(80), exclude)
    w = scores ** (1 / t)
    w[exclude] = 0
    n_rand = 5000
    p = (15_000 * w / w.sum() + n_rand * (w > 0) / pool.size) / 20_000  # independent float64 formula
    got = s.importance_weights(np.arange(4, 80))
    np.testing.assert_allclose(got.numpy(), 1 / (pool.size * p[4:]), rtol=1e-12)
    aligned = s.importance_weights()
    stream = list(s)
    assert aligned.numel() == len(s) == len(stream)
    np.testing.assert_allclose(aligned.numpy(), 1 / (pool.size * p[stream]), rtol=1e-12)
    # unbiased: the weighted mean of f over the draws estimates the pool mean of f
    f = np.sin(np.arange(80)) + 2
    full = EntropySampler.from_scores(
        scores,
        200_000,
        mode="proportional",
        replacement=True,
        temperature=t,
        exclude=exclude,
        random_fraction=0.25,
        seed=3,
    )
    draws = np.array(list(full))
    est = np.mean(full.importance_weights().numpy() * f[draws])
    assert abs(est - f[pool].mean()) < 0.01, (est, f[pool].mean())  # sd of the estimate ~ 0.002
    with pytest.raises(ValueError, match="index 2 .* can never be drawn"):
        s.importance_weights([5, 2])
    with pytest.raises(ValueError, match="needs mode='proportional'"):
        EntropySampler.from_scores(scores, 5).importance_weights()


def test_importance_weights_stratified():
    labels = np.array([0] * 30 + [1] * 10)
    scores = np.linspace(0.1, 2.0, 40)
    s = EntropySampler.from_scores(scores, 8, mode="proportional", replacement=True, stratify=labels)
    quotas = stratified_quotas(np.bincount(labels), 8).numpy()  # [6, 2]
    wc = np.array([scores[:30].sum(), scores[30:].sum()])
    p = quotas[labels] * scores / wc[labels] / 8
    np.testing.assert_allclose(s.importance_weights(np.arange(40)).numpy(), 1 / (40 * p), rtol=1e-12)


# ----- bad input --------------------------------------------------------------------------------------------


GOOD = make_probs(20, 3, 0)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"),
    [
        ((GOOD[:, :1].copy(), 5), {}, ValueError, "probs must have at least 2 columns"),
        ((GOOD[0].copy(), 5), {}, ValueError, "probs must be 2-D"),
        (
            (np.where(np.arange(60).reshape(20, 3) == 7, np.nan, GOOD).astype(np.float32), 5),
            {},
            ValueError,
            "probs must be finite; row 2",
        ),
        ((GOOD * 2, 5), {}, ValueError, "probs rows must sum to 1 .* row 0"),
        ((GOOD, 0), {}, ValueError, "num_samples must be >= 1; got 0"),
        ((GOOD, 21), {}, ValueError, r"num_samples must be <= the number of selectable indices \(20 of 20"),
        ((GOOD, 5), {"score": "gini"}, ValueError, "score must be one of .* got 'gini'"),
        ((GOOD, 5), {"mode": "best"}, ValueError, "mode must be one of 'topk', 'proportional'; got 'best'"),
        ((GOOD, 5), {"temperature": 0}, ValueError, "temperature must be > 0.0; got 0.0"),
        ((GOOD, 5), {"temperature": -1.0, "mode": "proportional"}, ValueError, "temperature must be > 0.0"),
        ((GOOD, 5), {"replacement": True}, ValueError, "replacement=True needs mode='proportional'"),
        ((GOOD, 5), {"random_fraction": 1.5}, ValueError, "random_fraction must be <= 1.0; got 1.5"),
        ((GOOD, 5), {"random_fraction": -0.1}, ValueError, "random_fraction must be >= 0.0; got -0.1"),
        ((GOOD, 5), {"exclude": [20]}, ValueError, r"exclude indices must be in \[0, 20\); got 20"),
        (
            (GOOD, 5),
            {"stratify": np.zeros(19, dtype=int)},
            ValueError,
            r"stratify must have one label per score",
        ),
        ((GOOD, 5), {"stratify": np.zeros(20)}, TypeError, "stratify must have an integer dtype"),
        ((GOOD, 5), {"stratify": -np.ones(20, dtype=int)}, ValueError, "stratify must be >= 0; got -1"),
        ((GOOD, 5), {"from_logits": "no"}, TypeError, "from_logits must be a bool; got 'no'"),
        ((GOOD, 5), {"rank": 1}, ValueError, r"rank must be in \[0, num_replicas=1\); got 1"),
        (([[0.5, 0.5]], 1), {}, TypeError, "probs must be a 2-D torch.Tensor or numpy.ndarray; got list"),
    ],
)
def test_bad_input(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        EntropySampler(*args, **kwargs)


def test_bad_scores_input():
    with pytest.raises(
        ValueError, match="scores must be non-negative for mode='proportional'; got -0.5 at index 1"
    ):
        EntropySampler.from_scores([1.0, -0.5, 2.0], 1, mode="proportional")
    with pytest.raises(ValueError, match="scores must be finite; got inf at index 2"):
        EntropySampler.from_scores([1.0, 0.5, float("inf")], 1)
    with pytest.raises(ValueError, match="scores must have a positive entry among the 3 selectable"):
        EntropySampler.from_scores([0.0, 0.0, 0.0], 1, mode="proportional")
    with pytest.raises(ValueError, match="only 1 selectable scores are positive"):
        EntropySampler.from_scores([0.0, 1.0, 0.0], 2, mode="proportional")
    with pytest.raises(TypeError, match="scores must be real numbers"):
        EntropySampler.from_scores(torch.tensor([True, False]), 1)


# ----- the fast validation / entropy path of scores.py (optimised for the issue-2 benchmark) -----


@pytest.mark.parametrize("fn_name", ["entropy", "margin", "least_confidence"])
def test_scores_fast_path_keeps_exact_errors(fn_name):
    import torch_pretrain_update.scoring.scores as sc

    fn = getattr(sc, fn_name)
    ok = np.full((6, 4), 0.25, dtype=np.float32)
    neg = ok.copy()
    neg[4] = [0.5, 0.5, 0.5, -0.5]  # sums to 1: only the sign is wrong
    with pytest.raises(ValueError, match=r"x must be probabilities \(>= 0\); row 4 has -0.5"):
        fn(neg)
    nan = ok.copy()
    nan[2, 1] = np.nan
    nan[5, 0] = -1.0  # a later negative row: the first error in row order is reported, as before
    with pytest.raises(ValueError, match="x must be finite; row 2"):
        fn(nan)
    near = ok.copy()
    near[1] = [0.25, 0.25, 0.25, 0.2508]  # sum 1.0008: within the 1e-3 tolerance
    fn(near)
    off = ok.copy()
    off[3] = [0.25, 0.25, 0.25, 0.2512]
    with pytest.raises(ValueError, match=r"x rows must sum to 1 \(tolerance 0.001\); row 3 sums to 1.0012"):
        fn(off)
    wide = np.full((3, 5000), 1 / 5000, dtype=np.float32)  # more columns than the float32 row-sum screen
    wide[2, :10] = 0.0
    wide[2, 10:] = 1 / 4990
    assert torch.isfinite(fn(wide)).all()
    wide[1, 0] = -1e-4
    with pytest.raises(ValueError, match="row 1 has"):
        fn(wide)


def test_entropy_fast_path_zero_probabilities_exact():
    import torch_pretrain_update.scoring.scores as sc

    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(sc.entropy(p).numpy(), numpy_entropy(p), atol=1e-7)
    assert sc.entropy(p)[0].item() == 0.0
