"""The data layout's shared pieces: the index ``write_shards`` records for ``ShardDataset`` and the one label parser.

- ``write_shards`` records where each sample went while it writes, so ``ShardDataset(write_shards(...))`` opens
  without scanning a shard and reads exactly what a scan would have indexed; it leaves the index out where a scan
  would see the samples differently (dotted keys, compressed shards).
- One label rule for every reader (``parse_label``): the stages accept what the stream, the shard dataset,
  ``write_shards`` and ``inspect_shards`` accept, and refuse the same (ASCII digits only, scalars only).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import webdataset as wds

from torch_pretrain_update import (
    BadSampleError,
    ShardDataset,
    inspect_shards,
    iter_shard_samples,
    parse_label,
    read_manifest,
    with_class_weights,
    write_shards,
)
from torch_pretrain_update.data import shard_index


def _samples(n: int, *, labelled: bool = True) -> list[dict]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        s = {"__key__": f"k{i:04d}", "npy": np.full(3, i, np.float32), "txt": "x" * int(rng.integers(1, 1500))}
        if labelled:
            s["cls"] = int(rng.integers(0, 4))
        out.append(s)
    return out


def _raw_items(manifest: str) -> list[dict]:
    """Every sample read sequentially by the strict reader (no index involved)."""
    return [s for url in read_manifest(manifest).urls for s in iter_shard_samples(url)]


@pytest.mark.parametrize("labelled", [True, False])
def test_shard_dataset_opens_without_a_scan_after_write_shards(tmp_path, monkeypatch, labelled):
    samples = _samples(41, labelled=labelled)
    manifest = write_shards(samples, str(tmp_path / "w-%04d.tar"), maxcount=9, maxsize=12000,
                            label_key="cls" if labelled else None)
    assert len(read_manifest(manifest).shards) >= 5  # uneven shards (maxsize and maxcount both cut)
    assert os.path.isfile(manifest + ".index.npz")
    scanned = ShardDataset(manifest, cache=False)  # the same data indexed by a scan, in memory only

    def boom(url, label_key):
        raise AssertionError(f"scanned {url}")

    monkeypatch.setattr(shard_index, "_scan_shard", boom)
    ds = ShardDataset(manifest, decoder=lambda s: s)
    assert len(ds) == 41
    for name in ("_offsets", "_spans", "_crcs"):
        got, want = getattr(ds, name), getattr(scanned, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    if labelled:
        assert isinstance(ds.labels, np.memmap) and ds.labels.dtype == np.int8
        assert ds.labels.tolist() == [s["cls"] for s in samples] == scanned.labels.tolist()
    else:
        assert ds.labels is None and scanned.labels is None
    raw = _raw_items(manifest)
    assert [ds[i] for i in range(len(ds))] == [{**r, "__index__": i} for i, r in enumerate(raw)]


def test_the_written_index_is_checked_like_a_cached_one(tmp_path, monkeypatch):
    """A shard rewritten after write_shards is scanned again (and checked against its manifest)."""
    manifest = write_shards(_samples(20), str(tmp_path / "w-%04d.tar"), maxcount=10)
    urls = read_manifest(manifest).urls
    scanned: list[str] = []
    real_scan = shard_index._scan_shard
    monkeypatch.setattr(shard_index, "_scan_shard", lambda u, k: (scanned.append(u), real_scan(u, k))[1])
    os.utime(urls[1], ns=(1, 1))  # same bytes, another modification time
    ds = ShardDataset(manifest)
    assert scanned == [urls[1]] and len(ds) == 20


@pytest.mark.parametrize("case", ["dotted_key", "compressed"])
def test_write_shards_leaves_the_index_out_where_a_scan_would_differ(tmp_path, case):
    samples = _samples(6)
    pattern = str(tmp_path / "d-%04d.tar")
    if case == "dotted_key":
        for s in samples:
            s["__key__"] += ".v2"  # webdataset splits 'k0000.v2.cls' at the first dot: key 'k0000'
    else:
        pattern += ".gz"
    manifest = write_shards(samples, pattern, maxcount=3)
    assert not os.path.exists(manifest + ".index.npz")
    if case == "dotted_key":  # a scan groups them as the readers do ('k0000' with member 'v2.cls')
        ds = ShardDataset(read_manifest(manifest).urls)
        assert [ds[i]["__key__"] for i in range(len(ds))] == [f"k{i:04d}" for i in range(6)]


# ----- one label parser ---------------------------------------------------------------------------------------------
STRICTER = [
    (b"1_0", "not an integer label"),  # int() took the underscore: label 10
    ("\u0663", "not an integer label"),  # ARABIC-INDIC DIGIT THREE: int() and \\d took it as 3
    (np.array([[3]]), "must be a scalar"),  # one element, but 2-D
    (torch.tensor([[1]]), "must be a scalar"),
]


@pytest.mark.parametrize("value, words", STRICTER, ids=["underscore", "arabic-indic-digit", "2-d-array", "2-d-tensor"])
def test_every_reader_refuses_the_same_labels(tmp_path, value, words):
    with pytest.raises(ValueError, match=words):
        parse_label(value)
    with pytest.raises(BadSampleError, match=rf"__key__='a'.*key 'cls': .*{words}"):
        list(with_class_weights(num_classes=20)([{"__key__": "a", "cls": value}]))
    with pytest.raises(ValueError, match=rf"samples\[0\] \(key 'a'\), member 'cls': .*{words}"):
        write_shards([{"__key__": "a", "cls": value}], str(tmp_path / "l-%d.tar"))


def test_every_reader_accepts_the_same_labels(tmp_path):
    values = [3, np.int16(3), np.array(3), np.array([3], np.uint8), torch.tensor(3), torch.tensor([3]), b" 3\n",
              "+3", bytearray(b"3"), memoryview(b"3")]
    assert [parse_label(v, 4) for v in values] == [3] * len(values)
    stage = with_class_weights(num_classes=4)
    assert len(list(stage({"__key__": str(i), "cls": v} for i, v in enumerate(values)))) == len(values)
    assert stage.stats["emitted"] == len(values)
    url = str(tmp_path / "raw.tar")
    with wds.TarWriter(url) as w:
        w.write({"__key__": "a", "cls": b" 3\n"})
    assert inspect_shards(url, num_classes=4).shards[0].class_counts == {3: 1}
    with pytest.raises(ValueError, match=r"label 4 out of range \[0, num_classes=4\)"):
        parse_label(b"4", 4)
    with pytest.raises(ValueError, match="label -1 is negative"):
        parse_label(-1)
