"""A manifest is a data file that travels with untrusted shards: its urls must name files inside its folder (no
shell command, scheme, absolute path, ``..`` or symlink escape), each at most once; ``inspect`` reports what the
readers refuse; and the stream checks the manifest's class histograms against the labels it reads."""

from __future__ import annotations

import json
import os

import pytest
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.cli import run_cli as run
from torch_pretrain_update.data.errors import DamagedShardError
from torch_pretrain_update.data.inspect import inspect_shards
from torch_pretrain_update.data.manifest import ShardManifest, read_manifest
from torch_pretrain_update.data.stream import WeightedWebDataset, stream_stats
from torch_pretrain_update.data.strict_samples import strict_tarfile_to_samples
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.training.teacher_reader import read_teacher_outputs


@pytest.fixture
def data(tmp_path):
    """Three shards (10, 10, 5 samples) and their manifest in ``tmp_path/data``; labels i % 3."""
    folder = tmp_path / "data"
    samples = [{"__key__": f"{i:06d}", "cls": i % 3, "txt": "x"} for i in range(25)]
    manifest = write_shards(samples, str(folder / "train-%06d.tar"), maxcount=10)
    return folder, manifest


def _doc(manifest):
    with open(manifest) as f:
        return json.load(f)


def _save(path, doc):
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def _with_url(manifest, index, url, name="hostile.json"):
    """A copy of ``manifest`` (same folder) whose ``shards[index]`` url is ``url``."""
    doc = _doc(manifest)
    doc["shards"][index]["url"] = url
    return _save(os.path.join(os.path.dirname(manifest), name), doc)


# ---------------------------------------------------------------------------------------------- 1: urls


def _hostile_urls(folder, marker):
    real = str(folder / "train-000000.tar")
    outside = folder.parent / "outside.tar"
    outside.write_bytes((folder / "train-000000.tar").read_bytes())
    os.symlink(str(outside), str(folder / "link-out.tar"))
    return [
        (f"pipe:touch {marker}; cat {real}", "scheme 'pipe:'"),
        (f"file:{real}", "scheme 'file:'"),
        ("http://example.com/train-000000.tar", "scheme 'http:'"),
        (real, "absolute path"),
        ("../outside.tar", "outside the manifest's folder"),
        ("sub/../../outside.tar", "outside the manifest's folder"),
        ("link-out.tar", "symlink"),
        ("", "empty"),
        (".", "the manifest's folder itself"),
        ("train-000000.tar\x00x", "NUL"),
    ]


def test_read_manifest_refuses_urls_that_are_not_files_inside_its_folder(data, tmp_path):
    folder, manifest = data
    marker = tmp_path / "pwned"
    for url, why in _hostile_urls(folder, marker):
        path = _with_url(manifest, 0, url)
        with pytest.raises(ValueError) as info:
            read_manifest(path)
        msg = str(info.value)
        assert path in msg and "shards[0]" in msg and repr(url) in msg and why in msg, msg
        assert "allow_unsafe_urls=True" in msg
    assert not marker.exists()


def test_read_manifest_keeps_relative_files_inside_its_folder(data):
    folder, manifest = data
    os.makedirs(folder / "sub")
    os.replace(folder / "train-000001.tar", folder / "sub" / "train-000001.tar")
    os.symlink("train-000002.tar", str(folder / "alias.tar"))  # a symlink that stays inside is fine
    doc = _doc(manifest)
    doc["shards"][0]["url"] = "sub/../train-000000.tar"
    doc["shards"][1]["url"] = "sub/train-000001.tar"
    doc["shards"][2]["url"] = "./alias.tar"
    m = read_manifest(_save(folder / "m.json", doc))
    assert m.urls == [str(folder / "train-000000.tar"), str(folder / "sub" / "train-000001.tar"),
                      str(folder / "alias.tar")]
    assert inspect_shards(manifest=m).ok


def test_every_manifest_reader_refuses_a_pipe_entry_without_running_it(data, tmp_path, capsys):
    folder, manifest = data
    marker = tmp_path / "pwned"
    hostile = _with_url(manifest, 1, f"pipe:touch {marker}; cat {folder / 'train-000001.tar'}")
    with pytest.raises(ValueError, match="scheme 'pipe:'"):
        WeightedWebDataset(None, manifest=hostile, num_classes=3)
    with pytest.raises(ValueError, match="scheme 'pipe:'"):
        read_teacher_outputs(hostile)
    with pytest.raises(ValueError, match="scheme 'pipe:'"):
        strict_tarfile_to_samples(manifest=hostile)

    report = inspect_shards(manifest=hostile)  # inspect reports it and inspects the rest
    assert not report.ok
    assert [os.path.basename(s.url) for s in report.shards] == ["train-000000.tar", "train-000002.tar"]
    assert len(report.problems) == 1 and "shards[1]" in report.problems[0] and "pipe:" in report.problems[0]

    code, out, err = run(["inspect", folder / "train-{000000..000002}.tar", "--manifest", hostile,
                          "--no-progress"], capsys)
    assert code == 1, err
    assert "scheme 'pipe:'" in out and out.strip().splitlines()[-1].startswith("DAMAGED")
    assert not marker.exists()


def test_allow_unsafe_urls_reads_a_trusted_manifest_verbatim(data):
    folder, manifest = data
    url = f"pipe:cat {folder / 'train-000001.tar'}"
    trusted = _with_url(manifest, 1, url)
    assert read_manifest(trusted, allow_unsafe_urls=True).urls[1] == url
    report = inspect_shards(manifest=trusted, allow_unsafe_urls=True)
    assert report.ok and report.num_samples == 25
    ds = WeightedWebDataset(None, manifest=trusted, allow_unsafe_urls=True, num_classes=3, shuffle=False)
    assert sorted(s["__key__"] for s in ds) == [f"{i:06d}" for i in range(25)]
    assert len(list(read_teacher_outputs(trusted, allow_unsafe_urls=True))) == 25
    with pytest.raises(TypeError, match="allow_unsafe_urls"):
        read_manifest(trusted, allow_unsafe_urls="yes")


# ---------------------------------------------------------------------------------------------- 6: duplicates


def test_read_manifest_refuses_a_shard_listed_twice(data):
    folder, manifest = data
    os.symlink("train-000000.tar", str(folder / "same.tar"))
    for alias in ("train-000000.tar", "./train-000000.tar", "sub/../train-000000.tar", "same.tar"):
        path = _with_url(manifest, 2, alias)
        with pytest.raises(ValueError) as info:
            read_manifest(path)
        msg = str(info.value)
        assert path in msg and "shards[2]" in msg and "shards[0]" in msg and "twice" in msg, msg
        with pytest.raises(ValueError, match="twice"):  # not a matter of trust: refused either way
            read_manifest(path, allow_unsafe_urls=True)


def test_stream_refuses_a_manifest_listing_a_shard_twice(data):
    folder, manifest = data
    doc = _doc(manifest)
    doc["shards"].append(dict(doc["shards"][0], url="./train-000000.tar"))
    path = _save(folder / "dup.json", doc)
    with pytest.raises(ValueError, match="twice"):
        WeightedWebDataset(None, manifest=path, num_classes=3)
    # a ShardManifest built in code is checked too
    m = read_manifest(manifest)
    with pytest.raises(ValueError, match="listed twice"):
        ShardManifest(path=m.path, shards=(*m.shards, m.shards[0]), label_key="cls", num_classes=3)


def test_inspect_reports_a_shard_listed_twice(data, capsys):
    folder, manifest = data
    doc = _doc(manifest)
    doc["shards"].append(dict(doc["shards"][0], url="./train-000000.tar"))
    path = _save(folder / "dup.json", doc)
    report = inspect_shards(manifest=path)
    assert not report.ok
    assert [s.count for s in report.shards] == [10, 10, 5] and all(s.ok for s in report.shards)
    assert len(report.problems) == 1 and "shards[3]" in report.problems[0] and "twice" in report.problems[0]

    code, out, _ = run(["inspect", folder / "train-{000000..000002}.tar", "--manifest", path, "--no-progress"],
                       capsys)
    assert code == 1 and "twice" in out

    # the same shard given twice on the command line is a problem too
    report = inspect_shards([str(folder / "train-000000.tar")] * 2, label_key="cls")
    assert not report.ok and [s.count for s in report.shards] == [10]
    assert "listed twice" in report.problems[0]


# ---------------------------------------------------------------------------------------------- 12: inspect


def test_inspect_reports_missing_label_members_without_a_manifest(tmp_path, capsys):
    samples = [{"__key__": f"{i:06d}", "txt": "x", **({"cls": 1} if i % 4 else {})} for i in range(8)]
    write_shards(samples, str(tmp_path / "u-%06d.tar"), maxcount=10, label_key=None)
    url = str(tmp_path / "u-000000.tar")

    report = inspect_shards(url, label_key="cls")
    assert not report.ok
    assert report.shards[0].problems == ["sample '000000' has no label member 'cls'",
                                         "sample '000004' has no label member 'cls'"]
    code, out, _ = run(["inspect", url, "--label-key", "cls", "--no-manifest", "--no-progress"], capsys)
    assert code == 1 and "no label member 'cls'" in out

    # without --label-key a shard where some samples are labelled and others not is a problem too
    assert not inspect_shards(url).ok
    # ... while wholly unlabelled data is fine unless a label key is asked for
    write_shards([{"__key__": f"{i:06d}", "txt": "x"} for i in range(4)], str(tmp_path / "n-%06d.tar"),
                 label_key=None)
    assert inspect_shards(str(tmp_path / "n-000000.tar")).ok
    assert not inspect_shards(str(tmp_path / "n-000000.tar"), label_key="cls").ok
    # many unlabelled samples before the first label: the first 100 are named, the rest counted
    samples = [{"__key__": f"{i:06d}", "txt": "x", **({"cls": 0} if i == 150 else {})} for i in range(151)]
    write_shards(samples, str(tmp_path / "late-%06d.tar"), maxcount=1000, label_key=None)
    problems = inspect_shards(str(tmp_path / "late-000000.tar")).shards[0].problems
    assert len(problems) == 101 and problems[99] == "sample '000099' has no label member 'cls'"
    assert problems[100] == "50 more sample(s) have no label member 'cls'"


def test_inspect_manifest_directory_names_the_file_to_pass(data, tmp_path, capsys):
    folder, manifest = data
    shard = folder / "train-000000.tar"
    code, _, err = run(["inspect", shard, "--manifest", folder, "--no-progress"], capsys)
    assert code == 2 and "does not exist" not in err
    assert "is a directory" in err and f"pass --manifest {manifest}" in err, err
    with pytest.raises(ValueError, match="is a directory.*" + os.path.basename(manifest)):
        read_manifest(folder)
    with pytest.raises(ValueError, match="is a directory.*" + os.path.basename(manifest)):
        read_teacher_outputs(folder)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text("{}")
    code, _, err = run(["inspect", shard, "--manifest", empty, "--no-progress"], capsys)
    assert code == 2 and "is a directory" in err and "holds no manifest" in err

    _save(folder / "second.json", _doc(manifest))
    code, _, err = run(["inspect", shard, "--manifest", folder, "--no-progress"], capsys)
    assert code == 2 and "second.json" in err and "train-manifest.json" in err, err

    code, _, err = run(["inspect", shard, "--manifest", tmp_path / "gone.json", "--no-progress"], capsys)
    assert code == 2 and "does not exist" in err


# ---------------------------------------------------------------------------------------------- 15: histogram


def _relabelled(manifest, folder):
    """The manifest with shard 1's histogram [3, 4, 3] changed to [5, 2, 3] (same count, wrong classes)."""
    doc = _doc(manifest)
    assert doc["shards"][1]["class_counts"] == [3, 4, 3]
    doc["shards"][1]["class_counts"] = [5, 2, 3]
    doc["class_counts"] = [11, 6, 8]
    return _save(folder / "lying.json", doc)


def test_stream_raises_on_a_class_histogram_that_differs_from_the_manifest(data):
    folder, manifest = data
    lying = _relabelled(manifest, folder)
    ds = WeightedWebDataset(None, manifest=lying, num_classes=3, seed=0)
    with pytest.raises(DamagedShardError) as info:
        list(ds)
    assert info.value.url == str(folder / "train-000001.tar")
    assert "class histogram {0: 3, 1: 4, 2: 3}" in str(info.value) and "{0: 5, 1: 2, 2: 3}" in str(info.value)
    # the true manifest streams without complaint
    assert len(list(WeightedWebDataset(None, manifest=manifest, num_classes=3, seed=0))) == 25


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_counts_a_histogram_mismatch_once_per_epoch(data, num_workers):
    folder, manifest = data
    lying = _relabelled(manifest, folder)
    ds = WeightedWebDataset(None, manifest=lying, num_classes=3, seed=0, shuffle=False,
                            handler=wds.ignore_and_continue)
    loader = StatefulDataLoader(ds, batch_size=5, num_workers=num_workers)
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(25)]  # nothing is lost: only the counts were wrong
    stats = stream_stats(loader.state_dict())
    assert stats["shard_errors"] == 1 and stats["skipped_samples"] == 0
    assert len(stats["events"]) == 1 and "class histogram" in stats["events"][0]
