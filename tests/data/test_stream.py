"""WeightedWebDataset on real shards: weights, rank x worker splits, determinism, resume, damaged data."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support import shard_fixtures as fx
from tests._support.resume_harness import check_resume
from torch_pretrain_update.data.manifest import read_manifest
from torch_pretrain_update.data.stages import with_class_weights
from torch_pretrain_update.data.stream import WeightedWebDataset, stream_stats
from torch_pretrain_update.scoring.weights import class_weights

pytestmark = pytest.mark.timeout(120)


def collate(batch):
    return {"key": [s["__key__"] for s in batch], "cls": [s["cls"] for s in batch],
            "weight": torch.stack([s["weight"] for s in batch])}


def keys_of(ds, num_workers=0, batch_size=8):
    loader = StatefulDataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    batches = [b["key"] for b in loader]
    return batches


def flat(batches):
    return [k for b in batches for k in b]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """203 samples in 9 shards of uneven size (20..30), 3 classes with frequencies ~1:2:3."""
    d = tmp_path_factory.mktemp("uneven")
    samples = fx.make_samples(203, num_classes=3, seed=1)
    man = fx.write(d, samples, maxcount=40, maxsize=20000)
    counts = [s.count for s in read_manifest(man).shards]
    assert len(counts) >= 8 and len(set(counts)) > 2
    return man, samples


# ---------------------------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("scheme", ["inverse", "sqrt_inverse", "effective_number"])
def test_weights_equal_class_weights_of_all_labels(uneven, scheme):
    man, samples = uneven
    labels = torch.tensor([s["cls"] for s in samples])
    ref = class_weights(labels, num_classes=3, scheme=scheme)
    by_key = {s["__key__"]: s for s in samples}
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, scheme=scheme, seed=5, shuffle_buffer=7)
    out = list(ds)
    assert sorted(s["__key__"] for s in out) == sorted(by_key)
    for s in out:
        src = by_key[s["__key__"]]
        assert s["cls"] == src["cls"] and np.array_equal(s["npy"], src["npy"]) and s["txt"] == src["txt"]
        assert s["weight"].dtype == torch.float32 and s["weight"].item() == ref[s["cls"]].item()
    if scheme == "inverse":  # independent float64 formula: w_c = N / (C * n_c)
        n = np.bincount(labels.numpy(), minlength=3).astype(np.float64)
        for c in range(3):
            w = [s["weight"].item() for s in out if s["cls"] == c]
            np.testing.assert_allclose(w, 203 / (3 * n[c]), rtol=1e-6)


def test_online_weights_without_manifest_follow_the_stage(uneven):
    man, samples = uneven
    urls = read_manifest(man).urls
    ds = WeightedWebDataset(urls, num_classes=3, shuffle=False, momentum=0.05)
    out = list(ds)
    stage = with_class_weights(num_classes=3, momentum=0.05)
    ref = list(stage({"cls": s["cls"], "__key__": s["__key__"]} for s in out))
    assert [s["weight"].item() for s in out] == [r["weight"].item() for r in ref]
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]  # unshuffled: written order


# ---------------------------------------------------------------------------------------------------------------
# splitting


@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 3)])
def test_two_ranks_two_workers_every_sample_once_equal_counts(uneven, seed, epoch):
    man, samples = uneven
    all_keys = sorted(s["__key__"] for s in samples)
    W, N = 2, 203
    L = -(-N // W)
    per_rank, positions = [], []
    for r in range(W):
        def make(r=r):
            ds = WeightedWebDataset(None, manifest=man, num_classes=3, seed=seed, rank=r, num_replicas=W,
                                    shuffle_buffer=10)
            ds.set_epoch(epoch)
            return ds
        b2 = keys_of(make(), num_workers=2)
        assert b2 == keys_of(make(), num_workers=2)  # same seed and epoch: same stream
        b0 = keys_of(make(), num_workers=0)
        assert len(flat(b2)) == L and len(b2) == 14  # 51 samples per worker -> 7 batches of <= 8 each
        # num_workers does not change the rank's samples, nor their sequence in position order: DataLoader takes
        # batches round-robin from worker 0 (first half of the range) and worker 1 (second half).
        assert sorted(flat(b2)) == sorted(flat(b0))
        assert flat(b2[0::2]) + flat(b2[1::2]) == flat(b0)
        assert make().batches_per_rank(8, num_workers=2) == len(b2)
        per_rank.append(flat(b2))
        positions.append(flat(b0))
    assert [len(k) for k in per_rank] == [L, L]
    c = Counter(k for keys in per_rank for k in keys)
    assert sorted(c) == all_keys
    # padding (W * L - N = 1 sample) repeats the first sample of the epoch order, like DistributedSampler
    assert [k for k, n in c.items() if n > 1] == [positions[0][0]] and max(c.values()) == 2
    assert sum(c.values()) - N == W * L - N


def test_drop_last_and_explicit_length_in_sample_split(uneven):
    man, samples = uneven
    full = [s["__key__"] for s in WeightedWebDataset(None, manifest=man, num_classes=3, seed=2)]  # epoch order
    ranks = [[s["__key__"] for s in WeightedWebDataset(None, manifest=man, num_classes=3, seed=2, rank=r,
                                                        num_replicas=2, drop_last=True)] for r in range(2)]
    assert ranks[0] + ranks[1] == full[:202]  # contiguous ranges of the epoch order; the last sample dropped
    ranks = [[s["__key__"] for s in WeightedWebDataset(None, manifest=man, num_classes=3, seed=2, rank=r,
                                                        num_replicas=2, samples_per_rank=150)] for r in range(2)]
    assert ranks[0] == full[:150] and ranks[1] == full[150:] + full[:97]  # wraps around: 97 padding repeats


def test_epochs_reshuffle_and_shuffle_false_keeps_written_order(uneven):
    man, samples = uneven
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, seed=0)
    e0 = [s["__key__"] for s in ds]
    ds.set_epoch(1)
    e1 = [s["__key__"] for s in ds]
    ds.set_epoch(0)
    assert [s["__key__"] for s in ds] == e0
    assert e0 != e1 and sorted(e0) == sorted(e1)
    plain = WeightedWebDataset(None, manifest=man, num_classes=3, shuffle=False)
    assert [s["__key__"] for s in plain] == [s["__key__"] for s in samples]


def test_set_epoch_reaches_persistent_workers(uneven):
    man, _ = uneven
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, seed=6)
    persistent = StatefulDataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True, collate_fn=collate)
    fresh = WeightedWebDataset(None, manifest=man, num_classes=3, seed=6)
    epochs = []
    for e in range(3):
        ds.set_epoch(e)
        fresh.set_epoch(e)
        got = [b["key"] for b in persistent]
        assert got == keys_of(fresh, num_workers=2)
        epochs.append(got)
    assert epochs[0] != epochs[1] != epochs[2]
    clone = pickle.loads(pickle.dumps(ds))  # outside a worker start the epoch travels as a plain int
    assert clone.epoch == 2 and [s["__key__"] for s in clone] == [s["__key__"] for s in ds]
    clone.set_epoch(0)
    assert ds.epoch == 2


def test_shard_split_without_manifest(uneven):
    man, samples = uneven
    urls = read_manifest(man).urls
    with pytest.warns(UserWarning, match="DDP can hang"):
        WeightedWebDataset(urls, num_classes=3, rank=0, num_replicas=2)
    got = []
    for r in range(2):
        with pytest.warns(UserWarning):
            ds = WeightedWebDataset(urls, num_classes=3, rank=r, num_replicas=2, seed=3)
        assert ds.batches_per_rank(8) is None
        got.append(flat(keys_of(ds, num_workers=2)))
    assert sorted(got[0] + got[1]) == sorted(s["__key__"] for s in samples)  # exactly once, natural lengths
    # a fixed length per rank (with_epoch style): every rank yields exactly samples_per_rank
    fixed = []
    for r in range(2):
        ds = WeightedWebDataset(urls, num_classes=3, rank=r, num_replicas=2, seed=3, samples_per_rank=95)
        b = keys_of(ds, num_workers=2)
        assert len(flat(b)) == 95 and len(b) == ds.batches_per_rank(8, num_workers=2) == 12
        fixed.append(flat(b))
    assert len(set(fixed[0]) & set(fixed[1])) == 0
    ds = WeightedWebDataset(urls, num_classes=3, seed=3, samples_per_rank=250)  # more than the data: repeats
    out = [s["__key__"] for s in ds]
    assert len(out) == 250 and ds.stats["padded_samples"] == 47 and out[203:] == out[:47]


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    man = fx.write(tmp_path, fx.make_samples(30, vary=False), maxcount=10)  # 3 shards
    urls = read_manifest(man).urls
    # split="shards" reads whole shards: too few is an error naming how many are needed
    with pytest.raises(ValueError, match=r"3 shard\(s\) for num_replicas=4 ranks; split='shards' needs at least"):
        WeightedWebDataset(urls, num_classes=3, rank=0, num_replicas=4, samples_per_rank=5)
    ds = WeightedWebDataset(urls, num_classes=3, rank=0, num_replicas=2, samples_per_rank=15)
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 DataLoader worker\(s\); need at least 4 "
                                         r"with split='shards'.*pass a manifest"):
        keys_of(ds, num_workers=2)
    assert len(flat(keys_of(ds, num_workers=1))) == 15
    # with a manifest (split="samples") readers split within shards: 4 ranks, or 2 ranks x 2 workers, over 3 shards
    keys = [s["__key__"] for r in range(4)
            for s in WeightedWebDataset(None, manifest=man, num_classes=3, rank=r, num_replicas=4, seed=1)]
    assert len(keys) == 32 and sorted(set(keys)) == [f"s{i:05d}" for i in range(30)]  # 2 padding repeats
    keys = [k for r in range(2) for k in flat(keys_of(
        WeightedWebDataset(None, manifest=man, num_classes=3, rank=r, num_replicas=2, seed=1), num_workers=2))]
    assert sorted(keys) == [f"s{i:05d}" for i in range(30)]


# ---------------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_exact_with_stateful_dataloader(uneven, num_workers):
    man, _ = uneven

    def make():
        ds = WeightedWebDataset(None, manifest=man, num_classes=3, seed=11, rank=1, num_replicas=2, shuffle_buffer=9)
        return StatefulDataLoader(ds, batch_size=16, num_workers=num_workers, collate_fn=collate), ds.set_epoch

    bp = None if num_workers == 0 else [0, 1, 3, 6, 7]
    assert check_resume(make, epochs=2, break_points=bp) >= 10


@pytest.mark.parametrize(
    "options",
    [
        {"balance": True},  # stateful balancing stage (known counts as prior)
        {"manifest": None, "momentum": 0.1, "samples_per_rank": 60, "balance": True},  # online estimates, cycling
    ],
    ids=["balance", "online-cycling"],
)
def test_resume_exact_with_stateful_stages(uneven, options):
    man, _ = uneven
    options = dict(options)
    m = options.pop("manifest", man)
    urls = None if m is not None else read_manifest(man).urls

    def make():
        ds = WeightedWebDataset(urls, manifest=m, num_classes=3, seed=2, shuffle_buffer=5, **options)
        return StatefulDataLoader(ds, batch_size=8, num_workers=0, collate_fn=collate), ds.set_epoch

    assert check_resume(make, epochs=2, break_points=[0, 1, 5, 7, 9, 20]) >= 8


def test_state_dict_is_plain_and_checked(uneven, tmp_path):
    man, _ = uneven
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, seed=1, balance=True)
    it = iter(ds)
    for _ in range(30):
        next(it)
    state = ds.state_dict()
    assert json.loads(json.dumps(state)) == state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state
    rest = [s["__key__"] for s in it]
    ds2 = WeightedWebDataset(None, manifest=man, num_classes=3, seed=1, balance=True)
    ds2.load_state_dict(json.loads(json.dumps(state)))
    assert [s["__key__"] for s in ds2] == rest
    with pytest.raises(ValueError, match="seed=1"):
        WeightedWebDataset(None, manifest=man, num_classes=3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="state must be a dict"):
        ds2.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------------------------------------------------------
# damaged data: error by default (naming shard and key), counted with a skipping handler


def _bad_samples(kind: str, marker: str) -> list[dict]:
    samples = fx.make_samples(30, vary=False)
    bad = samples[15]
    if kind == "missing_label":
        del bad["cls"]
    elif kind == "label_out_of_range":
        bad["cls"] = 7
    elif kind == "missing_required":
        del bad["npy"]
    elif kind == "pickle_member":
        bad["pyd"] = fx.pickle_bytes(marker)
    elif kind == "object_npy":  # a pickle inside a .npy
        buf = io.BytesIO()
        np.save(buf, np.array([fx.MarkerPayload(marker)], dtype=object), allow_pickle=True)
        bad["npy"] = buf.getvalue()
    elif kind == "pth_member":  # torch.save of an arbitrary object: needs weights_only=False
        buf = io.BytesIO()
        torch.save({"x": fx.MarkerPayload(marker)}, buf)
        bad["pth"] = buf.getvalue()
    return samples


def _dataset_dir(tmp_path, kind):
    """3 shards x 10 samples; shard 1 damaged (tar damage) or holding one bad sample s00015 (sample damage)."""
    marker = str(tmp_path / "MARKER")
    samples = _bad_samples(kind, marker)
    man = fx.write(tmp_path, fx.make_samples(30, vary=False), maxcount=10)
    url = read_manifest(man).urls[1]
    if kind in TAR_DAMAGE:
        TAR_DAMAGE[kind][0](url)
    else:  # rewrite shard 1 with the bad sample (same count, so the manifest still holds)
        with wds.TarWriter(url) as w:
            for s in samples[10:20]:
                w.write(s)
    return man, url, marker


TAR_DAMAGE = {
    # kind: (damage, samples of shard 1 delivered, reason)
    "truncated_in_member": (lambda p: fx.truncate_in_member(p, 13), 4, "truncated inside member 's00014.npy'"),
    "truncated_at_header": (lambda p: fx.truncate_at_header(p, 12), 3, "truncated at a header boundary"),
    "corrupt_header_mid": (lambda p: fx.corrupt_header(p, 12), 3, "invalid (corrupt) header"),
    "empty_file": (fx.empty_file, 0, "empty file"),
}
SAMPLE_DAMAGE = {
    "missing_label": "missing member(s) ['cls']",
    "label_out_of_range": "label 7 out of range [0, num_classes=3)",
    "missing_required": "missing member(s) ['npy']",
    "pickle_member": "allow_unsafe=True",
    "object_npy": "object dtype",
    "pth_member": "weights_only",
}


@pytest.mark.parametrize("kind", sorted(TAR_DAMAGE) + sorted(SAMPLE_DAMAGE))
def test_damage_raises_by_default_naming_the_shard(tmp_path, kind):
    man, url, marker = _dataset_dir(tmp_path, kind)
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, required_keys=["npy"], seed=0)
    with pytest.raises(ValueError) as info:
        list(ds)
    msg = str(info.value)
    assert url in msg
    assert (TAR_DAMAGE[kind][2] if kind in TAR_DAMAGE else SAMPLE_DAMAGE[kind]) in msg
    if kind in SAMPLE_DAMAGE:
        assert "s00015" in msg
    if kind in TAR_DAMAGE:
        delivered = TAR_DAMAGE[kind][1]
        assert f"{delivered} of the manifest's 10 samples read" in msg
        # without a manifest the strict reader still catches it (the end-of-archive check)
        plain = WeightedWebDataset(read_manifest(man).urls, num_classes=3, seed=0)
        with pytest.raises(ValueError, match=TAR_DAMAGE[kind][2].replace("(", r"\(").replace(")", r"\)")):
            list(plain)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", sorted(TAR_DAMAGE) + sorted(SAMPLE_DAMAGE))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_damage_is_counted_with_a_skipping_handler(tmp_path, kind, num_workers, caplog):
    man, url, marker = _dataset_dir(tmp_path, kind)
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, required_keys=["npy"], seed=0, shuffle=False,
                            handler=wds.ignore_and_continue)
    loader = StatefulDataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate)
    with caplog.at_level(logging.WARNING, logger="torch_pretrain_update.data.stream"):
        keys = [k for b in loader for k in b["key"]]
    stats = stream_stats(loader.state_dict())
    if kind in TAR_DAMAGE:
        delivered = TAR_DAMAGE[kind][1]
        lost = 10 - delivered
        good = [f"s{i:05d}" for i in list(range(10)) + list(range(10, 10 + delivered)) + list(range(20, 30))]
        # each reader that meets the damage reports it: both workers read into shard 1 (split at its middle)
        assert stats["shard_errors"] == (1 if num_workers == 0 else 2)
        assert stats["missing_samples"] == lost and stats["skipped_samples"] == 0
    else:
        lost = 1
        good = [f"s{i:05d}" for i in range(30) if i != 15]
        assert stats["skipped_samples"] == 1 and stats["missing_samples"] == 0 and stats["shard_errors"] == 0
    # the fixed epoch length (N = 30 from the manifest) is kept by repeating: never fewer samples per rank
    assert len(keys) == 30 and stats["samples"] == 30 and stats["padded_samples"] == lost
    assert set(keys) == set(good) and sorted(Counter(keys).values(), reverse=True)[0] <= 2
    assert any(url in e for e in stats["events"])
    if num_workers == 0:
        assert ds.stats["samples"] == 30 and ds.stats["padded_samples"] == lost
        assert any("WeightedWebDataset epoch 0" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(marker)


def test_stopping_handler_skips_the_rest_of_the_shard_and_counts_it(tmp_path):
    man, url, _ = _dataset_dir(tmp_path, "label_out_of_range")  # s00015 is bad
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, shuffle=False, handler=wds.ignore_and_stop)
    keys = [s["__key__"] for s in ds]
    assert keys[:25] == [f"s{i:05d}" for i in list(range(15)) + list(range(20, 30))]
    assert keys[25:] == [f"s{i:05d}" for i in range(5)]  # padding to the fixed length
    assert ds.stats["skipped_samples"] == 5 and ds.stats["padded_samples"] == 5 and ds.stats["samples"] == 30
    assert any("stopped the shard; 4 more" in e for e in ds.stats["events"])


def test_shard_with_more_samples_than_its_manifest(tmp_path):
    man = fx.write(tmp_path, fx.make_samples(20, vary=False), maxcount=10)
    url = read_manifest(man).urls[0]
    with wds.TarWriter(url) as w:
        for s in fx.make_samples(12, vary=False):
            w.write(s)
    with pytest.raises(ValueError, match=r"holds 12 samples but its manifest count is 10 \(2 extra\)"):
        list(WeightedWebDataset(None, manifest=man, num_classes=3))


def test_resume_with_damage_and_skipping_handler_keeps_stream_and_stats(tmp_path):
    man, url, _ = _dataset_dir(tmp_path, "corrupt_header_mid")

    def make():
        ds = WeightedWebDataset(None, manifest=man, num_classes=3, seed=4, shuffle_buffer=4,
                                handler=wds.ignore_and_continue)
        return StatefulDataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate), ds.set_epoch

    assert check_resume(make, epochs=1, break_points=[0, 2, 5, 7, 8]) == 5
    loader, _ = make()
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    loader2, _ = make()
    loader2.load_state_dict(state)
    list(loader2)
    full, _ = make()
    list(full)
    assert stream_stats(loader2.state_dict()) == stream_stats(full.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# balance and argument errors


def test_balance_moves_class_shares_toward_uniform(tmp_path):
    samples = fx.make_samples(900, num_classes=3, seed=8, vary=False)  # shares ~1/6, 2/6, 3/6
    man = fx.write(tmp_path, samples, maxcount=100)
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, balance=True, scheme="uniform", seed=1)
    labels = [s["cls"] for s in ds]
    shares = np.bincount(labels, minlength=3) / len(labels)
    assert np.all(np.abs(shares - 1 / 3) < 0.05), shares
    assert len(labels) == 900  # the fixed epoch length holds with balancing too


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"num_classes": 0}, ValueError, ["num_classes", "0"]),
        ({"urls": None, "manifest": None}, ValueError, ["urls", "manifest"]),
        ({"split": "rows"}, ValueError, ["split", "'rows'"]),
        ({"manifest": None, "split": "samples"}, ValueError, ["split='samples'", "manifest"]),
        ({"handler": 3}, TypeError, ["handler", "3"]),
        ({"shuffle_buffer": 0}, ValueError, ["shuffle_buffer", "0"]),
        ({"samples_per_rank": 0}, ValueError, ["samples_per_rank", "0"]),
        ({"rank": 2, "num_replicas": 2}, ValueError, ["rank", "2"]),
        ({"required_keys": [""]}, TypeError, ["required_keys"]),
        ({"scheme": "log"}, ValueError, ["scheme", "'log'"]),
        ({"num_classes": 2}, ValueError, ["num_classes=2", "labels >= 2"]),
        ({"urls": ["elsewhere/x.tar"]}, ValueError, ["elsewhere/x.tar", "not listed in the manifest"]),
    ],
)
def test_bad_arguments(uneven, kwargs, exc, words):
    man, _ = uneven
    args = {"urls": read_manifest(man).urls, "manifest": man, "num_classes": 3, **kwargs}
    urls = args.pop("urls")
    with pytest.raises(exc) as info:
        WeightedWebDataset(urls, **args)
    for w in words:
        assert w in str(info.value)
