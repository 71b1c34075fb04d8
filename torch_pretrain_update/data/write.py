"""Writing shards: :func:`write_shards` writes samples with ``webdataset.ShardWriter``, the manifest next to them
(:mod:`~torch_pretrain_update.data.manifest`) and the index a
:class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` reads (:mod:`~torch_pretrain_update.data.shard_index`),
so that the dataset opens without scanning the shards it was written to."""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import webdataset as wds

from torch_pretrain_update._checks import MAX_CLASSES, check_int
from torch_pretrain_update.data.labels import parse_label
from torch_pretrain_update.data.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, file_sha256
from torch_pretrain_update.data.shard_index import COMPRESSED_MAGIC, pack_index, write_index
from torch_pretrain_update.data.tar_headers import BLOCK, split_name

__all__ = ["write_shards"]


def _default_manifest_path(pattern: str) -> str:
    prefix = pattern[: pattern.index("%")]
    return prefix + "manifest.json"


class _IndexRecorder:
    """Where each sample went, recorded while the shards are written: per shard the samples' first header block,
    their spans in blocks, the CRC-32 of their keys and their labels, as the header scan of
    :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` would find them. Gives up (``ok`` False) on
    anything the scan would see differently: a key the reader splits elsewhere (a ``.`` after its last ``/``), a
    member the reader drops as metadata, two members equal in lower case, a sample with no member, a compressed
    shard, or a writer without the tar offset."""

    def __init__(self) -> None:
        self.ok = True
        self.shards: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {}
        self._fname: str | None = None
        self._end = 0  # where the previous sample of the current shard ended

    def add(self, writer: Any, key: str, sample: Mapping[str, Any], label: int | None) -> None:
        if not self.ok:
            return
        end = getattr(getattr(writer.tarstream, "tarstream", None), "offset", None)
        if not isinstance(end, int) or not _read_back_alike(key, sample):
            self.ok = False
            return
        if writer.fname != self._fname:
            self._fname, self._end = writer.fname, 0
        if end <= self._end:
            self.ok = False
            return
        starts, spans, crcs, labels = self.shards.setdefault(writer.fname, ([], [], [], []))
        starts.append(self._end // BLOCK)
        spans.append((end - self._end) // BLOCK)
        crcs.append(zlib.crc32(key.encode("utf-8")))
        if label is not None:
            labels.append(label)
        self._end = end


def _read_back_alike(key: str, sample: Mapping[str, Any]) -> bool:
    """Whether every member of ``sample`` is grouped back under ``key`` by the readers, under its own name: the
    key splits off whole (no ``.`` after its last ``/``), no member name has a ``/``, none is dropped as
    metadata (``__k.x__``-style names) and no two are equal in lower case."""
    try:
        if split_name(f"{key}.x".encode()) != (key.encode(), b"x"):
            return False
    except UnicodeEncodeError:
        return False
    meta_like = "/" not in key and key.startswith("__")  # then a member ending in "__" is read as metadata
    seen: set[str] = set()
    for k in sample:
        if k == "__key__":
            continue
        low = k.lower()
        if "/" in k or (meta_like and k.endswith("__")) or low in seen:
            return False
        seen.add(low)
    return True


def _compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return any(head.startswith(magic) for magic, _ in COMPRESSED_MAGIC)


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    pattern: str,
    *,
    maxcount: int = 1000,
    label_key: str | None = "cls",
    num_classes: int | None = None,
    maxsize: float = 3e9,
    manifest_path: str | None = None,
    progress: bool = False,
    **writer_kwargs: Any,
) -> str:
    """Write ``samples`` to tar shards with ``webdataset.ShardWriter`` and a JSON manifest next to them.

    Beside the manifest goes the index :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` reads
    (``<manifest>.index.npz``, labels in ``<manifest>.index.labels.npy``): where each sample lies, recorded while
    writing, so the dataset opens without a scan. It is left out (the dataset then scans once) for compressed
    shards and for keys the readers would split differently (a ``.`` after the key's last ``/``).

    Args:
        samples: dicts in webdataset's convention: ``"__key__"`` plus one entry per member extension (``"cls"``,
            ``"npy"``, ``"json"``, ...), encoded by webdataset's default encoders.
        pattern: shard path pattern with one ``%d``-style field, e.g. ``"/data/train-%06d.tar"``.
        maxcount: maximum samples per shard.
        label_key: the member holding the integer class label (histogrammed in the manifest); ``None`` for
            unlabelled data. Every sample must have it.
        num_classes: number of classes; labels must be below it. Defaults to ``max(label) + 1``.
        maxsize: maximum bytes per shard (passed to ``ShardWriter``).
        manifest_path: where the manifest goes; defaults to the pattern's text before ``%`` + ``"manifest.json"``
            (``"/data/train-%06d.tar"`` -> ``"/data/train-manifest.json"``).
        progress: show a tqdm progress bar.
        **writer_kwargs: passed to ``webdataset.ShardWriter`` (e.g. ``mtime=0`` for byte-reproducible shards).

    Returns:
        the manifest's path (accepted by :func:`~torch_pretrain_update.data.manifest.read_manifest`,
        :func:`~torch_pretrain_update.data.inspect.inspect_shards`, ``ShardDataset`` and ``manifest=`` of
        :class:`~torch_pretrain_update.data.stream.WeightedWebDataset`).

    Raises:
        ValueError: bad pattern, no samples, a sample without ``__key__`` or ``label_key``, a label that is not
            a non-negative integer (or not below ``num_classes``), two consecutive samples with the same key.

    Example::

        >>> samples = ({"__key__": f"{i:06d}", "cls": i % 3, "npy": np.zeros(4, np.float32)} for i in range(25))
        >>> manifest = write_shards(samples, "/tmp/shards/train-%06d.tar", maxcount=10)
        >>> read_manifest(manifest).class_counts
        [9, 8, 8]
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str; got {type(pattern).__name__}")
    if len(re.findall(r"%0?\d*d", pattern)) != 1 or pattern.count("%") != 1:
        raise ValueError(f"pattern must contain exactly one %d-style field (e.g. 'train-%06d.tar'); got {pattern!r}")
    maxcount = check_int(maxcount, "maxcount", min_value=1)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", min_value=1)
    if label_key is not None and not isinstance(label_key, str):
        raise TypeError(f"label_key must be a str or None; got {type(label_key).__name__}")
    if manifest_path is None:
        manifest_path = _default_manifest_path(pattern)
    directory = os.path.dirname(os.path.abspath(pattern % 0))
    os.makedirs(directory, exist_ok=True)

    it = iter(samples)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("samples is empty: nothing to write") from None

    counts: dict[str, int] = {}
    hists: dict[str, dict[int, int]] = {}
    order: list[str] = []
    files: dict[str, tuple[int, str, int]] = {}  # size, SHA-256, st_mtime_ns of each finished shard
    index = _IndexRecorder()

    def _post(fname: str) -> None:
        st = os.stat(fname)
        files[fname] = (st.st_size, file_sha256(fname), st.st_mtime_ns)
        if _compressed(fname):  # offsets inside a compressed stream cannot be read by offset
            index.ok = False

    def _all() -> Iterator[Mapping[str, Any]]:
        yield first
        yield from it

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="write_shards", unit="sample")
    prev_key = None
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, post=_post, verbose=0,
                         **writer_kwargs) as writer:
        for n, sample in enumerate(_all()):
            if not isinstance(sample, Mapping):
                raise TypeError(f"samples[{n}] must be a dict; got {type(sample).__name__}")
            key = sample.get("__key__")
            if not isinstance(key, str) or not key:
                raise ValueError(f"samples[{n}] must have a non-empty string '__key__'; got {key!r}")
            if key == prev_key:
                raise ValueError(f"samples[{n}]: key {key!r} repeats the previous sample's key; webdataset would "
                                 "merge them into one sample")
            prev_key = key
            label = None
            if label_key is not None:
                label = _label(n, key, sample, label_key, num_classes)
                if not isinstance(sample[label_key], int):
                    sample = {**sample, label_key: label}  # numpy/torch scalars would be str()-encoded wrongly
            writer.write(dict(sample))
            index.add(writer, key, sample, label)
            fname = writer.fname
            if fname not in counts:
                counts[fname] = 0
                hists[fname] = {}
                order.append(fname)
            counts[fname] += 1
            if label is not None:
                hists[fname][label] = hists[fname].get(label, 0) + 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    seen = max((c for h in hists.values() for c in h), default=-1) + 1
    c_total = num_classes if num_classes is not None else seen
    _write_manifest(manifest_path, order, counts, hists, files, label_key, c_total)
    if index.ok:
        _write_index(manifest_path, order, counts, files, index, label_key)
    return manifest_path


def _label(n: int, key: str, sample: Mapping[str, Any], label_key: str, num_classes: int | None) -> int:
    if label_key not in sample:
        raise ValueError(f"samples[{n}] (key {key!r}) has no label member {label_key!r}")
    try:
        label = parse_label(sample[label_key])
    except ValueError as exc:
        raise ValueError(f"samples[{n}] (key {key!r}), member {label_key!r}: {exc}") from None
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"samples[{n}] (key {key!r}): label {label} must be < num_classes={num_classes}")
    if label >= MAX_CLASSES:  # the manifest's class histogram has one entry per class id
        raise ValueError(f"samples[{n}] (key {key!r}): label {label} must be < {MAX_CLASSES} (the "
                         "manifest's class histogram is indexed by label: relabel the classes as 0..C-1)")
    return label


def _write_manifest(manifest_path: str, order: list[str], counts: dict[str, int], hists: dict[str, dict[int, int]],
                    files: dict[str, tuple[int, str, int]], label_key: str | None, c_total: int) -> None:
    mdir = os.path.dirname(os.path.abspath(manifest_path))
    shards = []
    for fname in order:
        nbytes, digest, _ = files[fname]
        hist = [hists[fname].get(c, 0) for c in range(c_total)] if label_key is not None else []
        shards.append({"url": os.path.relpath(os.path.abspath(fname), mdir), "count": counts[fname],
                       "class_counts": hist, "bytes": nbytes, "sha256": digest})
    class_counts = [sum(hists[f].get(c, 0) for f in order) for c in range(c_total)]
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "label_key": label_key,
           "num_classes": c_total if label_key is not None else 0, "num_samples": sum(counts.values()),
           "class_counts": class_counts if label_key is not None else [], "shards": shards}
    os.makedirs(mdir, exist_ok=True)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, manifest_path)


def _write_index(manifest_path: str, order: list[str], counts: dict[str, int], files: dict[str, tuple[int, str, int]],
                 index: _IndexRecorder, label_key: str | None) -> None:
    """The recorded index, where :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` looks for it
    (a warning, not an error, when it cannot be written: the dataset then scans the shards once)."""
    if [len(index.shards.get(f, ((),))[0]) for f in order] != [counts[f] for f in order]:
        return  # not every sample was recorded
    parts = [index.shards[f] for f in order]
    offsets, spans, crcs, labels = pack_index(
        [np.asarray(p[0], dtype=np.int64) for p in parts], [np.asarray(p[1], dtype=np.int64) for p in parts],
        [np.asarray(p[2], dtype=np.uint32) for p in parts],
        None if label_key is None else [np.asarray(p[3], dtype=np.int64) for p in parts])
    path = os.path.abspath(manifest_path)
    try:
        write_index(path + ".index.npz", urls=[os.path.abspath(f) for f in order],
                    sha256s=[files[f][1] for f in order], counts=[counts[f] for f in order],
                    sizes=[files[f][0] for f in order], mtimes_ns=[files[f][2] for f in order], offsets=offsets,
                    spans=spans, crcs=crcs, labels=labels, label_key=label_key, manifest=path)
    except OSError as exc:
        warnings.warn(f"write_shards: could not write the ShardDataset index beside {path!r} ({exc}); "
                      "ShardDataset will scan the shards once instead", RuntimeWarning, stacklevel=3)
