"""Text over streams and shards: target-matching weights as a WebDataset stage (``with_target_weights``),
near-duplicate filtering inside ``WeightedWebDataset``, and the pool-wide tools (``near_duplicate_mask``,
``importance_resample``) driving samplers over a ``ShardDataset``.

Real shards written with ``write_shards`` (text members under ``"txt"``), real ``StatefulDataLoader`` with 0 and
2 workers, states through JSON; every expected weight is recomputed in memory from the texts.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import check_resume
from torch_pretrain_update import (
    BadSampleError,
    NearDuplicateFilter,
    RandomSubsetSampler,
    ShardDataset,
    TargetWeightStage,
    WeightedSampler,
    WeightedWebDataset,
    bucket_log_ratio,
    document_log_ratio,
    hashed_ngram_features,
    importance_resample,
    near_duplicate_mask,
    resampling_weights,
    target_log_ratio,
    with_target_weights,
    write_shards,
)

pytestmark = pytest.mark.timeout(120)

N = 40
BUCKETS = 1024
SMOOTH = 0.01  # larger than the default: every document gets a weight that float32 can hold
PROSE = ("the river ran past old stone walls while children sang songs about summer rain and distant hills "
         "under a quiet morning sky near the village").split()
CODE = ("def return self import class for in if else none true false lambda yield print range len list dict "
        "value index result").split()
# planted duplicates, each in a later shard than its source (8 samples per shard): index -> source index
EXACT = {30: 2}  # a byte-for-byte copy
SPACING = {13: 9}  # the same text with other case and spacing (exact after normalisation)
NEAR = {21: 5}  # one word of a long text changed
PLANTED = {**EXACT, **SPACING, **NEAR}


def make_texts() -> list[str]:
    rng = np.random.default_rng(7)
    texts = []
    for i in range(N):
        words = CODE if i % 3 == 0 else PROSE
        texts.append(" ".join(rng.choice(words, size=int(rng.integers(40, 70))).tolist()) + f" doc{i}")
    for dst, src in EXACT.items():
        texts[dst] = texts[src]
    for dst, src in SPACING.items():
        texts[dst] = "  ".join(texts[src].upper().split())
    for dst, src in NEAR.items():
        words = texts[src].split()
        words[len(words) // 2] = "zebra"
        texts[dst] = " ".join(words)
    return texts


TARGET = ["def f(self): return self.value", "for index in range(len(result)): print(index)", "import list dict"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, list[str]]:
    texts = make_texts()
    samples = [{"__key__": f"d{i:03d}", "cls": i % 2, "txt": t} for i, t in enumerate(texts)]
    d = tmp_path_factory.mktemp("text")
    return write_shards(samples, os.path.join(str(d), "text-%06d.tar"), maxcount=8), texts


def expected_weights(texts: list[str]) -> torch.Tensor:
    """The documented weights, in memory: exp(lr - (logsumexp(lr) - log N)) of target_log_ratio, as float32."""
    lr = target_log_ratio(hashed_ngram_features(texts, num_buckets=BUCKETS),
                          hashed_ngram_features(TARGET, num_buckets=BUCKETS), smoothing=SMOOTH)
    ref = float(torch.logsumexp(lr, 0)) - math.log(len(texts))
    return torch.exp(lr - ref).float()


def stage(texts: list[str], **kw) -> TargetWeightStage:
    return with_target_weights(hashed_ngram_features(texts, num_buckets=BUCKETS),
                               hashed_ngram_features(TARGET, num_buckets=BUCKETS), smoothing=SMOOTH, **kw)


# ----------------------------------------------------------------------------------------- target-matching weights
def test_fitted_model_helpers_give_target_log_ratio_bit_for_bit(shards):
    _, texts = shards
    raw = hashed_ngram_features(texts, num_buckets=BUCKETS)
    tgt = hashed_ngram_features(TARGET, num_buckets=BUCKETS)
    table = bucket_log_ratio(raw, tgt)
    assert table.dtype == torch.float64 and tuple(table.shape) == (BUCKETS,)
    lr = target_log_ratio(raw, tgt)
    assert torch.equal(document_log_ratio(raw, table), lr)
    one = [float(document_log_ratio(hashed_ngram_features([t], num_buckets=BUCKETS), table)[0]) for t in texts]
    assert one == lr.tolist()
    with pytest.raises(ValueError, match=r"features must have as many buckets as bucket_log_ratio \(1024\); got 8"):
        document_log_ratio(torch.ones(2, 8), table)
    with pytest.raises(ValueError, match=r"features row 1 is empty"):
        document_log_ratio(torch.tensor([[1.0] * BUCKETS, [0.0] * BUCKETS]), table)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_target_weights_in_a_stream_equal_the_in_memory_weights_and_resume(shards, num_workers):
    man, texts = shards
    want = expected_weights(texts)
    assert float(want.min()) > 0 and float(want.min()) < 1e-6 < 10 < float(want.max())  # they really differ

    def make():
        # the stream's class weights go to "cw": the target weight is the stage's own key
        ds = WeightedWebDataset(None, manifest=man, num_classes=2, seed=3, shuffle_buffer=4, weight_key="cw",
                                stages=[stage(texts, weight_key="tw")])
        collate = lambda b: [(s["__index__"], s["tw"].dtype, float(s["tw"])) for s in b]  # noqa: E731
        return StatefulDataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate), ds.set_epoch

    loader, set_epoch = make()
    set_epoch(0)
    got = [x for batch in loader for x in batch]
    assert sorted(i for i, _, _ in got) == list(range(N))  # every sample once, weighted
    assert {dt for _, dt, _ in got} == {torch.float32}
    assert {i: w for i, _, w in got} == {i: float(want[i]) for i in range(N)}
    assert check_resume(make, epochs=2, break_points=[0, 3, 7] if num_workers else [0, 1, 5, 9, 10]) >= 6


def test_target_weights_combine_and_a_fitted_model(shards):
    _, texts = shards
    want = expected_weights(texts)
    out = list(stage(texts, combine="multiply")([{"txt": t, "weight": 2.0} for t in texts[:5]]))
    assert [float(s["weight"]) for s in out] == [float(torch.tensor(2 * float(want[i])).float()) for i in range(5)]
    # a fitted (B,) model weighs new text: reference 0 gives exp(lr), max_weight clips
    table = bucket_log_ratio(hashed_ngram_features(texts, num_buckets=BUCKETS),
                             hashed_ngram_features(TARGET, num_buckets=BUCKETS), smoothing=SMOOTH)
    fitted = with_target_weights(table, max_weight=10.0)
    new = ["print the value", "the river ran"]
    lr = document_log_ratio(hashed_ngram_features(new, num_buckets=BUCKETS), table)
    assert [float(s["weight"]) for s in fitted([{"txt": t} for t in new])] == [
        float(torch.tensor(min(math.exp(v), 10.0)).float()) for v in lr.tolist()]
    with pytest.raises(ValueError, match=r"target_features is required"):
        with_target_weights(hashed_ngram_features(texts, num_buckets=BUCKETS))
    with pytest.raises(ValueError, match=r"target_features must be None"):
        with_target_weights(table, hashed_ngram_features(TARGET, num_buckets=BUCKETS))
    with pytest.raises(ValueError, match=r"num_buckets must be the model's bucket count 1024; got 512"):
        with_target_weights(table, num_buckets=512)


def test_bad_text_goes_through_the_handler_and_is_counted(shards):
    _, texts = shards
    bad = [{"__key__": "a"}, {"__key__": "b", "txt": 3}, {"__key__": "c", "txt": "  \n "},
           {"__key__": "d", "txt": b"\xff\xfe"}, {"__key__": "e", "txt": ""}]
    good = [{"__key__": "g", "txt": texts[0]}, {"__key__": "h", "txt": texts[1].encode()}]
    s = stage(texts, handler=wds.ignore_and_continue)
    out = list(s([bad[0], good[0], *bad[1:], good[1]]))
    assert [x["__key__"] for x in out] == ["g", "h"]
    want = expected_weights(texts)
    assert [float(x["weight"]) for x in out] == [float(want[0]), float(want[1])]
    assert s.stats == {"seen": 7, "emitted": 2, "skipped": 5}
    messages = {"a": r"'txt'.*missing", "b": r"'txt'.*got int", "c": r"'txt'.*empty", "d": r"'txt'.*not UTF-8",
                "e": r"'txt'.*empty"}
    for sample in bad:
        with pytest.raises(BadSampleError, match=rf"__key__={sample['__key__']!r}.*{messages[sample['__key__']]}"):
            list(stage(texts)([sample]))


# ---------------------------------------------------------------------------------------------- de-duplication
def test_near_duplicate_filter_inside_the_stream_drops_exactly_the_planted_duplicates(shards):
    man, texts = shards
    drop = near_duplicate_mask(texts)
    assert set(np.flatnonzero(drop.numpy()).tolist()) == set(PLANTED)  # the pool-wide mask agrees
    urls = [os.path.join(os.path.dirname(man), f"text-{i:06d}.tar") for i in range(N // 8)]
    # one reader, shards in order, no fixed length: the stream is the kept samples, duplicates across shards too
    ds = WeightedWebDataset(urls, num_classes=2, shuffle=False, stages=[NearDuplicateFilter(key="txt")])
    keys, snapshots = [], []
    for s in ds:
        keys.append(s["__key__"])
        snapshots.append(ds.state_dict()["cursor"]["snapshot"]["stages"][0]["stats"])
    assert keys == [f"d{i:03d}" for i in range(N) if i not in PLANTED]
    # the filter's counts when the last shard started (after samples 0..31): all three planted duplicates
    assert snapshots[-1] == {"seen": 32, "kept": 29, "dropped_exact": 2, "dropped_near": 1}


def test_near_duplicate_filter_in_the_stream_resumes_exactly(shards):
    man, _ = shards
    urls = [os.path.join(os.path.dirname(man), f"text-{i:06d}.tar") for i in range(N // 8)]

    def make():
        ds = WeightedWebDataset(urls, num_classes=2, shuffle=False, stages=[NearDuplicateFilter(key="txt")])
        collate = lambda b: [s["__key__"] for s in b]  # noqa: E731
        return StatefulDataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate), ds.set_epoch

    assert check_resume(make, epochs=2, break_points=[0, 2, 4, 8]) >= 8


# ------------------------------------------------------------------------------------------------- shard dataset
def _indices(ds: ShardDataset, sampler, num_workers: int = 0) -> list[int]:
    loader = DataLoader(ds, sampler=sampler, batch_size=4, num_workers=num_workers,
                        collate_fn=lambda b: [(s["__index__"], s["txt"]) for s in b])
    return [x for batch in loader for x in batch]


def test_near_duplicate_mask_excludes_dropped_shard_samples(shards):
    man, texts = shards
    ds = ShardDataset(man)
    pool = [ds[i]["txt"] for i in range(len(ds))]
    assert pool == texts
    drop = near_duplicate_mask(pool)
    kept = [i for i in range(N) if i not in PLANTED]
    for seed in range(3):  # every kept index once, never a dropped one
        got = _indices(ds, RandomSubsetSampler(ds, len(kept), exclude=drop, seed=seed))
        assert sorted(i for i, _ in got) == kept and all(t == texts[i] for i, t in got)
    got = _indices(ds, RandomSubsetSampler(ds, 10, exclude=drop, seed=5), num_workers=2)
    assert len({i for i, _ in got}) == 10 and not {i for i, _ in got} & set(PLANTED)


def test_importance_resample_of_shard_texts_drives_a_weighted_sampler(shards):
    man, texts = shards
    ds = ShardDataset(man)
    lr = target_log_ratio(hashed_ngram_features([ds[i]["txt"] for i in range(len(ds))], num_buckets=BUCKETS),
                          hashed_ngram_features(TARGET, num_buckets=BUCKETS))
    k = 6
    drop = near_duplicate_mask(texts)
    for seed in range(3):
        selected = importance_resample(lr, k, seed=seed, exclude=drop)
        sampler = WeightedSampler(resampling_weights(lr, k, exclude=drop), k, replacement=False, seed=seed)
        got = _indices(ds, sampler)
        assert sorted(i for i, _ in got) == selected.tolist() and all(t == texts[i] for i, t in got)
        assert not set(selected.tolist()) & set(PLANTED)
    # the code-like documents (every third, and copies of one) are the ones that look like the target
    code_like = {i for i in range(N) if PLANTED.get(i, i) % 3 == 0}
    assert set(importance_resample(lr, k, seed=0).tolist()) <= code_like
