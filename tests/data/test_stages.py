"""WebDataset stages on real shards: exact weights, one-pass balancing and selection, counted skips, resume."""

from __future__ import annotations

import io
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.stages import (
    BadSampleError,
    balance_classes,
    select_by_entropy,
    with_class_weights,
    with_entropy_weights,
)
from torch_pretrain_update.scoring.scores import compute_scores
from torch_pretrain_update.scoring.weights import WEIGHT_SCHEMES, class_weights, class_weights_from_counts

C = 4


def write_shards(directory, samples, maxcount: int) -> list[str]:
    """Write dict samples with webdataset.ShardWriter; return the shard paths in order."""
    pattern = os.path.join(str(directory), "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for s in samples:
            sink.write(s)
        n = sink.shard
    return [pattern % i for i in range(n)]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def teacher_shards(tmp_path_factory):
    """300 samples over 3 shards: label ``cls`` and teacher probabilities ``probs.npy`` (C classes)."""
    rng = np.random.default_rng(1)
    labels = rng.choice(C, size=300, p=[0.55, 0.25, 0.15, 0.05])
    logits = rng.normal(size=(300, C)) * rng.uniform(0.1, 4.0, size=(300, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    samples = [
        {"__key__": f"{i:05d}", "cls": int(labels[i]), "probs.npy": _npy(probs[i].astype(np.float32))}
        for i in range(300)
    ]
    urls = write_shards(tmp_path_factory.mktemp("teacher"), samples, maxcount=100)
    return urls, labels, probs.astype(np.float32)


def decoded(urls):
    return wds.WebDataset(urls, shardshuffle=False).map(safe_decode())


def np_entropy(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)


# ----------------------------------------------------------------------------------------------------------
# with_class_weights
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
def test_class_weights_with_known_counts_equal_class_weights(teacher_shards, scheme):
    urls, labels, _ = teacher_shards
    counts = np.bincount(labels, minlength=C)
    stage = with_class_weights(num_classes=C, scheme=scheme, counts=counts)
    out = list(decoded(urls).compose(stage))
    assert [s["__key__"] for s in out] == [f"{i:05d}" for i in range(300)]
    got = torch.stack([s["weight"] for s in out])
    assert got.dtype == torch.float32
    assert torch.equal(got, class_weights(torch.as_tensor(labels), num_classes=C, scheme=scheme)[labels])
    assert stage.stats == {"seen": 300, "emitted": 300, "skipped": 0}


def test_class_weights_in_a_data_pipeline_with_batching(teacher_shards):
    urls, labels, _ = teacher_shards
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        safe_decode(),
        with_class_weights(num_classes=C, counts=np.bincount(labels, minlength=C)),
        wds.to_tuple("cls", "weight"),
        wds.batched(64),
    )
    batches = list(pipe)
    w = torch.cat([b[1] for b in batches])
    assert w.dtype == torch.float32 and w.shape == (300,)
    assert torch.equal(w, class_weights(torch.as_tensor(labels), num_classes=C)[labels])


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
def test_running_class_weights_use_what_was_seen_so_far(teacher_shards, scheme):
    urls, labels, _ = teacher_shards
    stage = with_class_weights(num_classes=C, scheme=scheme)
    out = list(decoded(urls).compose(stage))
    for i, s in enumerate(out):
        counts = np.bincount(labels[: i + 1], minlength=C)  # this sample included
        want = class_weights_from_counts(counts, scheme=scheme)[labels[i]]
        torch.testing.assert_close(s["weight"], want, rtol=1e-6, atol=0)
    # after the whole stream the running weights are those of the whole label set
    torch.testing.assert_close(
        stage.current_weights(), class_weights(torch.as_tensor(labels), num_classes=C, scheme=scheme)
    )


def test_ema_class_weights_match_an_independent_recurrence():
    labels = np.random.default_rng(2).integers(0, 3, size=400)
    m = 0.05
    stage = with_class_weights(num_classes=3, momentum=m, scheme="sqrt_inverse")
    out = list(stage({"__key__": str(i), "cls": int(y)} for i, y in enumerate(labels)))
    c = np.zeros(3)
    for i, y in enumerate(labels):
        c = (1 - m) * c
        c[y] += 1
        present = c > 0
        raw = np.where(present, 1 / np.sqrt(np.where(present, c, 1)), 0)
        want = raw[y] * c.sum() / (c * raw).sum()
        assert math.isclose(float(out[i]["weight"]), want, rel_tol=1e-6), i


def test_weights_follow_a_class_mix_that_flips_half_way():
    rng = np.random.default_rng(3)
    old_mix, new_mix = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.2, 0.7])
    labels = np.concatenate([rng.choice(3, size=15000, p=old_mix), rng.choice(3, size=15000, p=new_mix)])
    samples = [{"__key__": f"{i}", "cls": int(y)} for i, y in enumerate(labels)]
    target = class_weights_from_counts(new_mix).numpy()  # inverse weights of the new mix: [2.33, 1.17, 0.33]

    ema = with_class_weights(num_classes=3, momentum=0.002)
    out = list(ema(dict(s) for s in samples))
    final = ema.current_weights().numpy()
    # EMA memory ~1/m = 500 samples: the old mix is forgotten ((1 - m)^15000 ~ 1e-13); the estimate of a 10%
    # class over ~1000 effective samples has ~10% relative noise, so 25% is > 2.5 sigma for the rarest class.
    np.testing.assert_allclose(final, target, rtol=0.25)
    # the weights attached to the last samples of each class are those weights too
    for c in range(3):
        last = next(float(s["weight"]) for s in reversed(out) if s["cls"] == c)
        assert abs(last - target[c]) <= 0.25 * target[c]

    # cumulative counts (momentum=None) average the two halves instead: they do not follow the change
    cum = with_class_weights(num_classes=3)
    list(cum(dict(s) for s in samples))
    cum_final = cum.current_weights().numpy()
    np.testing.assert_allclose(cum_final, class_weights(torch.as_tensor(labels)).numpy(), rtol=1e-6)
    assert np.max(np.abs(cum_final - target) / target) > 0.5


@pytest.mark.parametrize(
    ("sample", "pattern"),
    [
        ({"__key__": "a1", "__url__": "s.tar", "txt": "x"}, r"__key__='a1' \(__url__='s.tar'\), key 'cls': missing"),
        ({"__key__": "a2", "cls": 7}, r"__key__='a2'.*key 'cls': label 7 out of range \[0, num_classes=4\)"),
        ({"__key__": "a3", "cls": -1}, r"__key__='a3'.*label -1 out of range"),
        ({"__key__": "a4", "cls": 1.0}, r"__key__='a4'.*must be an integer; got 1.0"),
        ({"__key__": "a5", "cls": b"x1"}, r"__key__='a5'.*not an integer label"),
        ({"__key__": "a6", "cls": np.array([1, 2])}, r"__key__='a6'.*must be a scalar"),
        ({"__key__": "a7", "cls": torch.tensor(1.0)}, r"__key__='a7'.*integer dtype"),
        ({"__key__": "a8", "cls": True}, r"__key__='a8'.*must be an integer"),
    ],
)
def test_bad_labels_raise_named_errors(sample, pattern):
    with pytest.raises(BadSampleError, match=pattern):
        list(with_class_weights(num_classes=C)([sample]))
    with pytest.raises(BadSampleError, match=pattern):
        list(balance_classes(num_classes=C)([sample]))


def test_skipping_handler_counts_bad_samples_and_keeps_the_rest():
    good = [{"__key__": f"g{i}", "cls": i % C} for i in range(8)]
    bad = [{"__key__": "b0"}, {"__key__": "b1", "cls": 99}, {"__key__": "b2", "cls": "nope"}]
    stream = good[:3] + bad[:1] + good[3:6] + bad[1:] + good[6:]
    stage = with_class_weights(num_classes=C, handler=wds.ignore_and_continue)
    out = list(stage(stream))
    assert [s["__key__"] for s in out] == [s["__key__"] for s in good]
    assert stage.stats == {"seen": 11, "emitted": 8, "skipped": 3}
    assert stage.running_counts == [2.0, 2.0, 2.0, 2.0]  # skipped samples did not count
    # warn_and_continue warns (naming the sample) and counts the same way
    stage2 = with_class_weights(num_classes=C, handler=wds.warn_and_continue)
    with pytest.warns(UserWarning, match="b1"):
        assert len(list(stage2(good + bad[1:2]))) == 8
    assert stage2.stats["skipped"] == 1
    # ignore_and_stop ends the stream at the bad sample, which is counted
    stage3 = with_class_weights(num_classes=C, handler=wds.ignore_and_stop)
    assert len(list(stage3(stream))) == 3 and stage3.stats["skipped"] == 1


def test_known_counts_with_a_zero_count_class_refuses_that_label():
    stage = with_class_weights(num_classes=3, counts=[5, 0, 5])
    with pytest.raises(BadSampleError, match=r"__key__='z'.*label 1 has count 0"):
        list(stage([{"__key__": "z", "cls": 1}]))


def test_combine_multiply_composes_class_and_entropy_weights():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]], dtype=np.float32)
    samples = [{"__key__": str(i), "cls": c, "p": p[i]} for i, c in enumerate([0, 1, 1])]
    ent = with_entropy_weights("p")
    cw = with_class_weights(num_classes=2, counts=[1, 2], combine="multiply")
    out = list(cw(ent(samples)))
    h = np_entropy(p)
    want = h / np.cumsum(h) * np.arange(1, 4) * np.array([1.5, 0.75, 0.75])
    np.testing.assert_allclose([float(s["weight"]) for s in out], want, rtol=1e-5)


def test_class_weight_arguments_are_checked():
    with pytest.raises(ValueError, match="counts must have num_classes=4 entries; got 3"):
        with_class_weights(num_classes=4, counts=[1, 2, 3])
    with pytest.raises(ValueError, match="momentum applies to running counts only"):
        with_class_weights(num_classes=2, counts=[1, 2], momentum=0.1)
    with pytest.raises(ValueError, match=r"momentum must be > 0.0; got 0.0"):
        with_class_weights(num_classes=2, momentum=0.0)
    with pytest.raises(ValueError, match="scheme must be one of"):
        with_class_weights(num_classes=2, scheme="inverted")
    with pytest.raises(ValueError, match="counts must be non-negative"):
        with_class_weights(num_classes=2, counts=[1, -2])
    with pytest.raises(TypeError, match="num_classes must be an int"):
        with_class_weights(num_classes=2.0)
    with pytest.raises(TypeError, match="handler must be callable"):
        with_class_weights(num_classes=2, handler="skip")


# ----------------------------------------------------------------------------------------------------------
# state: resume exactly, JSON and torch.save round trips
# ----------------------------------------------------------------------------------------------------------


def _roundtrip(state):
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _keys_weights(out):
    return [(s["__key__"], float(s["weight"])) if "weight" in s else s["__key__"] for s in out]


@pytest.mark.parametrize(
    "make",
    [
        lambda: with_class_weights(num_classes=C, momentum=0.1),
        lambda: with_class_weights(num_classes=C, scheme="effective_number", beta=0.9),
        lambda: with_entropy_weights("probs.npy", window=16),
        lambda: balance_classes(num_classes=C, seed=5),
        lambda: balance_classes(num_classes=C, seed=5, repeat="poisson", rng="counter", momentum=0.05),
    ],
    ids=["class-ema", "class-effective", "entropy", "balance-even", "balance-poisson-counter"],
)
def test_resume_from_state_is_exact(teacher_shards, make):
    urls, _, _ = teacher_shards
    inputs = list(decoded(urls))
    copy = lambda: [dict(s) for s in inputs]  # noqa: E731 (stages write weights into the samples)

    # epoch 0 whole, then epoch 1: the unbroken reference
    ref_stage = make()
    ref_stage.set_epoch(0)
    list(ref_stage(copy()))
    ref_stage.set_epoch(1)
    unbroken = _keys_weights(ref_stage(copy()))
    partial_seen = False
    for k in [0, 1, 7, 50, 123, len(unbroken) - 1, len(unbroken)]:
        stage = make()
        stage.set_epoch(0)
        list(stage(copy()))
        stage.set_epoch(1)
        it = stage(copy())
        before = _keys_weights(itertools.islice(it, k))
        state = _roundtrip(stage.state_dict())
        partial_seen |= state["partial"] > 0
        del it, stage
        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # same epoch: the loaded position stays pending
        after = _keys_weights(resumed(copy()[state["position"] :]))
        assert before + after == unbroken, k
    if "balance" in make().__class__.__name__.lower():
        assert partial_seen  # at least one break point fell inside the repeats of an input


def test_set_epoch_to_another_epoch_discards_a_loaded_position():
    stage = balance_classes(num_classes=2, seed=1, rng="counter")
    samples = [{"cls": i % 2} for i in range(20)]
    it = stage(samples)
    next(it)
    state = stage.state_dict()
    fresh = balance_classes(num_classes=2, seed=1, rng="counter")
    fresh.load_state_dict(state)
    fresh.set_epoch(3)
    list(fresh(samples))
    assert fresh.position == 20  # the pass started at 0, not at the loaded position


def test_load_state_dict_checks_its_input():
    stage = with_class_weights(num_classes=3)
    with pytest.raises(ValueError, match=r"state is missing keys \['counts'"):
        stage.load_state_dict({"epoch": 0, "position": 0, "partial": 0, "stats": {}})
    bad = stage.state_dict() | {"counts": [1.0, -1.0, 0.0]}
    with pytest.raises(ValueError, match=r"state\['counts'\] must be 3 finite non-negative"):
        stage.load_state_dict(bad)
    other = balance_classes(num_classes=3, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"a BalanceStage with seed=1; this one has seed=2"):
        balance_classes(num_classes=3, seed=2).load_state_dict(other)
    del other["config"]  # a state saved before configs were recorded: the stage's own seed check still applies
    with pytest.raises(ValueError, match=r"state\['seed'\]=1 does not match this stage's seed=2"):
        balance_classes(num_classes=3, seed=2).load_state_dict(other)


# ----------------------------------------------------------------------------------------------------------
# with_entropy_weights
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 7, 1000])
def test_entropy_weights_are_normalised_over_the_running_window(teacher_shards, window):
    urls, _, probs = teacher_shards
    stage = with_entropy_weights("probs.npy", window=window)
    out = list(decoded(urls).compose(stage))
    h = np_entropy(probs)
    want = np.array([h[i] / h[max(0, i - window + 1) : i + 1].mean() for i in range(len(h))])
    np.testing.assert_allclose([float(s["weight"]) for s in out], want, rtol=2e-5)
    if window >= 300:
        assert abs(np.mean([float(s["weight"]) for s in out[-1:]]) - h[-1] / h.mean()) < 1e-4


def test_entropy_weights_from_logits_and_other_scores():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(50, 5)).astype(np.float32) * 3
    samples = [{"__key__": str(i), "z": z[i]} for i in range(50)]
    out = list(with_entropy_weights("z", from_logits=True, window=50)(samples))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = np_entropy(p)
    want = h / np.cumsum(h) * np.arange(1, 51)
    np.testing.assert_allclose([float(s["weight"]) for s in out], want, rtol=2e-5)
    out = list(with_entropy_weights("z", from_logits=True, score="margin", window=50)(samples))
    s = np.sort(p, axis=1)
    m = 1 - (s[:, -1] - s[:, -2])
    np.testing.assert_allclose([float(x["weight"]) for x in out], m / np.cumsum(m) * np.arange(1, 51), rtol=1e-4)


def test_entropy_weights_of_certain_samples_are_one():
    samples = [{"p": np.array([1.0, 0.0])}, {"p": np.array([0.0, 1.0])}, {"p": np.array([0.5, 0.5])}]
    w = [float(s["weight"]) for s in with_entropy_weights("p", window=2)(samples)]
    assert w[:2] == [1.0, 1.0] and w[2] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (np.array([0.5, np.nan], dtype=np.float32), r"must be finite"),
        (np.array([0.5, 0.7]), r"rows must sum to 1"),
        (np.array([-0.5, 1.5]), r"probabilities \(>= 0\)"),
        (np.ones((2, 2)) / 2, r"1-D vector.*got shape \(2, 2\)"),
        (np.array([1.0]), r"at least 2 columns"),
        ("0.5 0.5", r"expected a probability/logit vector"),
        (np.array(["a", "b"]), r"floating array"),
    ],
)
def test_bad_teacher_outputs_are_named_and_counted(value, pattern):
    sample = {"__key__": "t9", "__url__": "u.tar", "p": value}
    with pytest.raises(BadSampleError, match=r"__key__='t9' \(__url__='u.tar'\), key 'p': .*" + pattern):
        list(with_entropy_weights("p")([sample]))
    stage = with_entropy_weights("p", handler=wds.ignore_and_continue)
    good = {"__key__": "ok", "p": np.array([0.5, 0.5])}
    assert [s["__key__"] for s in stage([good, sample, dict(good)])] == ["ok", "ok"]
    assert stage.stats == {"seen": 3, "emitted": 2, "skipped": 1}


def test_non_finite_logits_are_refused():
    with pytest.raises(BadSampleError, match=r"__key__='q'.*finite logits"):
        list(with_entropy_weights("z", from_logits=True)([{"__key__": "q", "z": np.array([1.0, np.inf])}]))


# ----------------------------------------------------------------------------------------------------------
# balance_classes
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced():
    """A 1:10:100 stream of 55,500 samples as the decoded shards yield them (``__key__``, integer ``cls``).

    Built in memory: these tests measure the balancing statistics, which need the size; writing and decoding
    55,500 tar members cost 14 s. The stage over real shards is checked in the stream tests (balance stage
    resumed under StatefulDataLoader) and above with ``decoded(...)``.
    """
    labels = np.random.default_rng(5).permutation(np.repeat([0, 1, 2], [500, 5000, 50000]))
    return [{"__key__": f"{i:06d}", "cls": int(y)} for i, y in enumerate(labels)]


@pytest.mark.parametrize("repeat", ["even", "poisson"])
def test_balance_1_10_100_reaches_uniform_shares(imbalanced, repeat):
    stage = balance_classes(num_classes=3, seed=0, repeat=repeat)
    out = [s["cls"] for s in stage(imbalanced)]
    shares = np.bincount(out, minlength=3) / len(out)
    assert np.all(np.abs(shares - 1 / 3) <= 0.02), shares  # the bound
    # the output feedback keeps them much closer (pure plug-in rates drift by ~sqrt(2/500) ~ 6% relative)
    assert np.all(np.abs(shares - 1 / 3) <= 0.005), shares
    # about as many samples out as in: class 2 (50,000) keeps ~1/3 of 55,500 = 18,500, i.e. rejects ~31,500;
    # classes 0 and 1 are repeated to ~18,500 each: 18,000 + 13,500 = 31,500 extra copies
    assert 0.97 * len(imbalanced) <= len(out) <= 1.03 * len(imbalanced)
    assert stage.stats["seen"] == len(imbalanced) and stage.stats["emitted"] == len(out)
    assert stage.stats["rejected"] == pytest.approx(31500, rel=0.03)
    assert stage.stats["repeated"] == pytest.approx(31500, rel=0.03)


def test_balance_toward_a_given_target_and_is_deterministic(imbalanced):
    target = [0.2, 0.3, 0.5]
    run = lambda seed, xs: [  # noqa: E731
        (s["__key__"], s["cls"]) for s in balance_classes(num_classes=3, target=target, seed=seed)(xs)
    ]
    xs = imbalanced[:20000]
    a, b, c = run(7, xs), run(7, xs), run(8, xs)
    assert a == b and a != c
    shares = np.bincount([y for _, y in a], minlength=3) / len(a)
    assert np.all(np.abs(shares - np.array(target)) <= 0.02), shares


def test_balance_prior_counts_seed_the_estimates_without_bursts(imbalanced):
    xs = imbalanced[:20000]
    prior = [500, 5000, 50000]
    stage = balance_classes(num_classes=3, seed=2, prior_counts=prior)
    out = [(s["__key__"], s["cls"]) for s in stage(xs)]
    shares = np.bincount([y for _, y in out], minlength=3) / len(out)
    assert np.all(np.abs(shares - 1 / 3) <= 0.02), shares
    copies = np.unique([k for k, _ in out], return_counts=True)[1]
    r_max = (1 / 3) / (500 / 55500)  # ~37 copies for the rarest class; the feedback at most doubles it
    assert copies.max() <= 2 * r_max + 1
    # the same prior injected through the state (as a stream factory may do) gives the same stream
    injected = balance_classes(num_classes=3, seed=2)
    state = injected.state_dict()
    state["counts"] = prior
    injected.load_state_dict(state)
    assert [(s["__key__"], s["cls"]) for s in injected(xs)] == out
    with pytest.raises(ValueError, match="prior_counts must have num_classes=3 entries; got 2"):
        balance_classes(num_classes=3, prior_counts=[1, 2])


def test_balance_with_key_rng_does_not_depend_on_the_position():
    """rng='key': the draw of a sample is a function of (seed, epoch, __key__, __url__) only."""
    samples = [{"__key__": f"k{i}", "cls": 0} for i in range(200)]
    # a constant stream has share 1 for class 0: with target [0.5, 0.5], r = 0.5 for every sample
    # (correction=0: the output feedback would make a draw depend on what was emitted before)
    a = {s["__key__"] for s in balance_classes(num_classes=2, seed=3, correction=0)(samples)}
    b = {s["__key__"] for s in balance_classes(num_classes=2, seed=3, correction=0)(samples[100:] + samples[:100])}
    assert a == b and 70 < len(a) < 130
    stage = balance_classes(num_classes=2, seed=3, correction=0)
    stage.set_epoch(1)
    assert {s["__key__"] for s in stage(samples)} != a


def test_balance_target_zero_drops_a_class_and_max_repeats_caps():
    samples = [{"__key__": str(i), "cls": int(i % 10 == 0)} for i in range(1000)]
    st = balance_classes(num_classes=2, target=[1, 0], seed=0)
    out = list(st(samples))
    assert all(s["cls"] == 0 for s in out) and st.stats["rejected"] >= 100
    capped = balance_classes(num_classes=2, seed=0, max_repeats=2)
    counts = {}
    for s in capped(samples):
        counts[s["__key__"]] = counts.get(s["__key__"], 0) + 1
    assert max(counts.values()) == 2
    # repeats are distinct dict objects: a later stage may write into one without touching the others
    dup = [s for s in balance_classes(num_classes=2, seed=0)(samples) if s["cls"] == 1][:2]
    assert dup[0] is not dup[1]


def test_balance_arguments_are_checked():
    with pytest.raises(ValueError, match="target must have num_classes=3 entries; got 2"):
        balance_classes(num_classes=3, target=[1, 1])
    with pytest.raises(ValueError, match="target must have at least one positive entry"):
        balance_classes(num_classes=2, target=[0, 0])
    with pytest.raises(ValueError, match="repeat must be one of"):
        balance_classes(num_classes=2, repeat="binomial")
    with pytest.raises(ValueError, match="max_repeats must be >= 1; got 0"):
        balance_classes(num_classes=2, max_repeats=0)
    with pytest.raises(BadSampleError, match=r"key '__key__': missing"):
        list(balance_classes(num_classes=2)([{"cls": 0}]))


# ----------------------------------------------------------------------------------------------------------
# select_by_entropy
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 17, 299, 300, 500])
def test_topk_by_entropy_is_exact(teacher_shards, k):
    urls, _, probs = teacher_shards
    h = np_entropy(probs)
    order = np.lexsort((np.arange(len(h)), -h))  # descending entropy, earlier position first on ties
    if k < len(h):
        # float32 (stage) vs float64 (here) entropies must not reorder the boundary: it is well separated
        assert h[order[k - 1]] - h[order[k]] > 1e-5
    want = sorted(order[:k].tolist())
    stage = select_by_entropy(k, probs_key="probs.npy")
    got = [int(s["__key__"]) for s in decoded(urls).compose(stage)]
    assert got == want  # stream order
    by_score = [int(s["__key__"]) for s in select_by_entropy(k, probs_key="probs.npy", order="score")(decoded(urls))]
    assert by_score == order[:k].tolist()
    assert stage.stats["emitted"] == min(k, 300) and stage.stats["seen"] == 300


def test_topk_ties_are_broken_by_earlier_position():
    scores = np.random.default_rng(6).integers(0, 5, size=200).astype(float)  # many ties
    samples = [{"__key__": i, "s": scores[i]} for i in range(200)]
    for k in [1, 10, 45, 100]:
        got = [s["__key__"] for s in select_by_entropy(k, score_key="s", order="score")(samples)]
        assert got == np.lexsort((np.arange(200), -scores))[:k].tolist()


def _exact_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling without replacement proportional to w (which is what
    A-Res samples), by enumerating every ordered draw."""
    pi = np.zeros(len(w))
    for seq in itertools.permutations(range(len(w)), k):
        p, left = 1.0, w.sum()
        for i in seq:
            p *= w[i] / left
            left -= w[i]
        pi[list(seq)] += p
    return pi


def test_reservoir_inclusion_frequencies_match_theory():
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    k, repeats = 3, 20000
    samples = [{"__key__": i, "w": w[i]} for i in range(len(w))]
    hits = np.zeros(len(w))
    for seed in range(repeats):
        chosen = [s["__key__"] for s in select_by_entropy(k, score_key="w", mode="reservoir", seed=seed)(samples)]
        assert len(chosen) == k
        hits[chosen] += 1
    freq = hits / repeats
    pi = _exact_inclusion(w, k)
    assert pi.sum() == pytest.approx(k)
    # binomial standard error of each frequency; 5 sigma per item (6 items: false alarm < 1e-5)
    tol = 5 * np.sqrt(pi * (1 - pi) / repeats)
    assert np.all(np.abs(freq - pi) <= tol), (freq, pi, tol)
    # the test has power: the naive "inclusion proportional to w" answer is far outside the tolerance
    naive = np.minimum(1.0, k * w / w.sum())
    assert np.max(np.abs(naive - pi) - tol) > 0


def test_reservoir_is_seeded_and_with_key_rng_order_free(teacher_shards):
    urls, _, probs = teacher_shards
    inputs = list(decoded(urls))
    run = lambda seed, xs, **kw: [  # noqa: E731
        s["__key__"] for s in select_by_entropy(20, probs_key="probs.npy", mode="reservoir", seed=seed, **kw)(xs)
    ]
    assert run(1, inputs) == run(1, inputs) and run(1, inputs) != run(2, inputs)
    # with rng="key", the keys are a function of the sample, so the chosen set does not depend on the order
    a = set(run(1, inputs, rng="key"))
    b = set(run(1, inputs[::-1], rng="key"))
    assert a == b and len(a) == 20
    # probs_key reservoir uses the entropy as the weight: same choice as score_key with those scores
    h = compute_scores(probs, "entropy")
    scored = [{"__key__": s["__key__"], "s": float(h[i])} for i, s in enumerate(inputs)]
    assert run(4, inputs) == [
        s["__key__"] for s in select_by_entropy(20, score_key="s", mode="reservoir", seed=4)(scored)
    ]


def test_reservoir_zero_and_negative_weights():
    samples = [{"__key__": i, "s": float(i % 2)} for i in range(10)]  # 5 zero weights
    st = select_by_entropy(8, score_key="s", mode="reservoir")
    out = [s["__key__"] for s in st(samples)]
    assert out == [1, 3, 5, 7, 9] and st.stats["zero_weight"] == 5
    with pytest.raises(BadSampleError, match=r"__key__=3, key 's': reservoir weights must be >= 0; got -1.0"):
        list(select_by_entropy(2, score_key="s", mode="reservoir")([{"__key__": 3, "s": -1.0}]))
    st = select_by_entropy(2, score_key="s", handler=wds.ignore_and_continue)
    bad = [{"__key__": "n", "s": float("nan")}, {"__key__": "m"}, {"__key__": "a", "s": 1.0}]
    assert [s["__key__"] for s in st(bad)] == ["a"] and st.stats["skipped"] == 2


def test_select_resume_during_emission_is_exact():
    samples = [{"__key__": i, "s": float((i * 37) % 101)} for i in range(100)]
    unbroken = [s["__key__"] for s in select_by_entropy(10, score_key="s", mode="reservoir", seed=9)(samples)]
    for k in [0, 1, 5, 10]:
        st = select_by_entropy(10, score_key="s", mode="reservoir", seed=9)
        it = st(samples)
        before = [s["__key__"] for s in itertools.islice(it, k)]
        state = _roundtrip(st.state_dict())
        st2 = select_by_entropy(10, score_key="s", mode="reservoir", seed=9)
        st2.load_state_dict(state)
        after = [s["__key__"] for s in st2(samples)]  # a selection pass is fed again from the start
        assert before + after == unbroken
        if k:
            assert st2.stats["seen"] == 100 and st2.stats["emitted"] == 10


def test_select_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of probs_key and score_key"):
        select_by_entropy(3)
    with pytest.raises(ValueError, match="exactly one of probs_key and score_key"):
        select_by_entropy(3, probs_key="p", score_key="s")
    with pytest.raises(ValueError, match="k must be >= 1; got 0"):
        select_by_entropy(0, score_key="s")
    with pytest.raises(ValueError, match="mode must be one of"):
        select_by_entropy(3, score_key="s", mode="top")
    with pytest.raises(BadSampleError, match=r"a score must be a scalar; got shape \(2,\)"):
        list(select_by_entropy(1, score_key="s")([{"s": np.ones(2)}]))


def test_stages_pickle_with_their_state():
    """DataLoader workers (spawn) receive stages by pickling: the running state must travel with them."""
    import pickle

    samples = [{"__key__": str(i), "cls": i % 3, "p": np.array([0.2, 0.8])} for i in range(30)]
    for stage in [
        with_class_weights(num_classes=3, momentum=0.1),
        with_entropy_weights("p", window=4),
        balance_classes(num_classes=3, seed=1, prior_counts=[1, 2, 3]),
    ]:
        list(stage([dict(s) for s in samples[:20]]))
        clone = pickle.loads(pickle.dumps(stage))
        assert clone.state_dict() == stage.state_dict()
        a = _keys_weights(stage([dict(s) for s in samples[20:]]))
        b = _keys_weights(clone([dict(s) for s in samples[20:]]))
        assert a == b
