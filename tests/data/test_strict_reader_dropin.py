"""``strict_tarfile_to_samples`` as a drop-in for webdataset's ``tarfile_to_samples``.

Cases ported from webdataset's own pipeline tests (``tests/webdataset/test_pipeline.py``: select_files,
rename_files, ``::`` lists, shuffled and resampled shard lists, ``.gz`` members, a shard cut short by
``pipe:dd ... count=10`` raising ``tarfile.ReadError``, ``ignore_and_stop``), run against the strict stage on shards
written here with webdataset's ShardWriter; plus what a user migrating from webdataset met: ``__local_path__`` as
``wds.WebDataset`` sets it, the complete sample before damage inside a member kept, and a pickle refusal that says
how a stream takes the opt-in.
"""

from __future__ import annotations

import os
import pickle
import tarfile

import pytest
import webdataset as wds

from tests._support import shard_fixtures as fx
from torch_pretrain_update import (
    DamagedShardError,
    UnsafeMemberError,
    read_manifest,
    safe_decode,
    strict_tarfile_to_samples,
    write_shards,
)

N_SHARDS, PER_SHARD = 3, 30
N = N_SHARDS * PER_SHARD


def _sample(i: int) -> dict:
    s = {"__key__": f"{i:03d}", "bin": bytes([i % 251]) * 300, "cls": i % 3, "png": b"\x89PNG" + bytes(20 + i)}
    if i % 2 == 0:
        s["jpg"] = b"\xff\xd8" + bytes(i)
    return s


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """3 shards x 30 samples written with webdataset's ShardWriter."""
    folder = tmp_path_factory.mktemp("dropin")
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=PER_SHARD, verbose=0) as w:
        for i in range(N):
            w.write(_sample(i))
    return [str(folder / f"train-{s:06d}.tar") for s in range(N_SHARDS)]


def _both(urls, *args, **kwargs):
    """The same pipeline with webdataset's reader and with the strict one: (theirs, ours)."""
    theirs = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(*args, **kwargs)))
    ours = list(wds.DataPipeline(wds.SimpleShardList(urls), strict_tarfile_to_samples(*args, **kwargs)))
    return theirs, ours


def _without_local_path(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in samples]


# ----- ported from webdataset's test_pipeline.py ------------------------------------------------------------------
def select_png(name: str) -> bool:
    return name.endswith(".png")


def rename_cls(name: str) -> str:
    return name[:-4] + ".txt" if name.endswith(".cls") else name


def test_select_files(shards):
    theirs, ours = _both(shards, select_files=select_png)
    assert len(ours) == N
    assert set(ours[0]) == {"__key__", "__url__", "__local_path__", "png"}
    assert _without_local_path(ours) == theirs


def test_rename_files(shards):
    theirs, ours = _both(shards, rename_files=rename_cls)
    assert len(ours) == N
    assert "cls" not in ours[0] and int(ours[0]["txt"]) == 0 and ours[5]["txt"] == b"2"
    assert _without_local_path(ours) == theirs


def test_positional_handler_select_rename_as_webdataset(shards):
    theirs, ours = _both(shards, wds.reraise_exception, select_png, rename_cls)
    assert _without_local_path(ours) == theirs and len(ours) == N


def test_sep(shards):
    ours = list(wds.DataPipeline(wds.SimpleShardList(f"{shards[0]}::{shards[0]}"), strict_tarfile_to_samples()))
    assert len(ours) == 2 * PER_SHARD


def test_reader2_shuffled_shard_list(shards):
    pipe = wds.DataPipeline(wds.SimpleShardList(shards * 4), wds.shuffle(3), strict_tarfile_to_samples(),
                            wds.shuffle(100), wds.to_tuple("png", "cls"))
    result = list(pipe)
    assert len(result) == 4 * N and isinstance(result[0][0], bytes)


def test_reader3_resampled(shards):
    pipe = wds.DataPipeline(wds.SimpleShardList(shards), wds.resampled(10), strict_tarfile_to_samples(),
                            wds.shuffle(100), wds.to_tuple("png", "cls"))
    assert len(list(pipe)) == 10 * PER_SHARD
    assert len(list(pipe)) == 10 * PER_SHARD  # a second pass


def test_gz(tmp_path):
    url = str(tmp_path / "gz.tar")
    with wds.TarWriter(url) as w:
        w.write({"__key__": "a", "txt.gz": "hello\n"})  # the writer gzips it
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList(url), strict_tarfile_to_samples(), wds.decode())))
    assert sample["txt.gz"] == "hello\n" and "__url__" in sample


def test_dataset_eof_raises_tarfile_read_error(shards):
    """webdataset's test: a shard cut at 10 KiB by a pipe raises ``tarfile.ReadError``; so does the strict stage
    (its ``DamagedShardError`` is both a ``ValueError`` and a ``tarfile.ReadError``)."""
    url = f"pipe:dd if={shards[0]} bs=1024 count=10 2>/dev/null"
    with pytest.raises(tarfile.ReadError) as info:
        list(wds.DataPipeline(wds.SimpleShardList(url), strict_tarfile_to_samples(), wds.shuffle(5)))
    assert isinstance(info.value, DamagedShardError) and isinstance(info.value, ValueError)


def test_dataset_eof_handler_ignore_and_stop(shards):
    url = f"pipe:dd if={shards[0]} bs=1024 count=10 2>/dev/null"
    src = strict_tarfile_to_samples(handler=wds.ignore_and_stop)
    n = len(list(wds.DataPipeline(wds.SimpleShardList(url), src, wds.shuffle(5))))
    assert 0 < n < PER_SHARD and src.stats["damaged_shards"] == 1


# ----- what a migrating user met ----------------------------------------------------------------------------------
def test_local_path_is_set_as_webdataset_sets_it(shards):
    theirs = list(wds.WebDataset(shards, shardshuffle=False))
    ours = list(wds.DataPipeline(wds.SimpleShardList(shards), strict_tarfile_to_samples()))
    assert sum("__local_path__" in s for s in ours) == N
    assert ours == theirs  # every sample identical, __local_path__ included
    # file: urls give the path; a source that names its local copy (webdataset's cache) gives that copy
    ours_file = list(wds.DataPipeline(wds.SimpleShardList(["file:" + shards[0]]), strict_tarfile_to_samples()))
    assert {s["__local_path__"] for s in ours_file} == {shards[0]}
    cached = list(strict_tarfile_to_samples()([{"url": "https://host/x.tar", "local_path": shards[1]}]))
    assert len(cached) == PER_SHARD and {s["__local_path__"] for s in cached} == {shards[1]}  # read from the copy
    assert {s["__url__"] for s in cached} == {"https://host/x.tar"}


def test_pipe_urls_have_no_local_path(shards):
    ours = list(wds.DataPipeline(wds.SimpleShardList(f"pipe:cat {shards[0]}"), strict_tarfile_to_samples()))
    assert len(ours) == PER_SHARD and not any("__local_path__" in s for s in ours)


def _three_samples(tmp_path) -> str:
    url = str(tmp_path / "t.tar")
    with wds.TarWriter(url) as w:
        for i in range(3):
            w.write({"__key__": f"{i:03d}", "bin": bytes(300), "dat": bytes(300)})
    return url


def test_damage_inside_the_next_samples_member_keeps_the_complete_sample(tmp_path):
    """Cut inside ``002.bin`` (its first member): ``001`` was read whole, so it is yielded before the damage."""
    url = _three_samples(tmp_path)
    fx.truncate_in_member(url, 4)  # members: 000.bin 000.dat 001.bin 001.dat 002.bin 002.dat
    src = strict_tarfile_to_samples(wds.ignore_and_continue)
    assert [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(url), src)] == ["000", "001"]
    assert src.stats["damaged_shards"] == 1
    # under the default handler the error comes after 001
    seen = []
    with pytest.raises(DamagedShardError, match="truncated"):
        for s in wds.DataPipeline(wds.SimpleShardList(url), strict_tarfile_to_samples()):
            seen.append(s["__key__"])
    assert seen == ["000", "001"]


def test_a_sample_cut_inside_its_own_member_is_never_yielded(tmp_path):
    url = _three_samples(tmp_path)
    fx.truncate_in_member(url, 3)  # inside 001.dat: 001 is cut short (its .bin was read), 000 is whole
    src = strict_tarfile_to_samples(wds.ignore_and_continue)
    assert [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(url), src)] == ["000"]


def test_select_files_keeps_manifest_counts_and_skips_unselected_data(tmp_path):
    """Samples none of whose members is selected are not yielded (as webdataset), yet count for the manifest; an
    unselected member is never read, so it does not hit the size cap."""
    man = write_shards((_sample(i) for i in range(20)), str(tmp_path / "m-%04d.tar"), maxcount=10)
    urls = read_manifest(man).urls
    select_jpg = lambda name: name.endswith(".jpg")  # noqa: E731
    src = strict_tarfile_to_samples(wds.reraise_exception, select_jpg, manifest=man, max_member_bytes=200)
    ours = list(wds.DataPipeline(wds.SimpleShardList(urls), src))
    theirs = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(select_files=select_jpg)))
    assert [s["__key__"] for s in ours] == [f"{i:03d}" for i in range(0, 20, 2)]
    assert _without_local_path(ours) == theirs
    assert src.stats["damaged_shards"] == 0 and src.stats["lost_samples"] == 0 and src.stats["samples"] == 10


def test_bad_filter_arguments_are_refused():
    with pytest.raises(TypeError, match="select_files must be None or a callable"):
        strict_tarfile_to_samples(select_files="*.png")
    with pytest.raises(TypeError, match="rename_files must be None or a callable"):
        strict_tarfile_to_samples(rename_files={"cls": "txt"})


def test_pickle_refusal_names_the_stream_form_of_the_opt_in():
    sample = {"__key__": "a", "__url__": "u.tar", "x.pyd": pickle.dumps({"a": 1})}
    with pytest.raises(UnsafeMemberError) as info:
        safe_decode()(sample)
    text = str(info.value)
    assert "safe_decode(allow_unsafe=True)" in text and "decoder=safe_decode(allow_unsafe=True)" in text
    assert "member 'x.pyd' of sample __key__='a' (__url__='u.tar')" in text
    assert not os.environ.get("WDS_SECURE")  # the refusal is ours, not webdataset's switch
