"""Helpers for the shard and stream tests: real shards written with webdataset.ShardWriter (through write_shards)
and byte-level damage at member boundaries found with Python's tarfile on the intact file."""

from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np

from torch_pretrain_update.data.write import write_shards


def make_samples(n: int, *, num_classes: int = 3, seed: int = 0, vary: bool = True, prefix: str = "s") -> list[dict]:
    """``n`` samples ``{"__key__", "cls", "npy", "txt"}``; the text pads vary so ``maxsize`` gives uneven shards.
    Labels are drawn with uneven class frequencies (class c with weight c + 1)."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_classes + 1, dtype=np.float64)
    labels = rng.choice(num_classes, size=n, p=p / p.sum())
    out = []
    for i in range(n):
        pad = int(rng.integers(10, 1500)) if vary else 100
        out.append({"__key__": f"{prefix}{i:05d}", "cls": int(labels[i]),
                    "npy": np.full(4, i, dtype=np.float32), "txt": "x" * pad})
    return out


def write(tmp_path, samples: list[dict], *, maxcount: int = 1000, maxsize: float = 3e9, name: str = "train",
          **kw) -> str:
    return write_shards(samples, os.path.join(str(tmp_path), f"{name}-%06d.tar"), maxcount=maxcount,
                        maxsize=maxsize, **kw)


def members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def _rewrite(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def truncate_in_member(path: str, member: int) -> None:
    """Cut the file 100 bytes into the data of member number ``member``."""
    m = members(path)[member]
    data = open(path, "rb").read()
    _rewrite(path, data[: m.offset_data + min(100, max(1, m.size - 1))])


def truncate_at_header(path: str, member: int) -> None:
    """Cut the file exactly where member number ``member``'s header starts (a 512-byte boundary)."""
    m = members(path)[member]
    data = open(path, "rb").read()
    _rewrite(path, data[: m.offset])


def corrupt_header(path: str, member: int) -> None:
    """Overwrite the first header block of member number ``member`` with 0xFF bytes (bad checksum)."""
    m = members(path)[member]
    data = bytearray(open(path, "rb").read())
    data[m.offset : m.offset + 512] = b"\xff" * 512
    _rewrite(path, bytes(data))


def empty_file(path: str) -> None:
    _rewrite(path, b"")


class MarkerPayload:
    """Unpickling this object creates the file ``path`` (the classic pickle code-execution proof)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bytes(marker: str) -> bytes:
    return pickle.dumps(MarkerPayload(marker))
