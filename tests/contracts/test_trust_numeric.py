"""Bad numbers that used to crash or pass silently: stored per-sample weights (nan, inf, negative, not a number,
beyond float32), huge and uint64 labels, and weights whose float64 sum overflows or that are subnormal.

Expected values are exact: a skipped bad sample leaves the stream it would be without that sample; compacted
labels give the plan of the relabelled data; power-of-two rescaled weights give bit-for-bit the plan of the
unscaled weights.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import TensorDataset
from webdataset.handlers import ignore_and_continue

from tests._support.cli import run_cli as _run
from torch_pretrain_update import (
    ClassBalancedSampler,
    EntropySampler,
    StratifiedSampler,
    WeightedDataset,
    WeightedSampler,
    class_weights,
    class_weights_from_counts,
    sample_weights,
)
from torch_pretrain_update._checks import MAX_CLASSES, check_labels
from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.stages import BadSampleError, with_class_weights, with_entropy_weights
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.sampling import draws as weighted_plans
from torch_pretrain_update.sampling.balanced import class_balanced_plan
from torch_pretrain_update.sampling.draws import weighted_draws, weighted_sample_without_replacement
from torch_pretrain_update.sampling.entropy_plan import entropy_plan
from torch_pretrain_update.sampling.plans import stratified_plan

BIG = 10**12
U64 = 2**63 + 5  # stored in a uint64 array; wraps to a negative number when cast to int64


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write(directory, samples) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(str(directory), "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=1000, verbose=0) as sink:
        for s in samples:
            sink.write(s)
        n = sink.shard
    return [pattern % i for i in range(n)]


def _decoded(urls):
    return wds.WebDataset(urls, shardshuffle=False).map(safe_decode())


PROBS = [[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]
GOOD_WEIGHTS = ["1.5", None, "0.5", "2", "0.25"]  # index 1 is the bad one
LABELS5 = [0, 1, 1, 0, 1]


def _samples(bad: bytes | None, *, member: str = "weight.txt") -> list[dict]:
    out = []
    for i, (w, y, p) in enumerate(zip(GOOD_WEIGHTS, LABELS5, PROBS)):
        s = {"__key__": f"s{i}", "cls": str(y).encode(), "probs.npy": _npy(np.array(p, dtype=np.float32))}
        if w is not None:
            s["weight.txt"] = w.encode()
        elif bad is not None:
            s[member] = bad
        out.append(s)
    return out


def _stage(kind: str, **kw):
    if kind == "class_counts":
        return with_class_weights(num_classes=2, counts=[2, 3], combine="multiply", weight_key="weight.txt", **kw)
    if kind == "class_running":
        return with_class_weights(num_classes=2, combine="multiply", weight_key="weight.txt", **kw)
    return with_entropy_weights("probs.npy", combine="multiply", weight_key="weight.txt", window=3, **kw)


STAGES = ["class_counts", "class_running", "entropy"]
BAD_TEXT = [(b"nan", "nan"), (b"inf", "inf"), (b"-inf", "-inf"), (b"-2", "-2.0"), (b"abc", "'abc'")]


# ----------------------------------------------------------------------------------------------------------
# 9. stored per-sample weights
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STAGES)
@pytest.mark.parametrize("bad, shown", BAD_TEXT)
def test_stored_weight_bad_value_is_a_bad_sample_naming_key_url_value(tmp_path, kind, bad, shown):
    urls = _write(tmp_path, _samples(bad))
    with pytest.raises(BadSampleError) as info:
        list(_decoded(urls).compose(_stage(kind)))
    err = info.value
    assert err.sample_key == "s1" and err.url == urls[0] and err.field == "weight.txt"
    assert "s1" in str(err) and urls[0] in str(err) and "weight.txt" in str(err) and shown in str(err)


@pytest.mark.parametrize("kind", STAGES)
@pytest.mark.parametrize("bad, _shown", BAD_TEXT)
def test_skipped_stored_weight_leaves_the_stream_without_that_sample(tmp_path, kind, bad, _shown):
    urls = _write(tmp_path / "bad", _samples(bad))
    clean = _write(tmp_path / "clean", [s for s in _samples(None) if s["__key__"] != "s1"])
    stage = _stage(kind, handler=ignore_and_continue)
    out = list(_decoded(urls).compose(stage))
    ref_stage = _stage(kind)
    ref = list(_decoded(clean).compose(ref_stage))
    assert [s["__key__"] for s in out] == ["s0", "s2", "s3", "s4"]
    assert torch.equal(torch.stack([s["weight.txt"] for s in out]), torch.stack([s["weight.txt"] for s in ref]))
    assert stage.stats == {"seen": 5, "emitted": 4, "skipped": 1}
    # the bad sample changed no running estimate
    st, rst = stage.state_dict(), ref_stage.state_dict()
    for key in ("counts", "window_values", "window_sum"):
        if key in st:
            assert st[key] == rst[key], key


@pytest.mark.parametrize("kind", STAGES)
@pytest.mark.parametrize(
    "value", [np.array(np.nan), np.array(-1.0, dtype=np.float32), np.array([1.0, 2.0]), np.array(True)]
)
def test_stored_weight_arrays_nonfinite_negative_or_not_scalar_are_bad_samples(tmp_path, kind, value):
    samples = _samples(_npy(value), member="weight.npy")
    for s in samples:  # every sample stores its weight as .npy here
        if "weight.txt" in s:
            s["weight.npy"] = _npy(np.array(float(s.pop("weight.txt"))))
    urls = _write(tmp_path, samples)
    stage = {
        "class_counts": lambda: with_class_weights(num_classes=2, counts=[2, 3], combine="multiply",
                                                   weight_key="weight.npy"),
        "class_running": lambda: with_class_weights(num_classes=2, combine="multiply", weight_key="weight.npy"),
        "entropy": lambda: with_entropy_weights("probs.npy", combine="multiply", weight_key="weight.npy"),
    }[kind]()
    with pytest.raises(BadSampleError, match="s1") as info:
        list(_decoded(urls).compose(stage))
    assert info.value.field == "weight.npy"


def test_stored_weight_product_beyond_float32_is_a_bad_sample():
    stage = with_class_weights(num_classes=2, counts=[1, 3], combine="multiply")  # class 0 weight 2
    def samples():  # fresh dicts: a stage writes the weight into the sample
        return [{"__key__": "a", "cls": 0, "weight": 1.0}, {"__key__": "b", "cls": 0, "weight": 3e38}]

    with pytest.raises(BadSampleError, match=r"b.*float32"):
        list(stage(samples()))
    stage = with_class_weights(num_classes=2, counts=[1, 3], combine="multiply", handler=ignore_and_continue)
    out = list(stage(samples()))
    assert [s["__key__"] for s in out] == ["a"] and float(out[0]["weight"]) == 2.0


def test_entropy_stored_weight_product_beyond_float32_leaves_the_window_unchanged():
    def samples(big: bool):
        p = [[0.9, 0.1], [0.5, 0.5], [0.6, 0.4]]  # the second has the highest entropy: weight > 1
        return [{"__key__": str(i), "p": np.array(q), "weight": 3e38 if (big and i == 1) else 1.0}
                for i, q in enumerate(p) if big or i != 1]

    stage = with_entropy_weights("p", combine="multiply", handler=ignore_and_continue)
    out = list(stage(samples(True)))
    ref_stage = with_entropy_weights("p", combine="multiply")
    ref = list(ref_stage(samples(False)))
    assert [s["__key__"] for s in out] == ["0", "2"] and stage.stats["skipped"] == 1
    assert [float(s["weight"]) for s in out] == [float(s["weight"]) for s in ref]
    assert stage.state_dict()["window_values"] == ref_stage.state_dict()["window_values"]
    with pytest.raises(BadSampleError, match=r"'1'.*float32"):
        list(with_entropy_weights("p", combine="multiply")(samples(True)))


def test_stored_weight_plain_and_tensor_numbers_still_multiply():
    stage = with_class_weights(num_classes=2, counts=[1, 3], combine="multiply")  # weights [2, 2/3]
    samples = [{"cls": 0, "weight": 0.5}, {"cls": 0, "weight": torch.tensor([0.25])}, {"cls": 0, "weight": 3},
               {"cls": 0, "weight": np.float32(0.0)}, {"cls": 0, "weight": "1.5"}]
    assert [float(s["weight"]) for s in stage(samples)] == [1.0, 0.5, 6.0, 0.0, 3.0]


def test_weighted_dataset_refuses_weights_beyond_float32():
    ds = TensorDataset(torch.arange(3))
    with pytest.raises(ValueError, match=r"weights.*1e\+300.*index 1"):
        WeightedDataset(ds, torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64))
    lazy = WeightedDataset(ds, lambda i: 1e39 if i == 2 else 1.0)
    assert float(lazy[0][1]) == 1.0
    with pytest.raises(ValueError, match=r"weights\(2\).*1e\+39"):
        lazy[2]


# ----------------------------------------------------------------------------------------------------------
# 10. huge labels and uint64 labels
# ----------------------------------------------------------------------------------------------------------


def test_class_weights_refuse_a_huge_label_naming_it():
    with pytest.raises(ValueError, match=r"labels.*1000000000000.*index 2"):
        class_weights([0, 1, BIG])
    with pytest.raises(ValueError, match=r"num_classes.*1000000000000"):
        class_weights([0, 1, 1], num_classes=BIG)
    with pytest.raises(ValueError, match=r"labels.*< num_classes=3.*1000000000000"):
        class_weights([0, 1, BIG], num_classes=3)
    with pytest.raises(ValueError, match=str(MAX_CLASSES)):
        class_weights([MAX_CLASSES])
    assert check_labels([MAX_CLASSES - 1])[1] == MAX_CLASSES  # the bound itself is allowed (nothing allocated)


def test_class_weight_stage_bounds_num_classes():
    with pytest.raises(ValueError, match=r"num_classes must be <= 16777216; got 1000000000000"):
        with_class_weights(num_classes=BIG)


def test_sample_weights_group_by_distinct_labels():
    big = torch.tensor([7, BIG, BIG, 7, 3 * BIG])
    assert torch.equal(sample_weights(big), sample_weights(torch.tensor([0, 1, 1, 0, 2])))
    assert torch.equal(sample_weights(big, scheme="effective_number"),
                       sample_weights(torch.tensor([0, 1, 1, 0, 2]), scheme="effective_number"))
    with pytest.raises(ValueError, match=r"labels.*< num_classes=8.*1000000000000"):
        sample_weights(big, num_classes=8)


@pytest.mark.parametrize("as_torch", [False, True])
def test_uint64_labels_above_int64_max_are_reported_with_their_value(as_torch):
    arr = np.array([1, 0, U64], dtype=np.uint64)
    labels = torch.from_numpy(arr) if as_torch else arr
    with pytest.raises(ValueError, match=rf"labels.*{U64}.*index 2"):
        check_labels(labels)
    with pytest.raises(ValueError, match=str(U64)):
        sample_weights(labels)
    with pytest.raises(ValueError, match=str(U64)):
        stratified_plan(labels, 2, seed=0, epoch=0)
    # uint64 labels that fit are fine
    small = np.array([1, 0, 1], dtype=np.uint64)
    assert torch.equal(class_weights(torch.from_numpy(small) if as_torch else small), class_weights([1, 0, 1]))


def test_write_shards_refuses_a_huge_label_naming_the_sample(tmp_path):
    samples = [{"__key__": "a", "cls": 0}, {"__key__": "b", "cls": BIG}]
    with pytest.raises(ValueError, match=r"samples\[1\].*'b'.*label 1000000000000 must be < 16777216"):
        write_shards(samples, str(tmp_path / "t-%06d.tar"), label_key="cls")


def _compact(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels, return_inverse=True)[1]


BIG_LABELS = torch.tensor([BIG, 5, 5, 2 * BIG, BIG, 5, 2 * BIG, 5, 5, BIG, 2 * BIG, 5])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_plan_with_huge_labels_is_the_plan_of_the_relabelled_data(seed):
    for shuffle in (True, False):
        got = stratified_plan(BIG_LABELS, 6, seed=seed, epoch=1, shuffle=shuffle)
        assert torch.equal(got, stratified_plan(_compact(BIG_LABELS), 6, seed=seed, epoch=1, shuffle=shuffle))
    s = StratifiedSampler(BIG_LABELS, 6, seed=seed)
    s.set_epoch(1)
    assert list(s) == stratified_plan(_compact(BIG_LABELS), 6, seed=seed, epoch=1).tolist()
    assert s.quotas.tolist() == [3, 2, 1]  # classes 5, BIG, 2*BIG of sizes 6, 3, 3


def test_class_balanced_plan_with_huge_labels():
    labels = torch.tensor([BIG, BIG, 3, 3, 3, 3])
    plan = class_balanced_plan(labels, seed=0, epoch=0, samples_per_class=4, shuffle=False)
    assert plan.tolist() == [2, 3, 4, 5, 0, 0, 1, 1]
    shuffled = class_balanced_plan(labels, seed=0, epoch=0, samples_per_class=4)
    assert sorted(shuffled.tolist()) == [0, 0, 1, 1, 2, 3, 4, 5]
    s = ClassBalancedSampler(labels, samples_per_class=4, seed=0)
    assert list(s) == shuffled.tolist() and s.num_classes_present == 2


def test_entropy_plan_stratify_with_huge_labels():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5, 0.4, 0.05, 0.15, 0.95])
    got = entropy_plan(scores, 6, seed=0, epoch=0, stratify=BIG_LABELS, shuffle=False)
    assert torch.equal(got, entropy_plan(scores, 6, seed=0, epoch=0, stratify=_compact(BIG_LABELS), shuffle=False))


def test_entropy_sampler_importance_weights_with_huge_labels():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5, 0.4, 0.05, 0.15, 0.95], dtype=torch.float64)
    s = EntropySampler.from_scores(scores, 6, mode="proportional", replacement=True, stratify=BIG_LABELS, seed=0)
    idx = torch.arange(12)
    got = s.importance_weights(idx)
    # class c draws q_c times with probability w_i / W_c: p_i = q_c * w_i / W_c / 6, weight = 1 / (12 p_i)
    want = []
    quota = {5: 3, BIG: 2, 2 * BIG: 1}
    for i in range(12):
        c = int(BIG_LABELS[i])
        wc = float(scores[BIG_LABELS == c].sum())
        want.append(1.0 / (12 * quota[c] * float(scores[i]) / wc / 6))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)



def test_cli_weights_refuses_a_huge_label_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "l.npy", np.array([0, 1, BIG, 1], dtype=np.int64))
    code, _, err = _run(["weights", tmp_path / "l.npy", "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "1000000000000" in err and "row 2" in err
    code, _, err = _run(["weights", tmp_path / "l.npy", "--num-classes", BIG, "--no-progress"], capsys)
    assert code == 2 and "--num-classes" in err and "1000000000000" in err


@pytest.mark.parametrize("command", ["weights", "stratified", "balanced", "stratify"])
def test_cli_uint64_labels_above_int64_max_report_their_value(tmp_path, capsys, command):
    np.save(tmp_path / "l.npy", np.array([0, 1, U64, 1], dtype=np.uint64))
    np.save(tmp_path / "s.npy", np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    if command == "weights":
        argv = ["weights", tmp_path / "l.npy"]
    elif command == "stratify":
        argv = ["select", tmp_path / "s.npy", "--budget", 2, "--strategy", "entropy", "--stratify", "--labels",
                tmp_path / "l.npy", "-o", tmp_path / "k.npy"]
    else:
        argv = ["select", tmp_path / "s.npy", "--budget", 2, "--strategy", command, "--labels",
                tmp_path / "l.npy", "-o", tmp_path / "k.npy"]
    code, _, err = _run([*argv, "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(U64) in err and "row 2" in err
    assert not (tmp_path / "k.npy").exists()


def test_cli_select_with_huge_labels(tmp_path, capsys):
    labels = BIG_LABELS.numpy()
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5, 0.4, 0.05, 0.15, 0.95], dtype=np.float32)
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "s.npy", scores)
    compact = _compact(BIG_LABELS)
    expected = {
        "stratified": stratified_plan(compact, 6, seed=0, epoch=0, shuffle=False),
        "balanced": class_balanced_plan(BIG_LABELS, seed=0, epoch=0, samples_per_class=2, shuffle=False),
        "entropy": entropy_plan(torch.from_numpy(scores), 6, seed=0, epoch=0, stratify=compact, shuffle=False),
    }
    for strategy, want in expected.items():
        extra = ["--stratify"] if strategy == "entropy" else []
        code, _, err = _run(["select", tmp_path / "s.npy", "--budget", 6, "--strategy", strategy, "--labels",
                             tmp_path / "l.npy", *extra, "-o", tmp_path / "k.npy", "--no-progress"], capsys)
        assert code == 0, err
        assert np.load(tmp_path / "k.npy").tolist() == sorted(want.tolist()), strategy


# ----------------------------------------------------------------------------------------------------------
# 11. weights whose sum overflows, subnormal weights
# ----------------------------------------------------------------------------------------------------------


def _plan(weights, n, **kw):
    s = WeightedSampler(weights, n, seed=3, **kw)
    s.set_epoch(1)
    return list(s)


@pytest.mark.parametrize("scale", [2.0**1022, 2.0**-1074, 2.0**-1040])
def test_weighted_sampler_scale_free_for_sums_that_overflow_or_subnormal_weights(scale):
    base = torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    scaled = base * scale  # exact: the weights really are that large (sum 2**1024 = inf) or that small
    assert float(scaled[1]) == 2.0 * scale and float(scaled[0]) > 0
    assert _plan(scaled, 4000) == _plan(base, 4000)
    assert _plan(scaled, 3, replacement=False) == _plan(base, 3, replacement=False)


def test_weighted_sampler_1e308_weights_draw_each_index():
    plan = _plan(torch.tensor([1e308] * 3, dtype=torch.float64), 3000)
    counts = np.bincount(plan, minlength=3)
    assert all(900 < c < 1100 for c in counts), counts
    plan = _plan([1e308, 1e308, 1e308], 3000)  # a Python list of floats is float64, not float32 (inf)
    assert all(900 < c < 1100 for c in np.bincount(plan, minlength=3))


@pytest.mark.parametrize("scale", [2.0**1022, 2.0**-1074])
def test_without_replacement_scale_free(monkeypatch, scale):
    base = torch.ones(1000, dtype=torch.float64)
    base[::7] = 3.0
    scaled = base * scale
    for seed in range(3):
        want = weighted_sample_without_replacement(base, 10, seed=seed, epoch=0)
        assert torch.equal(weighted_sample_without_replacement(scaled, 10, seed=seed, epoch=0), want)
    monkeypatch.setattr(weighted_plans, "KEY_BLOCK", 64)  # the streamed two-pass path
    for seed in range(3):
        want = weighted_sample_without_replacement(base, 10, seed=seed, epoch=0)
        assert torch.equal(weighted_sample_without_replacement(scaled, 10, seed=seed, epoch=0), want)


@pytest.mark.parametrize("zero", [False, True])
def test_without_replacement_weights_spanning_more_than_float64_range(zero):
    # index 0 always first; then the 2e-320 weight before the 1e-320 one with probability 2/3 (E / w would be inf
    # for both and tie); a zero weight is never drawn
    w = torch.tensor([1.0, 1e-320, 0.0, 2e-320] if zero else [1.0, 1e-320, 2e-320], dtype=torch.float64)
    big = w.numel() - 1
    picks = [weighted_sample_without_replacement(w, 2, seed=s, epoch=0, shuffle=False).tolist() for s in range(300)]
    assert all(p[0] == 0 for p in picks)
    assert 170 < sum(p[1] == big for p in picks) < 230, sum(p[1] == big for p in picks)
    assert weighted_sample_without_replacement(w, 3, seed=0, epoch=0, shuffle=False).tolist() == [0, 1, big]


@pytest.mark.parametrize("k", [5, 400, 700, 900])
def test_without_replacement_log_keys_streamed_equal_exact_k_smallest(monkeypatch, k):
    monkeypatch.setattr(weighted_plans, "KEY_BLOCK", 64)  # 16 blocks: the streamed two-pass path
    monkeypatch.setattr(weighted_plans, "_KEY_SAMPLE", 32)
    w = torch.ones(1000, dtype=torch.float64)
    w[::3] = 1e-320  # 300 tiny weights (keys E / w overflow), 600 of 1, 100 zeros
    w[::10] = 0.0
    form = weighted_plans._KeyForm(w)
    assert form.log
    plan = weighted_sample_without_replacement(w, k, seed=1, epoch=0, shuffle=False)
    keys = torch.cat([weighted_plans._key_block(w, b, 1, 0, (), form) for b in range(16)])
    keys[w == 0] = math.inf
    assert plan.tolist() == np.sort(np.argsort(keys.numpy(), kind="stable")[:k]).tolist()
    assert int((w[plan] == 1.0).sum()) == min(k, 600)  # every weight-1 index before any tiny one


def test_weighted_draws_sum_overflow_matches_scaled_weights():
    big = torch.tensor([1e308, 0.5e308, 1e308, 0.0], dtype=torch.float64)
    ref = big * 2.0**-1024  # the same ratios, exactly (a power of two)
    assert torch.equal(weighted_draws(big, 1000, seed=0, epoch=0), weighted_draws(ref, 1000, seed=0, epoch=0))


def test_importance_weights_for_a_class_of_tiny_weights():
    scores = torch.tensor([1.0, 0.5, 1e-310, 2e-310], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    s = EntropySampler.from_scores(scores, 2, mode="proportional", replacement=True, stratify=labels, seed=0)
    # quotas [1, 1]; p_i = w_i / W_c / 2, weight = 1 / (4 p_i) = W_c / (2 w_i)
    want = torch.tensor([1.5 / 2.0, 1.5 / 1.0, 1.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(s.importance_weights(torch.arange(4)), want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("scheme", ["inverse", "sqrt_inverse", "effective_number", "power", "uniform"])
def test_class_weights_from_counts_scale_free_at_the_ends_of_float64(scheme):
    ref = class_weights_from_counts(torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64), scheme=scheme)
    big = class_weights_from_counts(torch.tensor([2.0**1022, 3 * 2.0**1022, 0.0], dtype=torch.float64),
                                    scheme=scheme)
    assert torch.isfinite(big).all()
    if scheme != "effective_number":  # the only scheme that depends on absolute counts
        assert torch.equal(big, ref)
        tiny = class_weights_from_counts(torch.tensor([2.0**-1070, 3 * 2.0**-1070, 0.0], dtype=torch.float64),
                                         scheme=scheme)
        assert torch.equal(tiny, ref)
    else:  # huge counts: beta**n = 0, raw = 1 - beta for both: uniform
        assert big.tolist() == [1.0, 1.0, 0.0]


def test_class_weights_from_counts_refuses_a_weight_beyond_float32():
    with pytest.raises(ValueError, match=r"counts.*class 0.*float32"):
        class_weights_from_counts(torch.tensor([1e-300, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("scheme, alpha", [("power", 0.0), ("power", 0.5), ("effective_number", 0.5),
                                           ("inverse", 0.5), ("sqrt_inverse", 0.5)])
def test_decayed_running_counts_through_subnormal_values_keep_true_weights(scheme, alpha):
    # class 0 seen once, then only class 1: its decayed count passes through subnormal values to 0
    m, beta = 0.5, 0.999
    stage = with_class_weights(num_classes=2, momentum=m, scheme=scheme, alpha=alpha, beta=beta)
    out = [float(s["weight"]) for s in stage([{"cls": 0}] + [{"cls": 1}] * 1100)]
    c = [0.0, 0.0]
    for i, y in enumerate([0] + [1] * 1100):
        c = [v * (1 - m) for v in c]
        c[y] += 1.0
        present = [v for v in c if v > 0]

        def mass(v):  # n * raw(n), in closed form
            if scheme == "inverse":
                return 1.0
            if scheme == "sqrt_inverse":
                return math.sqrt(v)
            if scheme == "power":
                return v**alpha
            x = -v * math.log(beta)  # n (1 - beta) / (1 - beta**n) = (1 - beta) / -log(beta) * x / (1 - e**-x)
            return (1 - beta) / -math.log(beta) * (1.0 if x < 1e-200 else x / -math.expm1(-x))

        want = mass(c[y]) / c[y] * sum(c) / sum(mass(v) for v in present)
        assert math.isclose(out[i], want, rel_tol=1e-6), (i, out[i], want)
    assert stage.current_weights()[1] == 1.0
