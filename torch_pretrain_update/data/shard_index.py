"""The index of a :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset`: where each sample lies.

Per sample it keeps where the sample's first tar header starts and how many 512-byte blocks the sample spans (the
shard follows from the global index), plus a CRC-32 of the sample's key: 12 bytes per sample for shards under 2 TiB
(16 above). It is built once by a scan of the tar headers (member data is seeked over, except the small label
member) and cached beside the manifest as ``<manifest>.index.npz`` with the labels in
``<manifest>.index.labels.npy``; :func:`~torch_pretrain_update.data.write.write_shards` writes it while it writes
the shards, so a fresh dataset opens without a scan. Each shard's entry is keyed by the shard's size and
modification time and by the SHA-256 its manifest records; a shard whose size, time or manifest hash changed is
scanned again (and checked again), the others are kept.

Building checks every header's checksum, the end-of-archive block, each shard's sample count against the
manifest and its labels against the manifest's class histogram, and the SHA-256 against the manifest's
(:class:`~torch_pretrain_update.data.errors.DamagedShardError` naming the shard).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from torch_pretrain_update.data.errors import DamagedShardError, sample_location
from torch_pretrain_update.data.labels import parse_label
from torch_pretrain_update.data.manifest import file_sha256
from torch_pretrain_update.data.tar_headers import (
    BLOCK,
    BadHeader,
    NeedMore,
    name_text,
    padded,
    parse_member,
    split_name,
)

INDEX_FORMAT = "torch-pretrain-update/shard-index"
INDEX_VERSION = 1

#: bytes read ahead per positioned read while scanning: headers of small members come out of one read, members
#: larger than this are seeked over (a read per 512-byte header would cost one system call per header).
_SCAN_WINDOW = 1 << 20
#: a shard's block offsets fit in uint32 below 2 TiB; larger shards switch the whole index to int64
_UINT32_BLOCKS = 2**32
#: magic bytes of the compressions that make reading by offset impossible
COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"), (b"\x5d\x00\x00\x80", "lzma"),
                    (b"\x28\xb5\x2f\xfd", "zstd"))


class Scan:
    """What the header scan of one shard found."""

    __slots__ = ("offsets", "spans", "crcs", "labels")

    def __init__(self, offsets: np.ndarray, spans: np.ndarray, crcs: np.ndarray, labels: np.ndarray | None) -> None:
        self.offsets, self.spans, self.crcs, self.labels = offsets, spans, crcs, labels


def _scan_shard(url: str, label_key: str | None) -> tuple[Scan, os.stat_result]:
    """Index one shard: per sample the first header's block, the span in blocks, the key's CRC-32 and the label.

    Strict like :func:`~torch_pretrain_update.data.tar_reader.iter_shard_files`: a bad checksum, truncated data and a
    missing end-of-archive block raise :class:`DamagedShardError`. Samples are grouped like webdataset's
    ``group_by_keys`` (consecutive members with the same key). Returns the scan and the ``fstat`` taken before it;
    the file must not change while it is scanned.
    """
    label_suffix = None if label_key is None else label_key.lower().encode("utf-8")
    try:
        fd = os.open(url, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DamagedShardError(url, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
    try:
        st = os.fstat(fd)
        size = st.st_size
        base = 0  # file offset of buf[0]
        buf = os.pread(fd, _SCAN_WINDOW, 0)
        if not buf:
            raise DamagedShardError(url, "empty file")
        for magic, what in COMPRESSED_MAGIC:
            if buf.startswith(magic):
                raise ValueError(f"shard {url!r} is {what}-compressed: ShardDataset reads samples by byte offset, "
                                 "which needs an uncompressed .tar (decompress it, or stream it with "
                                 "WeightedWebDataset)")
        starts: list[int] = []
        ends: list[int] = []
        crcs: list[int] = []
        labels: list[int] = []
        key: bytes | None = None
        label: int | None = None
        pos = 0  # position in buf
        name = b""

        def close_sample() -> None:
            if key is None:
                return
            if label_suffix is not None:
                if label is None:
                    raise ValueError(f"shard {url!r}: {sample_location(name_text(key))} has no label member "
                                     f"{label_key!r}")
                labels.append(label)

        while True:
            try:
                member = parse_member(buf, pos, True)
            except NeedMore as more:
                at = base + more.pos
                if at + more.need > size:
                    if at >= size:
                        raise DamagedShardError(url, f"ends without an end-of-archive block at byte {at}"
                                                + (f" after member {name_text(name)!r}" if name else "")
                                                + " (truncated at a header boundary)") from None
                    raise DamagedShardError(url, f"truncated inside a header at byte {at}") from None
                base, pos = at, 0
                buf = os.pread(fd, max(_SCAN_WINDOW, more.need), base)
                continue
            except BadHeader as bad:
                raise DamagedShardError(url, f"invalid header at byte {base + bad.pos}: {bad.why}"
                                        + (f" (after member {name_text(name)!r})" if name else "")) from None
            if member is None:  # end-of-archive block
                break
            start, name, data_start, msize, regular = member
            end = data_start + msize
            if base + end > size:
                raise DamagedShardError(url, f"member {name_text(name)!r} truncated: {size - base - data_start} of "
                                             f"{msize} bytes")
            if regular:
                mkey, suffix = split_name(name)
                if mkey is not None:
                    if mkey != key:
                        close_sample()
                        key, label = mkey, None
                        starts.append(base + start)
                        ends.append(0)
                        crcs.append(zlib.crc32(mkey))
                    ends[-1] = base + data_start + padded(msize)
                    suffix = suffix.lower()
                    if label_suffix is not None and suffix == label_suffix and label is None:
                        raw = (buf[data_start:end] if end <= len(buf)
                               else os.pread(fd, msize, base + data_start))
                        try:
                            label = parse_label(raw)
                        except ValueError as exc:
                            raise ValueError(f"shard {url!r}: {sample_location(name_text(key))}, member "
                                             f"{name_text(name)!r}: {exc}") from None
            pos = data_start + padded(msize)
        close_sample()
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (size, st.st_mtime_ns):
            raise DamagedShardError(url, "changed while it was being indexed")
    finally:
        os.close(fd)
    first = np.asarray(starts, dtype=np.int64)
    last = np.asarray(ends, dtype=np.int64)
    scan = Scan(first // BLOCK, (last - first) // BLOCK, np.asarray(crcs, dtype=np.uint32),
                 None if label_suffix is None else np.asarray(labels, dtype=np.int64))
    return scan, st


def labels_file(index_path: str) -> str:
    """Where the labels of the index ``index_path`` live: ``x.index.npz`` -> ``x.index.labels.npy``."""
    return (index_path[:-4] if index_path.endswith(".npz") else index_path) + ".labels.npy"


def pack_index(offsets: Sequence[np.ndarray], spans: Sequence[np.ndarray], crcs: Sequence[np.ndarray],
               labels: Sequence[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The per-shard arrays concatenated in the index's types: offsets uint32 (int64 once a shard reaches 2 TiB),
    spans and key CRCs uint32, labels in the smallest integer type holding them (None without labels)."""
    if any(s.size and int(s.max()) >= _UINT32_BLOCKS for s in spans):
        raise ValueError("a sample spans 2 TiB or more: too large to index")
    big = any(o.size and int(o.max()) + int(s.max()) >= _UINT32_BLOCKS for o, s in zip(offsets, spans))

    def cat(parts: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
        return (np.concatenate([np.asarray(p).astype(dtype, copy=False) for p in parts]) if parts
                else np.zeros(0, dtype))

    packed_labels = None if labels is None else _smallest_int(cat(labels, np.int64))
    return cat(offsets, np.int64 if big else np.uint32), cat(spans, np.uint32), cat(crcs, np.uint32), packed_labels


def _smallest_int(labels: np.ndarray) -> np.ndarray:
    hi = int(labels.max()) if labels.size else 0
    for dt in (np.int8, np.int16, np.int32):
        if hi <= np.iinfo(dt).max:
            return labels.astype(dt)
    return labels.astype(np.int64)


def write_index(index_path: str, *, urls: Sequence[str], sha256s: Sequence[str | None], counts: Sequence[int],
                sizes: Sequence[int], mtimes_ns: Sequence[int], offsets: np.ndarray, spans: np.ndarray,
                crcs: np.ndarray, labels: np.ndarray | None, label_key: str | None, manifest: str | None) -> None:
    """Write an index that :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset` reads as its cache.

    Per shard (in order): its absolute path, the SHA-256 it was checked against (or None), sample count, size and
    ``st_mtime_ns``; per sample (arrays as :func:`pack_index` makes them): the first header's offset and the span,
    both in 512-byte blocks, and ``zlib.crc32`` of the key's UTF-8 bytes; ``labels`` one per sample or None.
    Written atomically (temporary files, then ``os.replace``): the labels first, then the ``.npz`` that records the
    labels file's size and time, so that a reader never pairs an index with the labels of another build. Raises
    ``OSError``.
    """
    base = os.path.dirname(index_path)
    tag = f".tmp{os.getpid()}.{threading.get_ident()}"
    lpath = labels_file(index_path)
    try:
        labels_meta = None
        if labels is not None:
            with open(lpath + tag, "wb") as f:
                np.save(f, np.ascontiguousarray(labels))
            os.replace(lpath + tag, lpath)
            st = os.stat(lpath)
            labels_meta = {"file": os.path.basename(lpath), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "label_key": label_key, "manifest": manifest,
                "labels": labels_meta,
                "shards": [{"url": os.path.relpath(u, base), "sha256": h} for u, h in zip(urls, sha256s)]}
        arrays: dict[str, Any] = {
            "offsets": offsets, "spans": spans, "crcs": crcs, "counts": np.asarray(counts, dtype=np.int64),
            "sizes": np.asarray(sizes, dtype=np.int64), "mtimes": np.asarray(mtimes_ns, dtype=np.int64),
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        with open(index_path + tag, "wb") as f:
            np.savez(f, **arrays)
        os.replace(index_path + tag, index_path)
    except OSError:
        for p in (index_path + tag, lpath + tag):
            if os.path.exists(p):
                os.remove(p)
        raise


def load_index(path: str | None) -> dict[str, Any] | None:
    """A cached index as plain arrays and meta (``meta["arrays"]``, ``["paths"]``, ``["labels_array"]``), or None
    when there is none usable (then it is rebuilt): a cache is only trusted where it is self-consistent."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
                return None
            arrays = {k: z[k] for k in ("offsets", "spans", "crcs", "counts", "sizes", "mtimes")}
    except (OSError, ValueError, KeyError, json.JSONDecodeError, zipfile.BadZipFile):
        return None
    counts, n = arrays["counts"], int(arrays["counts"].sum())
    shards = meta.get("shards")
    if (not isinstance(shards, list) or len(shards) != counts.size or any(
            a.size != counts.size for a in (arrays["sizes"], arrays["mtimes"]))
            or any(arrays[k].shape != (n,) for k in ("offsets", "spans", "crcs"))):
        return None
    # spans inside their shard, in order, not overlapping
    if n:
        offsets, spans = arrays["offsets"].astype(np.int64), arrays["spans"].astype(np.int64)
        ends = offsets + spans
        shard_of = np.repeat(np.arange(counts.size), counts)
        if spans.min() < 1 or offsets.min() < 0 or bool((ends * BLOCK > arrays["sizes"][shard_of]).any()):
            return None
        same_shard = shard_of[1:] == shard_of[:-1]
        if bool((offsets[1:][same_shard] < ends[:-1][same_shard]).any()):
            return None
    meta["arrays"] = arrays
    base = os.path.dirname(path)
    meta["paths"] = [os.path.normpath(os.path.join(base, s["url"])) for s in shards]
    labels_meta = meta.get("labels")
    meta["labels_array"] = None
    if (labels_meta is None) != (meta.get("label_key") is None):
        return None
    if labels_meta is not None:
        lpath = labels_file(path)
        try:
            st = os.stat(lpath)
            if (st.st_size, st.st_mtime_ns) != (labels_meta["bytes"], labels_meta["mtime_ns"]):
                return None
            arr = np.load(lpath, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if arr.shape != (n,) or arr.dtype.kind not in "iu":
            return None
        meta["labels_array"] = arr
    return meta


@dataclass
class ShardIndex:
    """A built index: per sample ``offsets``/``spans`` (512-byte blocks), key ``crcs`` and ``labels`` (None
    without a label key; memory-mapped from ``labels_source`` when that is set); per shard ``counts`` and
    ``stat`` (size, ``st_mtime_ns``) as indexed."""

    offsets: np.ndarray
    spans: np.ndarray
    crcs: np.ndarray
    labels: np.ndarray | None
    labels_source: str | None
    counts: list[int]
    stat: list[tuple[int, int]]


@dataclass
class _Part:
    """One shard's share of the index, reused from the cache or scanned."""

    offsets: np.ndarray
    spans: np.ndarray
    crcs: np.ndarray
    labels: np.ndarray | None
    sha256: str | None
    stat: os.stat_result


def build_index(urls: list[str], stats: list[os.stat_result], *, label_key: str | None, counts: list[int] | None,
                hashes: list[str | None], histograms: list[tuple[int, ...]] | None, check_sha256: bool,
                index_path: str | None, manifest: str | None) -> ShardIndex:
    """The index of ``urls`` (with ``stats`` taken before): cached entries whose shard is unchanged are kept, the
    other shards scanned and checked (count, histogram, SHA-256); saved again at ``index_path`` when anything was
    rebuilt (a warning, not an error, when it cannot be written)."""
    cached = load_index(index_path)
    reuse: dict[str, int] = {}
    if cached is not None and cached.get("label_key") == label_key:
        reuse = {p: s for s, p in enumerate(cached["paths"])}
    else:
        cached = None
    parts: list[_Part] = []
    rebuilt = cached is None
    for s, (url, st) in enumerate(zip(urls, stats)):
        want_sha = hashes[s] if check_sha256 else None
        part = _cached_part(cached, reuse.get(url), st, want_sha)
        if part is None:
            rebuilt = True
            part = _scanned_part(url, st, label_key, want_sha)
        _check_shard(url, part.offsets.size, counts, histograms, part.labels, s)
        parts.append(part)
    stat = [(p.stat.st_size, p.stat.st_mtime_ns) for p in parts]
    if cached is not None and not rebuilt and cached["paths"] == urls:  # the cache as it is: labels memory-mapped
        arr = cached["arrays"]
        lab = cached["labels_array"]
        return ShardIndex(arr["offsets"], arr["spans"], arr["crcs"], lab,
                          None if lab is None else labels_file(index_path or ""), [int(c) for c in arr["counts"]],
                          stat)
    offsets, spans, crcs, labels = pack_index(
        [p.offsets for p in parts], [p.spans for p in parts], [p.crcs for p in parts],
        None if label_key is None else [p.labels for p in parts if p.labels is not None])
    index = ShardIndex(offsets, spans, crcs, labels, None, [p.offsets.size for p in parts], stat)
    if index_path is not None:
        _save(index, index_path, urls, [p.sha256 for p in parts], label_key, manifest)
    return index


def _cached_part(cached: dict[str, Any] | None, c: int | None, st: os.stat_result,
                 want_sha: str | None) -> _Part | None:
    """Shard ``c`` of the cache, if its size, time and SHA-256 are the ones wanted."""
    if cached is None or c is None:
        return None
    entry, arr = cached["shards"][c], cached["arrays"]
    if (int(arr["sizes"][c]), int(arr["mtimes"][c])) != (st.st_size, st.st_mtime_ns):
        return None
    if want_sha is not None and entry.get("sha256") != want_sha:
        return None
    starts = np.concatenate([[0], np.cumsum(arr["counts"])])
    lo, hi = int(starts[c]), int(starts[c + 1])
    lab = cached["labels_array"]
    return _Part(arr["offsets"][lo:hi], arr["spans"][lo:hi], arr["crcs"][lo:hi], None if lab is None else lab[lo:hi],
                 entry.get("sha256"), st)


def _scanned_part(url: str, st: os.stat_result, label_key: str | None, want_sha: str | None) -> _Part:
    scan, st2 = _scan_shard(url, label_key)
    if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise DamagedShardError(url, "changed while the dataset was being built")
    if want_sha is not None and file_sha256(url) != want_sha:
        raise DamagedShardError(url, "its SHA-256 differs from the manifest's: the file was modified after the "
                                     "manifest was written")
    return _Part(scan.offsets, scan.spans, scan.crcs, scan.labels, want_sha, st)


def _check_shard(url: str, n: int, counts: list[int] | None, histograms: list[tuple[int, ...]] | None,
                 labels: np.ndarray | None, s: int) -> None:
    if counts is not None and n != counts[s]:
        raise DamagedShardError(url, f"holds {n} samples but its manifest count is {counts[s]} (the manifest "
                                     "does not describe this shard)")
    if histograms is not None and labels is not None and histograms[s]:
        want = np.asarray(histograms[s], dtype=np.int64)
        got = np.bincount(np.asarray(labels, dtype=np.int64), minlength=want.size)
        if got.size != want.size or not np.array_equal(got, want):
            raise DamagedShardError(url, f"class histogram {got.tolist()} of its labels differs from the "
                                         f"manifest's {want.tolist()}")


def _save(index: ShardIndex, path: str, urls: list[str], sha256s: list[str | None], label_key: str | None,
          manifest: str | None) -> None:
    try:
        write_index(path, urls=urls, sha256s=sha256s, counts=index.counts, sizes=[s for s, _ in index.stat],
                    mtimes_ns=[m for _, m in index.stat], offsets=index.offsets, spans=index.spans, crcs=index.crcs,
                    labels=index.labels, label_key=label_key, manifest=manifest)
    except OSError as exc:
        warnings.warn(f"ShardDataset: could not cache the index at {path!r} ({exc}); it will be built again "
                      "next time (pass index_path= to put it elsewhere)", RuntimeWarning, stacklevel=4)
        return
    if index.labels is not None:  # serve the labels memory-mapped, as a cached index would
        index.labels_source = labels_file(path)
        index.labels = np.load(index.labels_source, mmap_mode="r", allow_pickle=False)
