"""ShardDataset: random access by index over real shards (write_shards / webdataset writers), its cached index and
what it refuses; score_dataset over it (one process and a 2-rank gloo group); every sampler dropped into
DataLoader / StatefulDataLoader over it, with exact resume."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import socket
import tarfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support import shard_fixtures as fx
from tests._support.resume_harness import check_resume
from torch_pretrain_update import ShardDataset as TopLevelShardDataset
from torch_pretrain_update.data import shard_index as sd
from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.errors import DamagedShardError, MalformedSampleError, UnsafeMemberError
from torch_pretrain_update.data.manifest import read_manifest
from torch_pretrain_update.data.shard_dataset import ShardDataset
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler
from torch_pretrain_update.sampling.weighted_sampler import WeightedSampler
from torch_pretrain_update.scoring.distributed import score_dataset


# ----- helpers -------------------------------------------------------------------------------------------------
def _reference(urls: list[str]) -> list[dict]:
    """Every sample as webdataset reads them in order, decoded by the same safe decoder."""
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(safe_decode()))


def _same(a: dict, b: dict) -> bool:
    if set(a) - {"__index__"} != set(b) - {"__local_path__"}:
        return False
    for k, v in b.items():
        if k == "__local_path__":
            continue
        if isinstance(v, np.ndarray):
            if not np.array_equal(a[k], v):
                return False
        elif a[k] != v:
            return False
    return True


@pytest.fixture()
def shards(tmp_path) -> tuple[str, list[dict]]:
    """57 samples in uneven shards (maxsize) written by write_shards: (manifest, samples)."""
    samples = fx.make_samples(57, seed=3)
    return fx.write(tmp_path, samples, maxcount=12, maxsize=9000), samples


def _count_scans(monkeypatch) -> list[str]:
    scanned: list[str] = []
    real = sd._scan_shard

    def counting(url, label_key):
        scanned.append(os.path.basename(url))
        return real(url, label_key)

    monkeypatch.setattr(sd, "_scan_shard", counting)
    return scanned


def _edit_manifest(path: str, fn: Callable[[dict], None]) -> None:
    raw = json.load(open(path))
    fn(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


# ----- item 1: the dataset --------------------------------------------------------------------------------------
def test_items_equal_webdataset_reading_in_order(shards):
    manifest, samples = shards
    ds = ShardDataset(manifest)
    man = read_manifest(manifest)
    assert len(man.shards) > 3 and len({s.count for s in man.shards}) > 1  # uneven shards
    assert len(ds) == 57 == len(samples)
    ref = _reference(man.urls)
    for i in range(len(ds)):
        item = ds[i]
        assert item["__index__"] == i
        assert _same(item, ref[i]), i
        assert item["__key__"] == samples[i]["__key__"] and item["cls"] == samples[i]["cls"]
    # negative indices like a list; shards in manifest order
    assert ds[-1]["__key__"] == samples[-1]["__key__"] and ds[-1]["__index__"] == 56
    assert ds[-57]["__index__"] == 0
    assert ds.urls == man.urls and ds[0]["__url__"] == man.urls[0]
    assert ds.shard_starts.tolist() == np.cumsum([0] + [s.count for s in man.shards]).tolist()
    assert TopLevelShardDataset is ShardDataset
    same = ShardDataset(read_manifest(manifest))  # a parsed manifest works too, with the same cached index
    assert same.index_path == ds.index_path and same[7]["__key__"] == samples[7]["__key__"]


def test_index_out_of_range_and_bad_index_types(shards):
    ds = ShardDataset(shards[0])
    for bad in (57, 58, -58, 10**12):
        with pytest.raises(IndexError, match=f"index {bad} out of range for 57 samples"):
            ds[bad]
    with pytest.raises(TypeError, match="indices must be integers; got str"):
        ds["3"]
    with pytest.raises(TypeError, match="indices must be integers; got float"):
        ds[1.0]
    assert ds[np.int64(5)]["__index__"] == 5 and ds[torch.tensor(6)]["__index__"] == 6


def test_labels_are_memory_mapped_and_need_no_sample_read(shards, monkeypatch):
    manifest, samples = shards
    first = ShardDataset(manifest)
    assert isinstance(first.labels, np.memmap)
    assert first.labels.tolist() == [s["cls"] for s in samples]
    assert os.path.isfile(manifest + ".index.npz") and os.path.isfile(manifest + ".index.labels.npy")
    scanned = _count_scans(monkeypatch)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(sd.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    ds = ShardDataset(manifest)
    sampler = ClassBalancedSampler(ds.labels, seed=0)  # starts from the labels alone
    assert len(list(sampler)) == len(sampler) > 0
    assert scanned == [] and opened == []  # the cached index: no shard scanned, no shard opened
    assert isinstance(ds.labels, np.memmap) and ds.labels.tolist() == first.labels.tolist()
    assert ds.labels.dtype == np.int8  # the smallest integer type holding the labels


def test_index_is_at_most_16_bytes_per_sample(shards):
    ds = ShardDataset(shards[0])
    assert ds.index_nbytes == 12 * len(ds)
    assert ds._offsets.dtype == np.uint32 and ds._spans.dtype == np.uint32 and ds._crcs.dtype == np.uint32


def test_url_list_and_webdataset_writers_with_long_non_ascii_and_dotted_names(tmp_path):
    """Shards from webdataset's own writers (pax headers for long and non-ASCII names; mtime=0: plain ustar)."""
    long_key = "d/" + "x" * 140  # > 100 bytes: a pax path record
    keys = ["a/b", "d.x/e", "ünï", long_key, "e"]  # a dot in a folder is part of the key
    paths = []
    for j, mtime in enumerate((None, 0)):
        p = str(tmp_path / f"w{j}.tar")
        with wds.TarWriter(p, mtime=mtime) as w:
            for n, k in enumerate(keys):
                w.write({"__key__": f"{k}{j}", "cls": n % 2, "json": {"n": n}, "txt": "t" * (n * 300)})
        paths.append(p)
    ds = ShardDataset(paths, label_key="cls")
    ref = _reference(paths)
    assert len(ds) == len(ref) == 10
    for i in range(10):
        assert _same(ds[i], ref[i]), (i, ref[i]["__key__"])
    assert ds.labels.tolist() == [0, 1, 0, 1, 0] * 2
    assert ds.index_path is None  # a list of paths: nothing cached unless index_path is given
    assert ShardDataset(paths).labels is None
    cached = ShardDataset([Path(p) for p in paths], label_key="cls", index_path=tmp_path / "idx.npz")
    assert os.path.isfile(tmp_path / "idx.npz") and cached.labels.tolist() == ds.labels.tolist()
    with pytest.raises(ValueError, match=r"manifest\[1\] .* names the same shard as manifest\[0\]"):
        ShardDataset([paths[0], paths[0]])
    with pytest.raises(ValueError, match="'pipe:cat x.tar' is not a local file"):
        ShardDataset(["pipe:cat x.tar"])
    with pytest.raises(TypeError, match="manifest must be a manifest path, a ShardManifest or a list"):
        ShardDataset(3)


def test_a_touched_shard_is_rescanned_alone_and_reads_the_same(shards, monkeypatch):
    manifest, samples = shards
    ShardDataset(manifest)
    url = read_manifest(manifest).urls[2]
    st = os.stat(url)
    os.utime(url, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a copy that kept the bytes, not the time
    scanned = _count_scans(monkeypatch)
    ds = ShardDataset(manifest)
    assert scanned == [os.path.basename(url)]  # checked against the manifest's SHA-256, then re-indexed
    assert [ds[i]["__key__"] for i in range(len(ds))] == [s["__key__"] for s in samples]
    assert ShardDataset(manifest) is not None and scanned == [os.path.basename(url)]  # the new cache is used


def test_a_changed_shard_is_refused_by_its_manifest_hash(shards):
    manifest, samples = shards
    ShardDataset(manifest)
    man = read_manifest(manifest)
    url = man.urls[1]
    # the same keys and sizes, other bytes: a well-formed shard the manifest does not describe
    lo, hi = man.shards[0].count, man.shards[0].count + man.shards[1].count
    other = [{**s, "npy": s["npy"] + 1} for s in samples[lo:hi]]
    folder = Path(url).parent
    write_shards(other, str(folder / "x-%06d.tar"), maxcount=1000, manifest_path=str(folder / "x.json"))
    shutil.copyfile(str(folder / "x-000000.tar"), url)
    with pytest.raises(DamagedShardError, match=r"damaged shard '.*train-000001\.tar': its SHA-256 differs"):
        ShardDataset(manifest)
    # without the hash check it is re-indexed and read as it now is
    ds = ShardDataset(manifest, check_sha256=False)
    assert np.array_equal(ds[lo]["npy"], samples[lo]["npy"] + 1)


def test_a_shard_changed_after_the_dataset_was_built_is_refused_by_name(shards):
    manifest, samples = shards
    ds = ShardDataset(manifest)
    url = ds.urls[3]
    i = int(ds.shard_starts[3])
    with open(url, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DamagedShardError, match=r"'.*train-000003\.tar': changed since its index was built"):
        ds[i]
    assert ds[0]["__index__"] == 0  # other shards read on


def test_same_size_and_time_but_other_samples_is_caught_by_the_key_check(tmp_path):
    """The last line of defence: a shard replaced by one of identical size and time (a restored backup) holding
    other samples at the same offsets: the header's key must be the indexed sample's."""
    a = fx.write(tmp_path / "a", fx.make_samples(20, vary=False, prefix="a"), maxcount=20, mtime=0)
    b = fx.write(tmp_path / "b", fx.make_samples(20, vary=False, prefix="b"), maxcount=20, mtime=0)
    ua, ub = read_manifest(a).urls[0], read_manifest(b).urls[0]
    assert os.path.getsize(ua) == os.path.getsize(ub)
    ds = ShardDataset(a)
    st = os.stat(ua)
    shutil.copyfile(ub, ua)
    os.utime(ua, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DamagedShardError, match=r"sample 4 \(byte \d+\): the header names sample 'b00004', not the "
                                                 r"indexed one"):
        ds[4]


@pytest.mark.parametrize("cached", [False, True])
def test_a_manifest_whose_counts_lie_names_the_shard(shards, cached):
    manifest, _ = shards
    if cached:
        ShardDataset(manifest)  # index built from the true manifest, then the manifest is edited

    def lie(raw: dict) -> None:
        e = raw["shards"][2]
        e["count"] -= 1
        e["class_counts"][int(np.argmax(e["class_counts"]))] -= 1

    _edit_manifest(manifest, lie)
    n = read_manifest(manifest).shards[2].count
    with pytest.raises(DamagedShardError, match=rf"'.*train-000002\.tar': holds {n + 1} samples but its manifest "
                                                 rf"count is {n}"):
        ShardDataset(manifest)


def test_a_manifest_whose_class_histogram_lies_names_the_shard(shards):
    manifest, _ = shards

    def lie(raw: dict) -> None:
        cc = raw["shards"][1]["class_counts"]
        cc[0], cc[1] = cc[0] + 1, cc[1] - 1

    _edit_manifest(manifest, lie)
    with pytest.raises(DamagedShardError, match=r"train-000001\.tar': class histogram \[.*\] of its labels differs"):
        ShardDataset(manifest)


def test_an_old_manifest_without_hashes_works_and_checks_counts(shards, monkeypatch):
    manifest, samples = shards
    _edit_manifest(manifest, lambda raw: [e.pop("sha256") for e in raw["shards"]])
    ds = ShardDataset(manifest)
    assert [ds[i]["__key__"] for i in (0, 30, 56)] == [samples[i]["__key__"] for i in (0, 30, 56)]
    scanned = _count_scans(monkeypatch)
    ShardDataset(manifest)
    assert scanned == []


def test_labels_of_the_wrong_length_are_refused_by_argument(shards, tmp_path):
    manifest, samples = shards
    with pytest.raises(ValueError, match=r"labels must be 1-D with one label per sample \(57\); got shape \(56,\)"):
        ShardDataset(manifest, labels=np.zeros(56, dtype=np.int64))
    np.save(tmp_path / "pseudo.npy", np.zeros((57, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels must be 1-D .* got shape \(57, 2\)"):
        ShardDataset(manifest, labels=tmp_path / "pseudo.npy")
    with pytest.raises(ValueError, match="labels must be >= 0; got -1 at index 3"):
        ShardDataset(manifest, labels=np.array([0, 0, 0, -1] + [0] * 53))
    pseudo = np.arange(57) % 5
    np.save(tmp_path / "pseudo.npy", pseudo)
    ds = ShardDataset(manifest, labels=tmp_path / "pseudo.npy")
    assert isinstance(ds.labels, np.memmap) and ds.labels.tolist() == pseudo.tolist()
    # a cached labels file of the wrong length (another build's) is never paired with this index: rebuilt
    ShardDataset(manifest)
    np.save(manifest + ".index.labels.npy", np.zeros(56, dtype=np.int8))
    assert ShardDataset(manifest).labels.tolist() == [s["cls"] for s in samples]


@pytest.mark.parametrize("damage", ["truncate_in_member", "truncate_at_header", "corrupt_header", "empty_file"])
def test_damaged_shards_are_refused_when_indexed(tmp_path, damage):
    manifest = fx.write(tmp_path, fx.make_samples(30, seed=1), maxcount=10)
    url = read_manifest(manifest).urls[1]
    if damage == "empty_file":
        fx.empty_file(url)
    else:
        getattr(fx, damage)(url, 4)
    words = {"truncate_in_member": "truncated", "truncate_at_header": "without an end-of-archive block",
             "corrupt_header": "invalid header at byte", "empty_file": "empty file"}[damage]
    with pytest.raises(DamagedShardError, match=rf"train-000001\.tar': .*{words}"):
        ShardDataset(manifest, check_sha256=False)


def test_compressed_and_missing_shards(tmp_path):
    p = str(tmp_path / "c.tar.gz")
    with wds.TarWriter(p) as w:
        w.write({"__key__": "a", "cls": 1})
    with pytest.raises(ValueError, match=r"c\.tar\.gz' is gzip-compressed: ShardDataset reads samples by byte offset"):
        ShardDataset([p])
    with pytest.raises(DamagedShardError, match=r"nope\.tar': cannot be opened"):
        ShardDataset([str(tmp_path / "nope.tar")])


def _raw_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_malformed_and_unsafe_samples_are_refused_alone_and_never_unpickled(tmp_path):
    marker = str(tmp_path / "marker")
    p = str(tmp_path / "m.tar")
    _raw_tar(p, [("a.cls", b"0"), ("b.cls", b"1"), ("b.CLS", b"2"), ("c.cls", b"1"),
                 ("c.pyd", fx.pickle_bytes(marker)), ("dir/", b""), ("noext", b"zz"), ("d.cls", b"0")])
    ds = ShardDataset([p], label_key="cls")
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 1, 0]  # the malformed sample keeps its number
    assert ds[0]["cls"] == 0 and ds[3]["cls"] == 0 and ds[3]["__key__"] == "d"
    with pytest.raises(MalformedSampleError, match=r"sample __key__='b': member 'b.CLS' repeats the member 'cls'"):
        ds[1]
    with pytest.raises(UnsafeMemberError):
        ds[2]
    assert not os.path.exists(marker)
    assert ds.raw(2)["pyd"] == fx.pickle_bytes(marker)  # bytes only
    assert not os.path.exists(marker)


def test_pickling_and_forked_workers_open_their_own_files(shards):
    manifest, samples = shards
    ds = ShardDataset(manifest, max_open_files=2)
    keys = [s["__key__"] for s in samples]
    order = np.random.default_rng(0).permutation(57).tolist()
    assert [ds[i]["__key__"] for i in order] == [keys[i] for i in order]
    assert 0 < len(ds._fds) <= 2  # at most max_open_files shards open at once
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fds == {} and isinstance(clone.labels, np.memmap)
    assert [clone[i]["__key__"] for i in order[:10]] == [keys[i] for i in order[:10]]
    # workers forked while the parent holds open shards: each opens its own
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=lambda b: [s["__key__"] for s in b])
    assert [k for b in loader for k in b] == keys


def test_an_unwritable_cache_warns_and_still_works(shards):
    manifest, samples = shards
    with pytest.warns(RuntimeWarning, match="could not cache the index"):
        ds = ShardDataset(manifest, index_path="/nonexistent-dir/x.index.npz")
    assert ds[5]["__key__"] == samples[5]["__key__"] and ds.labels.tolist() == [s["cls"] for s in samples]


# ----- item 2: scoring over shards -------------------------------------------------------------------------------
SCORE_N, SCORE_D, SCORE_C = 61, 12, 5


def _score_samples() -> list[dict]:
    rng = np.random.default_rng(5)
    return [{"__key__": f"k{i:04d}", "cls": int(rng.integers(0, SCORE_C)),
             "npy": rng.standard_normal(SCORE_D).astype(np.float32)} for i in range(SCORE_N)]


def _score_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(SCORE_D, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(32, SCORE_C))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _write_score_shards(root: Path) -> str:
    return write_shards(_score_samples(), str(root / "score-%06d.tar"), maxcount=9)


def _tensor_reference(batch_size: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack([s["npy"] for s in _score_samples()]))
    return score_dataset(_score_model(), TensorDataset(x), batch_size=batch_size)


def _drop_non_tensors(batch: list[dict]) -> torch.Tensor:
    return default_collate([s["npy"] for s in batch])


def test_score_dataset_over_a_shard_dataset_equals_in_memory_scoring(tmp_path):
    ds = ShardDataset(_write_score_shards(tmp_path))
    model = _score_model()
    ref = _tensor_reference(8)
    assert torch.equal(score_dataset(model, ds, batch_size=8, input_key="npy"), ref)
    assert torch.equal(score_dataset(model, ds, batch_size=8, collate_fn=_drop_non_tensors), ref)
    assert torch.equal(score_dataset(model, ds, batch_size=8, input_key="npy", num_workers=2), ref)
    with pytest.raises(TypeError, match=r"input_key='x' needs dict batches holding that key; got a dict with keys "
                                        r"\['__index__', '__key__', '__url__', 'cls', 'npy'\]"):
        score_dataset(model, ds, input_key="x")
    with pytest.raises(ValueError, match="pass forward= or input_key=, not both"):
        score_dataset(model, ds, input_key="npy", forward=lambda m, b: m(b["npy"]))
    with pytest.raises(ValueError, match="num_samples must be len\\(dataset\\)=61 for a map-style dataset; got 60"):
        score_dataset(model, ds, input_key="npy", num_samples=60)


class _BlockShare(IterableDataset):
    """The samples of ``ds`` whose batch ``i // batch_size`` belongs to this share (``rank`` of ``world``) and,
    inside a DataLoader, to this worker: whole batches, so every batch is the one a single process forms."""

    def __init__(self, ds: ShardDataset, batch_size: int, world: int, rank: int, order: str = "blocks") -> None:
        self.ds, self.batch_size, self.world, self.rank, self.order = ds, batch_size, world, rank, order

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (1, 0) if info is None else (info.num_workers, info.id)
        blocks = range(-(-len(self.ds) // self.batch_size))
        mine = [b for b in blocks if b % self.world == self.rank][wid::workers]
        if self.order == "reversed":
            mine = mine[::-1]
        for b in mine:
            for i in range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.ds))):
                yield self.ds[i]


def test_score_dataset_over_an_iterable_of_indexed_samples(tmp_path):
    ds = ShardDataset(_write_score_shards(tmp_path))
    model = _score_model()
    ref = _tensor_reference(8)
    assert torch.equal(score_dataset(model, (ds[i] for i in range(len(ds))), batch_size=8, input_key="npy"), ref)
    # whole batches in another order, and from two workers: placed by index, the same bits
    assert torch.equal(score_dataset(model, _BlockShare(ds, 8, 1, 0, "reversed"), batch_size=8, input_key="npy"), ref)
    assert torch.equal(score_dataset(model, _BlockShare(ds, 8, 1, 0), batch_size=8, input_key="npy",
                                     num_workers=2), ref)
    # a padding repeat keeps the first score; num_samples sets the length
    repeated = [ds[i] for i in range(len(ds))] + [ds[0]]
    assert torch.equal(score_dataset(model, iter(repeated), batch_size=8, input_key="npy", num_samples=61), ref)
    with pytest.raises(ValueError, match=r"2 of the 61 indices were scored by no rank \(e\.g\. \[3, 60\]\)"):
        score_dataset(model, (ds[i] for i in range(61) if i not in (3, 60)), batch_size=8, input_key="npy",
                      num_samples=61)
    with pytest.raises(ValueError, match=r"'__index__' 60, outside range\(num_samples=50\)"):
        score_dataset(model, (ds[i] for i in range(61)), batch_size=8, input_key="npy", num_samples=50)
    with pytest.raises(TypeError, match=r"dataset must be a map-style dataset .* got a dict without '__index__'"):
        score_dataset(model, iter([{"npy": torch.zeros(SCORE_D)}]), input_key="npy")
    with pytest.raises(ValueError, match="num_workers=2 needs a map-style dataset or a torch IterableDataset"):
        score_dataset(model, iter(repeated), input_key="npy", num_workers=2)


# 2-rank gloo group: ShardDataset map-style and block-split iterables on each rank vs one process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # DataLoader workers forked, as under torchrun
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict[str, Any] = {}
    try:
        ds = ShardDataset(Path(out_dir) / "score-manifest.json")
        model = _score_model()
        res["map"] = score_dataset(model, ds, batch_size=8, input_key="npy")
        res["map_workers"] = score_dataset(model, ds, batch_size=16, input_key="npy", num_workers=2)
        res["iterable"] = score_dataset(model, _BlockShare(ds, 8, world, rank), batch_size=8, input_key="npy")
        res["iterable_workers"] = score_dataset(model, _BlockShare(ds, 8, world, rank), batch_size=8,
                                                input_key="npy", num_workers=2)
        try:  # rank 1 yields nothing: indices missing on every rank, raised on every rank
            score_dataset(model, iter([ds[0]] if rank == 0 else []), input_key="npy", num_samples=3)
        except ValueError as exc:
            res["missing"] = str(exc)
    except Exception:
        res["error"] = traceback.format_exc()
    finally:
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_score_dataset_on_two_gloo_ranks_equals_one_process(tmp_path):
    _write_score_shards(tmp_path)
    ctx = mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")  # forked like DataLoader workers: no re-import per rank
    end = time.monotonic() + 180
    try:
        while not ctx.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() > end:
                pytest.fail("2-rank group did not finish in 180 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)  # the ranks ran with one thread: score the reference the same way
    try:
        ref8, ref16 = _tensor_reference(8), _tensor_reference(16)
    finally:
        torch.set_num_threads(2)
    for res in per_rank:
        assert "error" not in res, res.get("error")
        assert torch.equal(res["map"], ref8) and torch.equal(res["map_workers"], ref16)
        assert torch.equal(res["iterable"], ref8) and torch.equal(res["iterable_workers"], ref8)
        assert "2 of the 3 indices were scored by no rank (e.g. [1, 2])" in res["missing"]


# ----- item 3: every sampler drops in ---------------------------------------------------------------------------
def _indices(batch: list[dict]) -> list[int]:
    return [s["__index__"] for s in batch]


SAMPLERS: dict[str, Callable[[ShardDataset], Any]] = {
    "random_subset": lambda ds: RandomSubsetSampler(len(ds), 23, seed=1),
    "stratified": lambda ds: StratifiedSampler(ds.labels, 20, seed=1),
    "class_balanced": lambda ds: ClassBalancedSampler(ds.labels, samples_per_class="min", seed=1),
    "entropy": lambda ds: EntropySampler.from_scores(
        torch.from_numpy(np.linspace(0, 1, len(ds))), 17, random_fraction=0.3, seed=1),
    "weighted": lambda ds: WeightedSampler(torch.arange(len(ds), dtype=torch.float64) + 1, 19, seed=1),
}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_over_a_shard_dataset_resumes_exactly(shards, name, num_workers):
    manifest, samples = shards
    ds = ShardDataset(manifest)

    def make():
        sampler = SAMPLERS[name](ShardDataset(manifest))  # fresh objects, as after a restart
        loader = StatefulDataLoader(ShardDataset(manifest), sampler=sampler, batch_size=4, num_workers=num_workers,
                                    collate_fn=_indices)
        return loader, sampler.set_epoch

    loader, set_epoch = make()
    set_epoch(1)
    got = [i for b in loader for i in b]
    sampler = SAMPLERS[name](ds)
    sampler.set_epoch(1)
    assert got == list(sampler) and len(got) == len(sampler) > 0  # the loader reads exactly the sampler's plan
    batches = -(-len(got) // 4)  # mid-epoch, before the last batch, and at the epoch's end
    assert check_resume(make, epochs=2, break_points=[1, batches - 1, batches], break_epochs=[1]) == 3


def test_default_collate_and_plain_dataloader(shards):
    manifest, samples = shards
    ds = ShardDataset(manifest)
    sampler = StratifiedSampler(ds.labels, 12, seed=0)
    batches = list(DataLoader(ds, sampler=sampler, batch_size=5))
    idx = [i for b in batches for i in b["__index__"].tolist()]
    assert idx == list(sampler)
    assert [k for b in batches for k in b["__key__"]] == [samples[i]["__key__"] for i in idx]
    assert torch.equal(torch.cat([b["cls"] for b in batches]), torch.tensor([samples[i]["cls"] for i in idx]))


def test_a_selection_balanced_again_without_copying(shards):
    """Select with one sampler's plan, balance within the selection with another: Subset + labels[selected]."""
    manifest, samples = shards
    ds = ShardDataset(manifest)
    selected = EntropySampler.from_scores(torch.from_numpy(np.linspace(0, 1, len(ds))), 30, seed=2,
                                          shuffle=False).plan(0).tolist()
    sub_labels = ds.labels[selected]
    counts = Counter(sub_labels.tolist())

    def make():
        d = ShardDataset(manifest)
        sampler = ClassBalancedSampler(d.labels[selected], samples_per_class="max", seed=4)
        return StatefulDataLoader(Subset(d, selected), sampler=sampler, batch_size=4, num_workers=2,
                                  collate_fn=_indices), sampler.set_epoch

    loader, set_epoch = make()
    set_epoch(0)
    got = [i for b in loader for i in b]
    assert set(got) <= set(selected) and set(got) == set(selected)  # only the selection, all of it ("max")
    by_class = Counter(samples[i]["cls"] for i in got)
    assert set(by_class.values()) == {max(counts.values())} and set(by_class) == set(counts)  # balanced
    assert check_resume(make, epochs=2, break_points=[0, 2, 5], break_epochs=[0]) == 3
