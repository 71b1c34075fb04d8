"""Hostile tar members on every reading path: decompression bombs, pickles behind compound extensions, repeated or
reserved member names, and member names that are not UTF-8.

Reading paths: ``iter_shard_samples`` (the strict reader), ``strict_tarfile_to_samples`` (the pipeline source),
``safe_decode`` (the decoder), ``WeightedWebDataset`` (the stream), ``read_teacher_outputs`` and
``inspect_shards`` / ``pretrain-update inspect``. Each hostile input must be refused before it costs memory or runs
code, with an error naming the shard, the sample's key and (for a size) the limit under the default handler, and
be skipped and counted under a skipping handler. Memory is measured with ``tracemalloc`` (Python's allocator
traces every ``bytes`` that ``tarfile``, ``gzip``, ``zlib`` and ``zipfile`` produce, and numpy's arrays): a refused
50 MiB member must never be held.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shlex
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support import shard_fixtures as fx
from torch_pretrain_update import cli
from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.errors import (
    DamagedShardError,
    MalformedSampleError,
    MemberDecodeError,
    MemberTooLargeError,
    SizeLimitError,
    TarMemberTooLargeError,
    UnsafeMemberError,
)
from torch_pretrain_update.data.inspect import inspect_shards
from torch_pretrain_update.data.limits import DEFAULT_MAX_MEMBER_BYTES
from torch_pretrain_update.data.stream import WeightedWebDataset, stream_stats
from torch_pretrain_update.data.strict_samples import strict_tarfile_to_samples
from torch_pretrain_update.data.tar_reader import iter_shard_samples
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.training.teacher_reader import read_teacher_outputs

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CAP = 4 * MiB  # the cap the tests pass; every bomb below expands to 12x-50x of it
SKIP = wds.ignore_and_continue


# ------------------------------------------------------------------------------------------------- helpers
def _tar(path, entries, *, mode: str = "w", **kw) -> str:
    """Write ``entries`` (name, bytes) to a tar file, in order, as they are (no webdataset encoding)."""
    with tarfile.open(str(path), mode, format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape",
                      **kw) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _healthy(tmp_path, name: str = "ok-000000.tar", keys=("x0", "x1", "x2")) -> str:
    return _tar(tmp_path / name, [(f"{k}.cls", str(i % 2).encode()) for i, k in enumerate(keys)])


class Peak:
    """``tracemalloc`` peak of the block, in bytes (Python and numpy allocations)."""

    def __enter__(self) -> Peak:
        tracemalloc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


# ------------------------------------------------------------------------------------------ 2. decompression bombs
@pytest.fixture(scope="module")
def tar_gz_bomb(tmp_path_factory) -> str:
    """A .tar.gz shard (~50 KiB) whose sample ``b`` holds a 50 MiB member of zeros; samples a, b, c."""
    d = tmp_path_factory.mktemp("bomb")
    entries = [("a.cls", b"0"), ("b.cls", b"1"), ("b.bin", bytes(50 * MiB)), ("c.cls", b"0")]
    url = _tar(d / "bomb-000000.tar.gz", entries, mode="w:gz", compresslevel=1)
    assert os.path.getsize(url) < MiB
    return url


def test_tar_member_over_the_cap_is_refused_from_its_header(tar_gz_bomb):
    with Peak() as peak, pytest.raises(TarMemberTooLargeError) as info:
        list(iter_shard_samples(tar_gz_bomb, max_member_bytes=CAP))
    assert peak.bytes < MiB  # the 50 MiB were never read (tarfile's buffers only)
    err = info.value
    assert isinstance(err, DamagedShardError) and isinstance(err, SizeLimitError)
    assert (err.url, err.key, err.member, err.limit) == (tar_gz_bomb, "b", "b.bin", CAP)
    msg = str(err)
    assert repr(tar_gz_bomb) in msg and "'b.bin'" in msg and "__key__='b'" in msg
    assert f"max_member_bytes={CAP}" in msg and str(50 * MiB) in msg


def test_tar_member_cap_default_is_256_mib(tmp_path):
    """A header announcing 1 GiB is refused by the default cap without reading a byte of it (the data is not even
    there: before, the reader tried to read it and called the shard truncated)."""
    info = tarfile.TarInfo("a.bin")
    info.size = 1 << 30
    path = tmp_path / "huge-000000.tar"
    path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(4096))
    with pytest.raises(TarMemberTooLargeError) as err:
        list(iter_shard_samples(str(path)))
    assert DEFAULT_MAX_MEMBER_BYTES == 256 * MiB and err.value.limit == DEFAULT_MAX_MEMBER_BYTES
    assert f"max_member_bytes={DEFAULT_MAX_MEMBER_BYTES}" in str(err.value)


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_shard_expanding_past_the_ratio_is_refused(tmp_path, mode):
    """Members each under the cap, but the shard expands 1000x (gzip) to 100,000x (bz2): refused by max_ratio once
    past the 16 MiB floor. tarfile's own decompression would inflate a whole 10 KiB block of bz2 at once (here:
    all 36 MiB); the reader's bounded decompression stops within a block of the floor."""
    entries = [(f"s{i:02d}.bin", bytes(3 * MiB)) for i in range(12)]
    kw = {"preset": 0} if mode == "w:xz" else {"compresslevel": 1}
    url = _tar(tmp_path / f"ratio-000000.tar.{mode[2:]}", entries, mode=mode, **kw)
    assert len(list(iter_shard_samples(url, max_member_bytes=CAP, max_ratio=None))) == 12  # no ratio cap: all read
    read = []
    with Peak() as peak, pytest.raises(TarMemberTooLargeError) as info:
        for sample in iter_shard_samples(url, max_member_bytes=CAP, max_ratio=50):
            read.append(sample["__key__"])
    assert read == ["s00", "s01", "s02", "s03"]  # stopped inside s05, at 16 MiB: s04 waits for its end
    assert peak.bytes < 16 * MiB  # a few members at a time (grouping, reading), never the 36 MiB
    msg = str(info.value)
    assert repr(url) in msg and "max_ratio=50" in msg and info.value.limit == 50


def test_pax_header_bomb_is_refused(tmp_path):
    """A 48 MiB pax header (which tarfile reads into memory while parsing the header) is capped too."""
    info = tarfile.TarInfo("a.cls")
    info.size = 1
    info.pax_headers = {"comment": "x" * (48 * MiB)}
    path = tmp_path / "pax-000000.tar.gz"
    with tarfile.open(str(path), "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tf:
        tf.addfile(info, io.BytesIO(b"0"))
    with Peak() as peak, pytest.raises(TarMemberTooLargeError) as err:
        list(iter_shard_samples(str(path), max_member_bytes=CAP))
    assert peak.bytes < 2 * MiB and err.value.limit == CAP and "header" in str(err.value)


def test_pipeline_source_skips_and_counts_the_bomb(tmp_path, tar_gz_bomb):
    ok = _healthy(tmp_path)
    src = strict_tarfile_to_samples(SKIP, max_member_bytes=CAP)
    with Peak() as peak:
        got = _keys(src([{"url": tar_gz_bomb}, {"url": ok}]))
    assert peak.bytes < 2 * MiB
    assert got == ["a", "x0", "x1", "x2"]  # the shard ends at the bomb (reading past it would inflate it)
    assert (src.stats["oversized"], src.stats["damaged_shards"], src.stats["samples"]) == (1, 1, 4)
    assert "'b.bin'" in src.stats["events"][0]
    with pytest.raises(TarMemberTooLargeError):
        list(strict_tarfile_to_samples(max_member_bytes=CAP)([{"url": tar_gz_bomb}]))


def test_inspect_reports_the_bomb(tar_gz_bomb):
    with Peak() as peak:
        rep = inspect_shards(tar_gz_bomb, max_member_bytes=CAP)
    assert peak.bytes < 2 * MiB
    s = rep.shards[0]
    assert not rep.ok and s.count == 1 and s.oversized_members == ["b.bin"]
    assert any("'b.bin'" in p and f"max_member_bytes={CAP}" in p for p in s.problems)


@pytest.fixture(scope="module")
def npy_gz_bomb(tmp_path_factory) -> str:
    """An uncompressed shard whose sample ``b`` holds ``npy.gz``: 50 MiB of float32 zeros in ~50 KiB."""
    d = tmp_path_factory.mktemp("npygz")
    bomb = gzip.compress(_npy(np.zeros(50 * MiB // 4, np.float32)), compresslevel=1)
    assert len(bomb) < MiB
    entries = [("a.cls", b"0"), ("b.cls", b"1"), ("b.npy.gz", bomb), ("c.cls", b"1"), ("c.npy.gz",
               gzip.compress(_npy(np.arange(3, dtype=np.float32))))]
    return _tar(d / "npygz-000000.tar", entries)


def test_gz_member_bomb_is_refused_while_inflating(npy_gz_bomb):
    raw = list(iter_shard_samples(npy_gz_bomb))
    with Peak() as peak, pytest.raises(MemberTooLargeError) as info:
        safe_decode(max_member_bytes=CAP)(raw[1])
    assert peak.bytes < 2 * CAP  # stops after CAP bytes of output (before: 100 MiB, the data and its copy)
    err = info.value
    assert isinstance(err, SizeLimitError) and isinstance(err, MemberDecodeError)
    assert (err.member, err.key, err.url, err.limit) == ("npy.gz", "b", npy_gz_bomb, CAP)
    assert f"max_member_bytes={CAP}" in str(err) and repr(npy_gz_bomb) in str(err)
    np.testing.assert_array_equal(safe_decode(max_member_bytes=CAP)(raw[2])["npy.gz"], [0, 1, 2])
    # the ratio cap: 50 MiB of output from ~50 KiB is refused past the 16 MiB floor even under a large size cap
    with Peak() as peak, pytest.raises(MemberTooLargeError, match="max_ratio=100"):
        safe_decode(max_member_bytes=DEFAULT_MAX_MEMBER_BYTES, max_ratio=100)(raw[1])
    assert peak.bytes < 40 * MiB


def test_gz_bomb_counted_by_the_decoder_stage_and_the_stream(npy_gz_bomb, tmp_path):
    dec = safe_decode(max_member_bytes=CAP, handler=SKIP)
    assert _keys(dec(iter_shard_samples(npy_gz_bomb))) == ["a", "c"]
    assert (dec.stats["skipped"], dec.stats["oversized"], dec.stats["unsafe"]) == (1, 1, 0)

    ds = WeightedWebDataset(npy_gz_bomb, num_classes=2, shuffle=False, handler=SKIP, max_member_bytes=CAP)
    with Peak() as peak:
        assert _keys(ds) == ["a", "c"]
    assert peak.bytes < 2 * CAP
    assert (ds.stats["skipped_samples"], ds.stats["oversized"]) == (1, 1)
    assert any("'npy.gz'" in e and "__key__='b'" in e for e in ds.stats["events"])
    with pytest.raises(MemberTooLargeError, match="max_member_bytes"):
        list(WeightedWebDataset(npy_gz_bomb, num_classes=2, shuffle=False, max_member_bytes=CAP))

    rep = inspect_shards(npy_gz_bomb, max_member_bytes=CAP)
    assert not rep.ok and rep.shards[0].oversized_members == ["b.npy.gz"]


def test_stream_counts_a_tar_bomb_with_workers(tmp_path, tar_gz_bomb):
    ok = _healthy(tmp_path)
    ds = WeightedWebDataset([tar_gz_bomb, ok], num_classes=2, shuffle=False, handler=SKIP, max_member_bytes=CAP)
    loader = StatefulDataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda b: [s["__key__"] for s in b])
    assert sorted(k for b in loader for k in b) == ["a", "x0", "x1", "x2"]
    stats = stream_stats(loader.state_dict())
    assert (stats["shard_errors"], stats["oversized"], stats["readers"]) == (1, 1, 2)


def test_array_header_announcing_more_than_its_data_is_not_allocated():
    """An .npy header announcing 2 GiB over 16 bytes of data: np.load would allocate the 2 GiB before reading."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (2**31,)})
    huge = buf.getvalue() + bytes(16)
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as z:
        z.writestr("x.npy", huge)
    for member, payload in (("npy", huge), ("npz", npz.getvalue())):
        with Peak() as peak, pytest.raises(MemberDecodeError, match="truncated") as info:
            safe_decode()({"__key__": "k", member: payload})
        assert peak.bytes < MiB and not isinstance(info.value, UnsafeMemberError)


def test_zip_members_are_capped_before_loading(tmp_path):
    """``.npz`` and ``.pth`` are zip files: a deflated entry announcing 50 MiB is refused from its directory."""
    npz = io.BytesIO()
    np.savez_compressed(npz, x=np.zeros(50 * MiB // 4, np.float32))
    pth = io.BytesIO()
    torch.save({"w": torch.zeros(50 * MiB // 4)}, pth)
    src = zipfile.ZipFile(io.BytesIO(pth.getvalue()))
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    dec = safe_decode(max_member_bytes=CAP)
    for member, data in (("npz", npz.getvalue()), ("pth", deflated.getvalue())):
        assert len(data) < MiB
        with Peak() as peak, pytest.raises(MemberTooLargeError) as info:
            dec({"__key__": "k", member: data})
        assert peak.bytes < MiB and info.value.member == member and info.value.limit == CAP


def test_image_over_the_cap_is_refused_from_its_header():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2048, 2048)).save(buf, format="PNG")  # 12 MiB of pixels in ~40 KiB
    with Peak() as peak, pytest.raises(MemberTooLargeError, match=f"max_member_bytes={CAP}"):
        safe_decode("rgb8", max_member_bytes=CAP)({"__key__": "k", "png": buf.getvalue()})
    assert peak.bytes < MiB
    assert safe_decode("rgb8")({"__key__": "k", "png": buf.getvalue()})["png"].shape == (2048, 2048, 3)


def test_size_arguments_are_checked():
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises((TypeError, ValueError), match="max_member_bytes"):
            safe_decode(max_member_bytes=bad)
        with pytest.raises((TypeError, ValueError), match="max_member_bytes"):
            strict_tarfile_to_samples(max_member_bytes=bad)
    for bad in (0, 0.5, -2.0, float("nan"), float("inf"), "9"):
        with pytest.raises((TypeError, ValueError), match="max_ratio"):
            safe_decode(max_ratio=bad)
        with pytest.raises((TypeError, ValueError), match="max_ratio"):
            inspect_shards("x.tar", max_ratio=bad)


# ------------------------------------------------------------------------------- 3. classification of refusals
class SystemCall:
    """Unpickling runs ``touch path`` through ``os.system``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_that_calls_os_system_is_counted_as_unsafe(tmp_path):
    marker = str(tmp_path / "MARKER")
    evil = _torch_bytes({"state": SystemCall(marker)})
    samples = [
        {"__key__": "a", "pth": evil},
        {"__key__": "b", "pth.gz": gzip.compress(evil)},
        {"__key__": "c", "pt": pickle.dumps(SystemCall(marker))},  # a bare pickle, not torch.save's zip
        {"__key__": "d", "pth": b"PK\x03\x04 not really a zip"},  # corrupt: not unsafe
        {"__key__": "e", "pth": _torch_bytes({"w": torch.arange(3)})},
    ]
    for s in samples[:3]:
        with pytest.raises(UnsafeMemberError, match="posix.system|os.system") as info:
            safe_decode()(s)
        assert info.value.key == s["__key__"] and "allow_unsafe=True" in str(info.value)
    with pytest.raises(MemberDecodeError) as info:
        safe_decode()(samples[3])
    assert not isinstance(info.value, UnsafeMemberError)
    dec = safe_decode(handler=SKIP)
    assert _keys(dec(iter(samples))) == ["e"]
    assert (dec.stats["skipped"], dec.stats["unsafe"]) == (4, 3)
    assert not os.path.exists(marker)


def test_teacher_reader_counts_the_unsafe_pth(tmp_path):
    marker = str(tmp_path / "MARKER")
    url = _tar(tmp_path / "t-000000.tar", [("a.pth", _torch_bytes({"s": SystemCall(marker)})), ("b.cls", b"1")])
    reader = read_teacher_outputs(url, handler=SKIP)
    assert _keys(reader) == ["b"]
    assert (reader.stats["unsafe"], reader.stats["skipped"]) == (1, 1)
    assert not os.path.exists(marker)


def test_inspect_classifies_compound_extensions(tmp_path):
    marker = str(tmp_path / "MARKER")
    payload = pickle.dumps(SystemCall(marker))
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = SystemCall(marker), 1
    obj_npz = io.BytesIO()
    np.savez(obj_npz, x=np.zeros(2), y=obj)
    import bz2
    import lzma

    entries = [
        ("a.cls", b"0"), ("a.pyd.gz", gzip.compress(payload)),
        ("b.cls", b"0"), ("b.pth.gz", gzip.compress(_torch_bytes({"s": SystemCall(marker)}))),
        ("c.cls", b"0"), ("c.pickle.bz2", bz2.compress(payload)),
        ("d.cls", b"0"), ("d.pkl.xz", lzma.compress(payload)),
        ("e.cls", b"0"), ("e.npy.gz", gzip.compress(_npy(obj))),
        ("f.cls", b"0"), ("f.npz", obj_npz.getvalue()),
        ("g.cls", b"0"), ("g.npy.gz", gzip.compress(_npy(np.zeros(3)))), ("g.txt.gz", gzip.compress(b"hi")),
        ("h.cls", b"0"), ("h.pth", _torch_bytes({"w": torch.zeros(2)})),
    ]
    url = _tar(tmp_path / "c-000000.tar", entries)
    s = inspect_shards(url).shards[0]
    assert s.count == 8
    assert s.unsafe_members == ["a.pyd.gz", "b.pth.gz", "c.pickle.bz2", "d.pkl.xz", "e.npy.gz", "f.npz", "h.pth"]
    # what the default decoder refuses although its name looks like data: problems
    assert len(s.problems) == 3
    assert "'b'" in s.problems[0] and "'pth.gz'" in s.problems[0] and "posix.system" in s.problems[0]
    assert "'e'" in s.problems[1] and "object dtype" in s.problems[1]
    assert "'f'" in s.problems[2] and "'y'" in s.problems[2] and "object dtype" in s.problems[2]
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------ 7./8. repeated, reserved, non-UTF-8 names
BAD_NAMES = {
    "case": [("a.cls", b"0"), ("a.CLS", b"1")],
    "url": [("a.cls", b"0"), ("a.__url__", b"elsewhere.tar")],
    "key": [("a.cls", b"0"), ("a.__key__", b"z")],
    "bad": [("a.cls", b"0"), ("a.__bad__", b"1")],  # webdataset drops such a sample silently
    "utf8": [("a\udcff.cls", b"0")],  # the byte 0xff: tarfile decodes names with surrogateescape
}


def _bad_shard(tmp_path, kind: str) -> str:
    entries = [("p.cls", b"1"), *BAD_NAMES[kind], ("q.cls", b"0"), ("r.cls", b"1")]
    return _tar(tmp_path / f"{kind}-000000.tar", entries)


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_bad_member_names_are_named_errors(tmp_path, kind):
    url = _bad_shard(tmp_path, kind)
    with pytest.raises(MalformedSampleError) as info:
        list(iter_shard_samples(url))
    err = info.value
    assert isinstance(err, DamagedShardError) and err.url == url and repr(url) in str(err)
    assert err.key.startswith("a") and "__key__='a" in str(err)
    src = strict_tarfile_to_samples(SKIP)
    assert _keys(src([{"url": url}])) == ["p", "q", "r"]
    assert (src.stats["malformed_samples"], src.stats["lost_samples"], src.stats["damaged_shards"]) == (1, 1, 1)


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
@pytest.mark.parametrize("balance", [False, True])
def test_stream_skips_and_counts_bad_member_names(tmp_path, kind, balance):
    url = _bad_shard(tmp_path, kind)
    ds = WeightedWebDataset(url, num_classes=2, shuffle=False, handler=SKIP, balance=balance, seed=0)
    got = _keys(ds)
    assert set(got) <= {"p", "q", "r"} and (balance or got == ["p", "q", "r"])
    assert ds.stats["skipped_samples"] == 1 and ds.stats["shard_errors"] == 0
    assert repr(url) in ds.stats["events"][0] and "__key__='a" in ds.stats["events"][0]
    with pytest.raises(MalformedSampleError, match=r"__key__='a"):
        list(WeightedWebDataset(url, num_classes=2, shuffle=False, balance=balance))


def test_stream_with_a_manifest_counts_the_bad_sample_in_its_position(tmp_path):
    """With a manifest (split='samples') the bad sample still takes its position: no count mismatch."""
    man = write_shards([{"__key__": k, "cls": i % 2} for i, k in enumerate("pqrs")], str(tmp_path / "m-%06d.tar"))
    url = str(tmp_path / "m-000000.tar")
    _tar(url, [("p.cls", b"0"), ("q.cls", b"1"), ("q.CLS", b"1"), ("r.cls", b"0"), ("s.cls", b"1")])
    ds = WeightedWebDataset(None, manifest=man, num_classes=2, shuffle=False, handler=SKIP)
    assert _keys(ds) == ["p", "r", "s", "p"]  # the missing one is padded from the start (every rank yields 4)
    assert (ds.stats["skipped_samples"], ds.stats["missing_samples"], ds.stats["shard_errors"]) == (1, 0, 0)


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_inspect_reports_bad_member_names(tmp_path, kind, capsys):
    url = _bad_shard(tmp_path, kind)
    rep = inspect_shards(url)
    s = rep.shards[0]
    assert not rep.ok and s.count == 4 and len(s.problems) == 1 and "__key__='a" in s.problems[0]
    assert s.class_counts == {0: 1, 1: 2}
    assert cli.main(["inspect", url]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out


def test_teacher_reader_skips_and_counts_a_repeated_member(tmp_path):
    url = _tar(tmp_path / "t-000000.tar", [("a.cls", b"0"), ("a.CLS", b"0"), ("b.cls", b"1")])
    reader = read_teacher_outputs(url, handler=SKIP)
    assert _keys(reader) == ["b"]
    assert reader.stats["skipped"] == 1
    with pytest.raises(MalformedSampleError):
        list(read_teacher_outputs(url))


def test_healthy_shards_read_as_before(tmp_path):
    """The caps and name checks change nothing for ordinary data (webdataset's own grouping as the reference)."""
    samples = fx.make_samples(30, seed=3)
    man = fx.write(tmp_path, samples, maxcount=12)
    urls = [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    want = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    got = [s for u in urls for s in iter_shard_samples(u)]
    assert [sorted(s) for s in got] == [sorted(s) for s in want] and got == want
    assert inspect_shards(None, man).ok
