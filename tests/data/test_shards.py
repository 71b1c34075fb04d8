"""write_shards / read_manifest / strict shard reading / inspect_shards, on real shards written by
webdataset.ShardWriter and damaged byte by byte."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from tests._support import shard_fixtures as fx
from torch_pretrain_update.data.errors import DamagedShardError
from torch_pretrain_update.data.inspect import inspect_shards
from torch_pretrain_update.data.labels import parse_label
from torch_pretrain_update.data.manifest import expand_urls, read_manifest
from torch_pretrain_update.data.strict_samples import strict_tarfile_to_samples
from torch_pretrain_update.data.tar_reader import iter_shard_files, iter_shard_samples
from torch_pretrain_update.data.write import write_shards


def _recount(path: str) -> tuple[int, Counter]:
    """Independent count of a shard: plain tarfile (random access), keys and .cls members."""
    keys, labels = set(), Counter()
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            keys.add(key)
            if ext == "cls":
                labels[int(tf.extractfile(m).read())] += 1
    return len(keys), labels


def test_write_shards_manifest_matches_an_independent_recount(tmp_path):
    samples = fx.make_samples(203, num_classes=3, seed=1)
    man_path = fx.write(tmp_path, samples, maxcount=40, maxsize=20000)
    assert man_path == os.path.join(str(tmp_path), "train-manifest.json")
    raw = json.load(open(man_path))
    assert raw["format"] == "torch-pretrain-update/shards" and raw["version"] == 1
    man = read_manifest(man_path)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar"))
    assert [os.path.basename(u) for u in man.urls] == files
    assert all(os.path.isabs(u) for u in man.urls)
    counts = [s.count for s in man.shards]
    assert len(set(counts)) > 1, "maxsize should have made uneven shards"
    assert max(counts) <= 40
    total = Counter()
    for info in man.shards:
        n, labels = _recount(info.url)
        assert n == info.count
        assert list(info.class_counts) == [labels[c] for c in range(3)]
        assert info.bytes == os.path.getsize(info.url)
        assert info.sha256 == hashlib.sha256(open(info.url, "rb").read()).hexdigest()
        total += labels
    expected = Counter(s["cls"] for s in samples)
    assert man.num_samples == 203 and man.class_counts == [expected[c] for c in range(3)]
    assert total == expected
    # relative urls: the directory can be moved
    assert all(not os.path.isabs(e["url"]) for e in raw["shards"])
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in files + ["train-manifest.json"]:
        (moved / f).write_bytes((tmp_path / f).read_bytes())
    man2 = read_manifest(moved / "train-manifest.json")
    assert man2.urls == [str(moved / f) for f in files]


def test_write_shards_options_and_label_types(tmp_path):
    samples = [
        {"__key__": "a", "cls": np.int64(2), "txt": "a"},
        {"__key__": "b", "cls": torch.tensor(0), "txt": "b"},
        {"__key__": "c", "cls": b"1", "txt": "c"},
        {"__key__": "d", "cls": "2", "txt": "d"},
    ]
    path = write_shards(samples, str(tmp_path / "d" / "x-%03d.tar"), maxcount=3, num_classes=5,
                        manifest_path=str(tmp_path / "m.json"))
    assert path == str(tmp_path / "m.json")
    man = read_manifest(path)
    assert man.num_classes == 5 and man.class_counts == [1, 1, 2, 0, 0]
    assert [s.count for s in man.shards] == [3, 1]
    # numpy / torch labels were normalised to plain ints before webdataset's str() encoding
    got = [int(r["data"]) for r in iter_shard_files(man.urls[0]) if r["fname"].endswith(".cls")]
    assert got == [2, 0, 1]
    # unlabelled data
    p2 = write_shards([{"__key__": "u", "txt": "x"}], str(tmp_path / "u-%d.tar"), label_key=None)
    m2 = read_manifest(p2)
    assert m2.num_classes == 0 and m2.shards[0].class_counts == () and m2.num_samples == 1


@pytest.mark.parametrize(
    "samples, kwargs, exc, words",
    [
        ([{"__key__": "a", "cls": 0}], {"pattern": "no-field.tar"}, ValueError, ["pattern", "no-field.tar"]),
        ([{"__key__": "a", "cls": 0}], {"pattern": "a-%d-%d.tar"}, ValueError, ["pattern"]),
        ([], {}, ValueError, ["samples", "empty"]),
        ([{"cls": 0}], {}, ValueError, ["__key__", "samples[0]"]),
        ([{"__key__": "a"}], {}, ValueError, ["'cls'", "'a'"]),
        ([{"__key__": "a", "cls": -1}], {}, ValueError, ["negative", "-1"]),
        ([{"__key__": "a", "cls": 1.5}], {}, ValueError, ["1.5", "not an integer"]),
        ([{"__key__": "a", "cls": "x"}], {}, ValueError, ["'x'", "not an integer"]),
        ([{"__key__": "a", "cls": 3}], {"num_classes": 3}, ValueError, ["num_classes=3", "3"]),
        ([{"__key__": "a", "cls": 0}, {"__key__": "a", "cls": 1}], {}, ValueError, ["'a'", "repeats"]),
        ([{"__key__": "a", "cls": 0}], {"maxcount": 0}, ValueError, ["maxcount", "0"]),
        (["not a dict"], {}, TypeError, ["samples[0]", "str"]),
    ],
)
def test_write_shards_rejects_bad_input(tmp_path, samples, kwargs, exc, words):
    kwargs = dict(kwargs)
    pattern = str(tmp_path / kwargs.pop("pattern", "t-%04d.tar"))
    with pytest.raises(exc) as info:
        write_shards(samples, pattern, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_read_manifest_rejects_bad_files(tmp_path):
    p = tmp_path / "m.json"
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(p)
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        read_manifest(p)
    good = fx.write(tmp_path, fx.make_samples(12), maxcount=5)
    doc = json.load(open(good))
    doc["shards"][0]["class_counts"][0] += 1  # no longer sums to count
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"shards\[0\].*summing to count"):
        read_manifest(p)
    doc = json.load(open(good))
    doc["shards"][1]["count"] = -2
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"shards\[1\].*count must be an int >= 0; got -2"):
        read_manifest(p)


def test_parse_label():
    values = (3, np.int32(4), torch.tensor([5]), b" 6\n", "7", np.array(8))
    assert [parse_label(v) for v in values] == [3, 4, 5, 6, 7, 8]
    for bad in (1.0, True, torch.tensor(1.0), np.array([1, 2]), "1.5", b"", None):
        with pytest.raises(ValueError):
            parse_label(bad)


def test_expand_urls():
    assert expand_urls("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_urls("a.tar::b-{1..2}.tar") == ["a.tar", "b-1.tar", "b-2.tar"]
    assert expand_urls(["x.tar", "y.tar"]) == ["x.tar", "y.tar"]
    with pytest.raises(TypeError, match="urls"):
        expand_urls(3)
    with pytest.raises(ValueError, match="at least one"):
        expand_urls([])


# ---------------------------------------------------------------------------------------------------------------
# damage


@pytest.fixture
def one_shard(tmp_path):
    samples = fx.make_samples(10, vary=False)
    man = fx.write(tmp_path, samples, maxcount=10)
    url = read_manifest(man).urls[0]
    # members: s00000.cls, s00000.npy, s00000.txt, s00001.cls, ...
    return man, url, samples


DAMAGE = {
    # name: (damage, samples delivered before it, reason fragment). Members are <key>.cls/.npy/.txt, so member 12
    # is the 5th sample's first. A sample is only delivered once the next one starts (webdataset's
    # group_by_keys), so damage at a sample boundary also holds back the 4th: it may have lost members.
    "truncated_in_member": (lambda p: fx.truncate_in_member(p, 13), 4, "truncated inside member"),
    "truncated_at_header": (lambda p: fx.truncate_at_header(p, 12), 3, "truncated at a header boundary"),
    "corrupt_header_mid": (lambda p: fx.corrupt_header(p, 12), 3, "invalid (corrupt) header"),
    "empty_file": (fx.empty_file, 0, "empty file"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_strict_reader_detects_every_damage_without_a_manifest(one_shard, kind):
    _, url, samples = one_shard
    damage, good, fragment = DAMAGE[kind]
    damage(url)
    seen = []
    with pytest.raises(DamagedShardError) as info:
        for s in iter_shard_samples(url):
            seen.append(s["__key__"])
    assert info.value.url == url and fragment in str(info.value) and url in str(info.value)
    if kind != "empty_file":
        assert ("'s00004.npy'" if kind == "truncated_in_member" else "after member 's00003.txt'") in str(info.value)
    # the complete samples before the damage are delivered, the cut-off one never is
    assert seen == [s["__key__"] for s in samples[:good]]


def test_plain_webdataset_loses_the_rest_of_a_shard_silently_on_a_corrupt_header(one_shard):
    # The measured fact the manifest and the end-of-archive check exist for (see DESIGN.md).
    _, url, _ = one_shard
    fx.corrupt_header(url, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False, handler=wds.reraise_exception)]
    assert len(keys) == 4  # no exception: 6 of 10 samples vanished
    with pytest.raises(DamagedShardError):
        list(iter_shard_samples(url))


@pytest.mark.parametrize("kind", ["truncated_at_header", "corrupt_header_mid"])
def test_webdataset_tarfile_to_samples_stops_silently_where_the_strict_source_raises(one_shard, kind):
    # Documents webdataset 1.0.2 (passes as long as it behaves so): its own pipeline source ends the shard at
    # the damage with no error under reraise_exception, and has no count to read under a skipping handler.
    man, url, samples = one_shard
    DAMAGE[kind][0](url)
    for handler in (wds.reraise_exception, wds.ignore_and_continue):
        plain = wds.tarfile_to_samples(handler=handler)
        keys = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([url]), plain)]
        assert keys == [s["__key__"] for s in samples[:4]]  # 6 of 10 lost, nothing raised
        assert not hasattr(plain, "stats")
    with pytest.raises(DamagedShardError, match=re.escape(DAMAGE[kind][2])):
        list(wds.DataPipeline(wds.SimpleShardList([url]), strict_tarfile_to_samples()))


def _three_shards(tmp_path):
    samples = fx.make_samples(30, vary=False)
    man = fx.write(tmp_path, samples, maxcount=10)
    return man, read_manifest(man).urls, [s["__key__"] for s in samples]


def _read(urls, source):
    return [(s["__key__"], s["__url__"]) for s in wds.DataPipeline(wds.SimpleShardList(urls), source)]


def test_strict_source_equals_webdataset_on_healthy_shards(tmp_path):
    man, urls, keys = _three_shards(tmp_path)
    plain = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    for source in (strict_tarfile_to_samples(), strict_tarfile_to_samples(manifest=man)):
        strict = list(wds.DataPipeline(wds.SimpleShardList(urls), source))
        assert [s["__key__"] for s in strict] == keys
        # same bytes; plus __local_path__ for local shards, as wds.WebDataset sets it
        assert [{**s, "__local_path__": s["__url__"]} for s in plain] == strict
        assert {k: v for k, v in source.stats.items() if k != "events"} == {
            "shards": 3, "samples": 30, "damaged_shards": 0, "lost_samples": 0, "malformed_samples": 0,
            "oversized": 0}
    # .compose and a second pass: counts add up over passes
    source = strict_tarfile_to_samples(manifest=read_manifest(man))
    pipe = wds.DataPipeline(wds.SimpleShardList(urls)).compose(source)
    assert [s["__key__"] for s in pipe] == keys and len(list(pipe)) == 30
    assert source.stats["samples"] == 60 and source.stats["shards"] == 6


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_strict_source_names_and_counts_damage(tmp_path, kind):
    man, urls, keys = _three_shards(tmp_path)
    damage, good, fragment = DAMAGE[kind]
    damage(urls[1])
    with pytest.raises(DamagedShardError) as info:
        _read(urls, strict_tarfile_to_samples())
    assert info.value.url == urls[1] and fragment in str(info.value)
    # skipping: the rest of shard 1 is skipped, shard 2 still read; the manifest gives the exact loss
    source = strict_tarfile_to_samples(wds.ignore_and_continue, manifest=man)
    got = _read(urls, source)
    assert [k for k, _ in got] == keys[:10 + good] + keys[20:]
    assert {u for _, u in got} == ({urls[0], urls[1], urls[2]} if good else {urls[0], urls[2]})
    assert source.stats["damaged_shards"] == 1 and source.stats["lost_samples"] == 10 - good
    assert source.stats["samples"] == 20 + good and source.stats["shards"] == 3
    assert len(source.stats["events"]) == 1 and urls[1] in source.stats["events"][0]
    assert f"{good} of the manifest's 10 samples read" in source.stats["events"][0]
    # without a manifest the damage is counted, its size is unknown
    source = strict_tarfile_to_samples(wds.ignore_and_continue)
    assert len(_read(urls, source)) == 20 + good
    assert source.stats["damaged_shards"] == 1 and source.stats["lost_samples"] == 0
    # a handler returning False ends the stream at the damaged shard (webdataset's convention)
    source = strict_tarfile_to_samples(wds.ignore_and_stop, manifest=man)
    assert [k for k, _ in _read(urls, source)] == keys[:10 + good]
    assert source.stats["damaged_shards"] == 1 and source.stats["lost_samples"] == 10 - good


def test_strict_source_checks_counts_against_the_manifest(tmp_path):
    man, urls, keys = _three_shards(tmp_path)
    short = fx.make_samples(30, vary=False)[10:17]  # a well-formed shard with 3 samples fewer than written
    with wds.TarWriter(urls[1]) as w:
        for s in short:
            w.write(s)
    assert len(_read(urls, strict_tarfile_to_samples())) == 27  # only the manifest can tell
    with pytest.raises(DamagedShardError, match="7 samples read but the manifest says 10") as info:
        _read(urls, strict_tarfile_to_samples(manifest=man))
    assert info.value.url == urls[1]
    source = strict_tarfile_to_samples(wds.ignore_and_continue, manifest=man)
    assert len(_read(urls, source)) == 27 and source.stats["lost_samples"] == 3
    longer = fx.make_samples(30, vary=False)[10:21]
    with wds.TarWriter(urls[1]) as w:
        for s in longer:
            w.write({**s, "__key__": "x" + s["__key__"]})
    with pytest.raises(DamagedShardError, match=r"holds 11 samples but its manifest count is 10 \(1 extra\)"):
        _read(urls, strict_tarfile_to_samples(manifest=man))


def test_strict_source_in_dataloader_workers(tmp_path):
    man, urls, keys = _three_shards(tmp_path)
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, strict_tarfile_to_samples(manifest=man),
                            wds.map(lambda s: s["__key__"]))
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=2)
    assert sorted(loader) == keys


def test_strict_source_rejects_bad_arguments(tmp_path):
    man, urls, _ = _three_shards(tmp_path)
    with pytest.raises(TypeError, match="handler must be callable"):
        strict_tarfile_to_samples("skip")
    with pytest.raises(TypeError, match="manifest must be a path"):
        strict_tarfile_to_samples(manifest=3)
    with pytest.raises(TypeError, match="str 'url'"):
        list(strict_tarfile_to_samples()(iter([urls[0]])))
    other = fx.write(tmp_path, fx.make_samples(3, vary=False), maxcount=10, name="other")
    with pytest.raises(ValueError, match="not listed in the manifest") as info:
        _read(read_manifest(other).urls, strict_tarfile_to_samples(manifest=man))
    assert read_manifest(other).urls[0] in str(info.value)


def test_strict_reader_accepts_healthy_and_empty_archives(tmp_path, one_shard):
    _, url, samples = one_shard
    assert [s["__key__"] for s in iter_shard_samples(url)] == [s["__key__"] for s in samples]
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert list(iter_shard_files(str(empty))) == []
    with pytest.raises(DamagedShardError, match="cannot be opened"):
        list(iter_shard_files(str(tmp_path / "missing.tar")))


# ---------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_healthy_shards_matches_manifest(tmp_path):
    samples = fx.make_samples(57, seed=4)
    man_path = fx.write(tmp_path, samples, maxcount=20)
    man = read_manifest(man_path)
    rep = inspect_shards(None, man_path)
    assert rep.ok and rep.problems == []
    assert [s.count for s in rep.shards] == [20, 20, 17] == [s.count for s in man.shards]
    expected = Counter(s["cls"] for s in samples)
    assert rep.class_counts == dict(sorted(expected.items())) and rep.num_samples == 57
    for s, info in zip(rep.shards, man.shards):
        assert s.sha256 == info.sha256 and s.bytes == info.bytes and s.expected_count == info.count
    text = rep.format()
    assert "OK" in text.splitlines()[-1] and "train-000002.tar" in text
    assert json.loads(json.dumps(rep.to_dict()))["ok"] is True
    # the same through a brace pattern, and without a manifest
    rep2 = inspect_shards(str(tmp_path / "train-{000000..000002}.tar"))
    assert rep2.ok and rep2.num_samples == 57 and rep2.shards[0].expected_count is None


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_inspect_reports_damage_and_the_shortfall(tmp_path, kind):
    samples = fx.make_samples(30, vary=False)
    man_path = fx.write(tmp_path, samples, maxcount=10)
    url = read_manifest(man_path).urls[1]
    damage, good, fragment = DAMAGE[kind]
    damage(url)
    rep = inspect_shards(None, man_path)
    assert not rep.ok
    bad = rep.shards[1]
    assert bad.count == good
    assert any(fragment in p for p in bad.problems)
    assert any(f"{good} samples read but the manifest says 10 (missing {10 - good})" in p for p in bad.problems)
    assert rep.shards[0].ok and rep.shards[2].ok
    assert "DAMAGED: 1 shard(s)" in rep.format()


def test_inspect_catches_what_only_the_manifest_can(tmp_path):
    samples = fx.make_samples(30, vary=False)
    man_path = fx.write(tmp_path, samples, maxcount=10)
    urls = read_manifest(man_path).urls
    # a well-formed shard with fewer samples (rewritten): the tar itself is fine
    other = write_shards(samples[10:17], str(tmp_path / "other" / "o-%06d.tar"), maxcount=10)
    os.replace(read_manifest(other).urls[0], urls[1])
    # a byte flipped inside member data: same size, same count
    data = bytearray(open(urls[2], "rb").read())
    m = fx.members(urls[2])[2]
    data[m.offset_data] ^= 0xFF
    open(urls[2], "wb").write(bytes(data))
    rep_plain = inspect_shards(urls)
    assert rep_plain.ok  # without the manifest both look healthy: documented limit
    rep = inspect_shards(urls, man_path)
    assert [s.ok for s in rep.shards] == [True, False, False]
    assert any("7 samples read but the manifest says 10 (missing 3)" in p for p in rep.shards[1].problems)
    assert rep.shards[2].problems == ["SHA-256 differs from the manifest's (the file was modified)"]
    # a shard of the manifest left out of the urls
    rep3 = inspect_shards(urls[:2], man_path)
    assert any("not among the urls" in p for p in rep3.problems) and not rep3.ok


def test_inspect_reports_bad_samples_and_unsafe_members(tmp_path):
    marker = tmp_path / "MARKER"
    samples = [
        {"__key__": "a", "cls": 0, "npy": np.zeros(2, np.float32)},
        {"__key__": "b", "npy": np.zeros(2, np.float32)},  # no label
        {"__key__": "c", "cls": 7, "npy": np.zeros(2, np.float32)},  # out of range for num_classes=3
        {"__key__": "d", "cls": 1, "pyd": fx.pickle_bytes(str(marker))},  # pickle member, no npy
    ]
    url = str(tmp_path / "bad-000000.tar")
    with wds.TarWriter(url) as w:
        for s in samples:
            w.write(s)
    rep = inspect_shards(url, required_keys=["npy"], num_classes=3)
    s = rep.shards[0]
    assert s.count == 4 and not s.ok
    assert any("'d' misses required member(s) ['npy']" in p for p in s.problems)
    assert any("'c': label 7 out of range [0, 3)" in p for p in s.problems)
    assert s.unsafe_members == ["d.pyd"]
    assert s.class_counts == {0: 1, 1: 1}
    assert not marker.exists()
    rep2 = inspect_shards(url, read_manifest(write_shards([{"__key__": "z", "cls": 0}], str(tmp_path / "z-%d.tar"))))
    assert any("'b' has no label member 'cls'" in p for p in rep2.shards[0].problems)
    assert any("not listed in the manifest" in p for p in rep2.shards[0].problems)


def test_inspect_reports_an_object_npy_from_its_header_only(tmp_path):
    marker = tmp_path / "MARKER"
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = fx.MarkerPayload(str(marker)), 1
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    url = str(tmp_path / "npy-000000.tar")
    with wds.TarWriter(url) as w:
        w.write({"__key__": "a", "cls": 0, "npy": np.zeros(3, np.float32)})
        w.write({"__key__": "b", "cls": 1, "npy": buf.getvalue()})  # bytes: stored as they are
        w.write({"__key__": "c", "cls": 1, "npy": np.arange(4, dtype=np.int64).reshape(2, 2)})
    s = inspect_shards(url).shards[0]
    assert s.count == 3 and s.class_counts == {0: 1, 1: 2}
    assert s.unsafe_members == ["b.npy"]
    assert s.problems == ["sample 'b', member 'npy': the .npy array has an object dtype (a pickle inside; "
                          "never decoded)"]
    assert not marker.exists()


def test_inspect_needs_urls_or_manifest():
    with pytest.raises(ValueError, match="urls_or_pattern or a manifest"):
        inspect_shards()
