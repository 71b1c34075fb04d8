"""safe_decode on real shards: every member type decodes as webdataset would, pickles never run by default."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from webdataset import autodecode, tenbin

from torch_pretrain_update.data.decode import SafeDecoder, safe_decode, safe_handler
from torch_pretrain_update.data.errors import MemberDecodeError, UnsafeMemberError


class Evil:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which creates the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_payload(kind: str, marker: str) -> tuple[str, bytes]:
    """(member name, bytes) of a malicious member of the given kind."""
    if kind in ("pyd", "pickle", "pkl"):
        return kind, pickle.dumps(Evil(marker))
    if kind == "pyd.gz":  # ShardWriter gzips members named *.gz itself
        return kind, pickle.dumps(Evil(marker))
    if kind == "pth":
        buf = io.BytesIO()
        torch.save({"state": Evil(marker)}, buf)
        return kind, buf.getvalue()
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Evil(marker), 1
    buf = io.BytesIO()
    if kind == "npy":
        np.save(buf, arr, allow_pickle=True)
    elif kind == "npz":
        np.savez(buf, ok=np.arange(3), bad=arr)
    else:
        raise AssertionError(kind)
    return kind, buf.getvalue()


def _write(path: str, samples: list[dict]) -> str:
    """Write samples with webdataset.ShardWriter; returns the one shard's path."""
    pattern = os.path.join(path, "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=1000) as sink:
        for s in samples:
            sink.write(s)
    return pattern % 0


KINDS = ["pyd", "pickle", "pkl", "pyd.gz", "pth", "npy", "npz"]


@pytest.fixture
def png_bytes() -> tuple[bytes, np.ndarray]:
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue(), rgb


def test_every_member_type_decodes_like_webdataset(tmp_path, png_bytes):
    png, rgb = png_bytes
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 7}
    pth = io.BytesIO()
    torch.save(state, pth)
    npz = io.BytesIO()
    np.savez(npz, a=np.arange(4), b=np.eye(2))
    ten = bytes(tenbin.encode_buffer([np.arange(5, dtype=np.int32)]))
    sample = {
        "__key__": "s0",
        "png": png,
        "probs.npy": _npy(probs),
        "npz": npz.getvalue(),
        "json": json.dumps({"a": [1, 2]}).encode(),
        "meta.json.gz": b'{"z": 3}',  # ShardWriter gzips *.gz members
        "txt": "héllo".encode(),
        "cls": b"3",
        "cls2": b" 12\n",
        "index": b"41",
        "pth": pth.getvalue(),
        "ten": ten,
        "bin": b"\x00\x01raw",
    }
    url = _write(str(tmp_path), [sample])
    (out,) = list(wds.WebDataset(url, shardshuffle=False).map(safe_decode()))
    assert out["__key__"] == "s0" and out["__url__"] == url
    # image: webdataset's own ImageHandler("torchrgb8") result, and the pixels written (PNG is lossless)
    assert torch.equal(out["png"], torch.from_numpy(rgb.transpose(2, 0, 1).copy()))
    np.testing.assert_array_equal(out["probs.npy"], probs)
    assert out["probs.npy"].dtype == np.float32
    assert set(out["npz"]) == {"a", "b"}
    np.testing.assert_array_equal(out["npz"]["b"], np.eye(2))
    assert out["json"] == {"a": [1, 2]} and out["meta.json.gz"] == {"z": 3}
    assert out["txt"] == "héllo"
    assert (out["cls"], out["cls2"], out["index"]) == (3, 12, 41)
    assert torch.equal(out["pth"]["w"], state["w"]) and out["pth"]["step"] == 7
    np.testing.assert_array_equal(out["ten"][0], np.arange(5, dtype=np.int32))
    assert out["bin"] == b"\x00\x01raw"

    # the same members through webdataset's default decoder (safe for these types) give the same values
    (ref,) = list(wds.WebDataset(url, shardshuffle=False).decode("torchrgb8"))
    for k in ("json", "txt", "cls", "cls2", "index", "meta.json.gz", "bin"):
        assert out[k] == ref[k], k
    assert torch.equal(out["png"], ref["png"])


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("image", ["pil", "rgb8", "l", "torchrgb"])
def test_image_specs_reuse_webdataset_image_handler(png_bytes, image):
    png, _ = png_bytes
    got = safe_decode(image)({"__key__": "k", "jpg.png": png})["jpg.png"]
    want = autodecode.ImageHandler(image)(".png", png)
    if image == "pil":
        assert isinstance(got, PIL.Image.Image) and np.array_equal(np.asarray(got), np.asarray(want))
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        np.testing.assert_array_equal(got, want)


def test_image_none_keeps_bytes_and_bad_spec_is_refused(png_bytes):
    png, _ = png_bytes
    assert safe_decode(None)({"png": png})["png"] == png
    with pytest.raises(ValueError, match="image must be None or one of .*got 'rgb9'"):
        safe_decode("rgb9")


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_member_is_refused_and_never_executed(tmp_path, kind):
    marker = str(tmp_path / f"marker-{kind}")
    member, payload = _evil_payload(kind, marker)
    url = _write(str(tmp_path), [{"__key__": "evil-0", member: payload, "cls": b"1"}])

    with pytest.raises(UnsafeMemberError) as info:
        list(wds.WebDataset(url, shardshuffle=False).map(safe_decode()))
    msg = str(info.value)
    assert f"member {member!r}" in msg and "__key__='evil-0'" in msg and url in msg
    assert "allow_unsafe=True" in msg
    assert info.value.member == member and info.value.key == "evil-0" and info.value.url == url
    assert not os.path.exists(marker)

    # the member-level handler for .decode(): webdataset wraps our refusal in its DecodingError
    with pytest.raises(autodecode.DecodingError) as info2:
        list(wds.WebDataset(url, shardshuffle=False).decode(safe_handler()))
    assert isinstance(info2.value.__cause__, UnsafeMemberError)
    assert info2.value.key == "evil-0"
    assert not os.path.exists(marker)

    # opting in really runs the payload: the refusal above is what kept the marker away
    list(wds.WebDataset(url, shardshuffle=False).map(safe_decode(allow_unsafe=True)))
    assert os.path.exists(marker)


@pytest.mark.parametrize("kind", ["pyd", "pickle", "pkl", "pyd.gz", "pth"])
def test_plain_webdataset_decode_executes_the_payload(tmp_path, kind):
    """Why safe_decode exists: webdataset 1.0.2's default ``.decode()`` runs these payloads."""
    marker = str(tmp_path / f"marker-{kind}")
    member, payload = _evil_payload(kind, marker)
    url = _write(str(tmp_path), [{"__key__": "evil-0", member: payload}])
    assert not os.path.exists(marker)
    list(wds.WebDataset(url, shardshuffle=False).decode())
    assert os.path.exists(marker)


def test_plain_webdataset_refuses_object_npy(tmp_path):
    """Documented fact: an object .npy is already refused by webdataset (numpy's allow_pickle=False)."""
    marker = str(tmp_path / "marker-npy")
    member, payload = _evil_payload("npy", marker)
    url = _write(str(tmp_path), [{"__key__": "evil-0", member: payload}])
    with pytest.raises(autodecode.DecodingError) as info:
        list(wds.WebDataset(url, shardshuffle=False).decode())
    assert "allow_pickle" in str(info.value.__cause__)
    assert not os.path.exists(marker)


def test_stage_with_skipping_handler_counts_refusals(tmp_path):
    marker = str(tmp_path / "marker")
    good = [{"__key__": f"g{i}", "cls": str(i).encode(), "json": b"{}"} for i in range(5)]
    evil = {"__key__": "evil", "pyd": pickle.dumps(Evil(marker)), "cls": b"9"}
    broken = {"__key__": "broken", "json": b"{not json", "cls": b"8"}
    url = _write(str(tmp_path), good[:2] + [evil] + good[2:4] + [broken] + good[4:])
    dec = safe_decode(handler=wds.ignore_and_continue)
    pipe = wds.DataPipeline(wds.SimpleShardList(url), wds.tarfile_to_samples(), dec)
    assert [s["cls"] for s in pipe] == [0, 1, 2, 3, 4]
    assert dec.stats == {"seen": 7, "decoded": 5, "skipped": 2, "unsafe": 1, "oversized": 0}
    assert not os.path.exists(marker)
    # .compose() on the fluid interface works the same way
    dec2 = safe_decode(handler=wds.ignore_and_continue)
    assert len(list(wds.WebDataset(url, shardshuffle=False).compose(dec2))) == 5
    assert dec2.stats["skipped"] == 2


def test_stage_reraises_by_default_and_stops_with_ignore_and_stop(tmp_path):
    samples = [{"__key__": "a", "cls": b"1"}, {"__key__": "b", "cls": b"x"}, {"__key__": "c", "cls": b"2"}]
    with pytest.raises(MemberDecodeError, match=r"member 'cls' of sample __key__='b'.*ValueError"):
        list(safe_decode()(iter(samples)))
    dec = safe_decode(handler=wds.ignore_and_stop)
    assert [s["cls"] for s in dec(iter(samples))] == [1]
    assert dec.stats["skipped"] == 1 and dec.stats["seen"] == 2


@pytest.mark.parametrize(
    ("member", "data", "pattern"),
    [
        ("json", b"{oops", r"could not decode member 'json' of sample __key__='k'.*JSONDecodeError"),
        ("cls", b"1.5", r"member 'cls'.*invalid literal"),
        ("txt", b"\xff\xfe\xfa", r"member 'txt'.*UnicodeDecodeError"),
        ("npy", _npy(np.arange(100))[:-40], r"member 'npy'.*"),
        ("pth", b"not a zip", r"member 'pth'"),
        ("png", b"\x89PNG broken", r"member 'png'"),
    ],
)
def test_corrupt_members_raise_named_errors(member, data, pattern):
    with pytest.raises(MemberDecodeError, match=pattern) as info:
        safe_decode()({"__key__": "k", "__url__": "u.tar", member: data})
    assert "__url__='u.tar'" in str(info.value)
    assert not isinstance(info.value, UnsafeMemberError)


def test_only_partial_and_type_checks():
    dec = safe_decode(only=["cls"])
    assert dec({"cls": b"2", "json": b"{}"}) == {"cls": 2, "json": b"{}"}
    with pytest.raises(MemberDecodeError, match="expected bytes, got int.*partial=True"):
        safe_decode()({"__key__": "k", "cls": 2})
    assert safe_decode(partial=True)({"cls": 2, "txt": b"a"}) == {"cls": 2, "txt": "a"}
    with pytest.raises(TypeError, match="sample must be a dict"):
        safe_decode().decode_sample([1, 2])
    with pytest.raises(TypeError, match="allow_unsafe must be a bool"):
        safe_decode(allow_unsafe="yes")
    with pytest.raises(TypeError, match="handler must be callable"):
        SafeDecoder(handler=3)
    # metadata bytes are turned into str, as webdataset does
    assert safe_decode()({"__key__": b"abc", "cls": b"1"})["__key__"] == "abc"


def test_allow_unsafe_round_trips_trusted_pickles():
    obj = {"a": [1, 2, (3, 4)]}
    arr = np.array([{"x": 1}, None], dtype=object)
    sample = {"pyd": pickle.dumps(obj), "npy": _npy_obj(arr)}
    out = safe_decode(allow_unsafe=True)(sample)
    assert out["pyd"] == obj and out["npy"][0] == {"x": 1} and out["npy"][1] is None


def _npy_obj(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()
