"""Random access to WebDataset shards: a map-style dataset that reads sample ``i`` with one positioned read.

:class:`ShardDataset` turns tar shards (written by :func:`~torch_pretrain_update.data.shards.write_shards`, or by
``webdataset.ShardWriter``/``TarWriter``) into a ``torch.utils.data.Dataset``: ``len(ds)``, and ``ds[i]`` the
safely decoded sample with its global index ``"__index__": i``. So every sampler of this library (and
``torch.utils.data.Subset``) works on data too big for memory exactly as on an in-memory dataset, and
``ds.labels`` (read once, kept as a memory-mapped array) lets the class-aware samplers start without reading a
sample.

**The index.** Per sample it keeps where the sample's first tar header starts and how many 512-byte blocks the
sample spans (the shard follows from the global index), plus a CRC-32 of the sample's key: 12 bytes per sample
for shards under 2 TiB (16 above). Reading ``ds[i]`` is one ``os.pread`` of that span; the member headers inside
it are parsed then. The index is built once by a scan of the tar headers (member data is seeked over, except
the small label member) and cached beside the manifest as ``<manifest>.index.npz`` with the labels in
``<manifest>.index.labels.npy``. Each shard's entry is keyed by the shard's size and modification time and by
the SHA-256 its manifest records (:func:`~torch_pretrain_update.data.shards.write_shards` records one; the scan
checks the file against it, so an index is only ever built from the bytes the manifest describes). A shard whose
size, time or manifest hash changed is scanned again (and checked again); the others are kept.

**What is checked, so that nothing is read from the wrong place silently.**

- Building: every header's checksum, the end-of-archive block (a truncated or corrupt shard raises
  :class:`~torch_pretrain_update.data.shards.DamagedShardError` naming it, where ``tarfile`` would silently stop),
  each shard's sample count against the manifest and its labels against the manifest's class histogram
  (``DamagedShardError``, a ``ValueError``, naming the shard), the SHA-256 against the manifest's.
- Opening a shard (once per process): its size and modification time against the index; a shard changed since
  the dataset was built raises ``DamagedShardError`` naming it.
- Every read: every header in the span is a tar header of the sample the index names (its key's CRC-32), the
  members tile the span exactly; a sample whose member names repeat, use the metadata names or are not UTF-8
  raises :class:`~torch_pretrain_update.data.shards.MalformedSampleError` (as the package's stream readers do;
  it still counts as a sample, so indices match the manifest's counts).

**Workers and processes.** Each process opens each shard lazily, at most ``max_open_files`` at a time; open files
are never pickled (a spawned DataLoader worker opens its own) and are re-opened after a ``fork``. Reads use
``os.pread`` (no shared file position), so threads may share a dataset too.

Only uncompressed local tar files can be read by offset; a ``.tar.gz`` shard is refused with a message saying so.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import os
import re
import threading
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from torch_pretrain_update._checks import check_bool, check_int, check_labels
from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.shards import (
    DamagedShardError,
    MalformedSampleError,
    ShardManifest,
    parse_label,
    read_manifest,
)

__all__ = ["ShardDataset"]

INDEX_FORMAT = "torch-pretrain-update/shard-index"
INDEX_VERSION = 1

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
#: bytes read ahead per positioned read while scanning: headers of small members come out of one read, members
#: larger than this are seeked over (a read per 512-byte header would cost one system call per header).
_SCAN_WINDOW = 1 << 20
#: a shard's block offsets fit in uint32 below 2 TiB; larger shards switch the whole index to int64
_UINT32_BLOCKS = 2**32
#: tar types with no data to skip although their size field may be non-zero (tarfile does not skip it either)
_NO_DATA_TYPES = frozenset(b"123456")
_REGULAR_TYPES = frozenset((b"0", b"\x00", b"7"))
#: webdataset's ``base_plus_ext`` on bytes (``/`` and ``.`` never occur inside a UTF-8 multi-byte character)
_KEY_RE = re.compile(rb"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: member names webdataset's reader drops as metadata (``__meta__``-style names, ``__x__/...`` folders)
_META_RE = re.compile(rb"__[^/]*__($|/)")
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"), (b"\x5d\x00\x00\x80", "lzma"),
                     (b"\x28\xb5\x2f\xfd", "zstd"))
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class _NeedMore(Exception):
    """The buffer ends inside a header or a header extension that starts at ``pos``."""

    def __init__(self, pos: int, need: int) -> None:
        self.pos, self.need = pos, need


class _BadHeader(Exception):
    """Not a valid tar header at buffer position ``pos`` (``why`` says what)."""

    def __init__(self, pos: int, why: str) -> None:
        super().__init__(why)
        self.pos, self.why = pos, why


def _number(field: bytes, pos: int) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field[0] & 0x80:
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else n
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _BadHeader(pos, f"a numeric field holds {field!r}, not an octal number") from None


def _checksum_ok(h: bytes) -> bool:
    # unsigned and signed sums, as tarfile accepts both; the checksum field itself counts as 8 spaces
    stored = _number(h[148:156], 0)
    unsigned = sum(h) - sum(h[148:156]) + 256
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in h if b >= 128) + 2 * sum(b for b in h[148:156] if b >= 128)
    return stored == signed


def _pax_records(data: bytes, pos: int) -> dict[bytes, bytes]:
    """The ``<length> <key>=<value>\\n`` records of a pax extended header."""
    out: dict[bytes, bytes] = {}
    i = 0
    while i < len(data) and data[i:i + 1] != b"\x00":
        space = data.find(b" ", i)
        try:
            length = int(data[i:space])
        except ValueError:
            raise _BadHeader(pos, "a pax extended header record has no valid length") from None
        record = data[space + 1:i + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise _BadHeader(pos, "a pax extended header record is malformed")
        key, value = record[:-1].split(b"=", 1)
        out[key] = value
        i += length
    return out


def _parse_member(buf: bytes, pos: int, check_sums: bool) -> tuple[int, bytes, int, int, bool] | None:
    """The tar member whose (first) header starts at ``buf[pos]``.

    Returns ``(start, name, data_start, size, regular)`` with positions in ``buf`` (``data_start + size`` may
    lie beyond the buffer), or None at an end-of-archive (zero) block. Raises :class:`_NeedMore` when the
    buffer ends inside the header or one of its extensions, :class:`_BadHeader` for anything that is not a
    header of a supported type.

    Parsed by hand rather than with ``tarfile``: random access parses the headers of every sample read (a
    pax header before each member for webdataset's writer), and ``tarfile``'s per-member cost (about ten times
    this function's) would dominate a read. The rules are ``tarfile``'s: pax ``path``/``size`` records and GNU
    long names apply to the next header, a POSIX ustar ``prefix`` is joined to the name.
    """
    start = pos
    path: bytes | None = None
    size_override: int | None = None
    n = len(buf)
    while True:
        if pos + _BLOCK > n:
            raise _NeedMore(start, pos + _BLOCK - start)
        h = buf[pos:pos + _BLOCK]
        if h == _ZERO_BLOCK:
            if pos != start:
                raise _BadHeader(pos, "an extended header is followed by the end-of-archive block")
            return None
        if h[257:262] != b"ustar":
            raise _BadHeader(pos, "no tar header here (the 'ustar' magic is missing)")
        if check_sums and not _checksum_ok(h):
            raise _BadHeader(pos, "a header's checksum does not match (a corrupt header)")
        size = _number(h[124:136], pos)
        kind = h[156:157]
        data_start = pos + _BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            if data_start + size > n:
                raise _NeedMore(start, data_start + size - start)
            ext = buf[data_start:data_start + size]
            if kind == b"x":
                # only path and size change where the member lies; skip the parse for webdataset's mtime-only ones
                if b"path=" in ext or b"size=" in ext or b"GNU.sparse" in ext:
                    rec = _pax_records(ext, pos)
                    if any(k.startswith(b"GNU.sparse") for k in rec):
                        raise _BadHeader(pos, "a sparse member (not supported for reading by offset)")
                    if b"path" in rec:
                        path = rec[b"path"]
                    if b"size" in rec:
                        try:
                            size_override = int(rec[b"size"])
                        except ValueError:
                            raise _BadHeader(pos, "a pax size record is not a number") from None
            elif kind == b"L":
                path = ext.split(b"\x00", 1)[0]
            pos = data_start + -(-size // _BLOCK) * _BLOCK
            continue
        if kind == b"S":
            raise _BadHeader(pos, "a GNU sparse member (not supported for reading by offset)")
        if size_override is not None:
            size = size_override
        if path is None:
            path = h[:100].split(b"\x00", 1)[0]
            if h[345] != 0:  # tarfile joins a ustar prefix for every non-GNU header type
                path = h[345:500].split(b"\x00", 1)[0] + b"/" + path
        # tarfile: an old-style regular entry named like a folder is a directory; non-file types skip no data
        folder = kind == b"\x00" and path.endswith(b"/")
        regular = kind in _REGULAR_TYPES and not folder
        if folder or kind in _NO_DATA_TYPES:
            size = 0
        return start, path, data_start, size, regular


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _split_name(name: bytes) -> tuple[bytes | None, bytes]:
    """``(key, suffix)`` of a member as webdataset groups it; key None for a member it drops."""
    if b"/" not in name and name.startswith(b"__") and name.endswith(b"__"):
        return None, b""
    if _META_RE.match(name):
        return None, b""
    m = _KEY_RE.match(name)
    if m is None:
        return None, b""
    return m.group(1), m.group(2)


def _text(name: bytes) -> str:
    # tarfile decodes names the same way: undecodable bytes survive as lone surrogates
    return name.decode("utf-8", "surrogateescape")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Scan:
    """What the header scan of one shard found."""

    __slots__ = ("offsets", "spans", "crcs", "labels")

    def __init__(self, offsets: np.ndarray, spans: np.ndarray, crcs: np.ndarray, labels: np.ndarray | None) -> None:
        self.offsets, self.spans, self.crcs, self.labels = offsets, spans, crcs, labels


def _scan_shard(url: str, label_key: str | None) -> tuple[_Scan, os.stat_result]:
    """Index one shard: per sample the first header's block, the span in blocks, the key's CRC-32 and the label.

    Strict like :func:`~torch_pretrain_update.data.shards.iter_shard_files`: a bad checksum, truncated data and a
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
        for magic, what in _COMPRESSED_MAGIC:
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
                    raise ValueError(f"shard {url!r}: sample __key__={_text(key)!r} has no label member "
                                     f"{label_key!r}")
                labels.append(label)

        while True:
            try:
                member = _parse_member(buf, pos, True)
            except _NeedMore as more:
                at = base + more.pos
                if at + more.need > size:
                    if at >= size:
                        raise DamagedShardError(url, f"ends without an end-of-archive block at byte {at}"
                                                + (f" after member {_text(name)!r}" if name else "")
                                                + " (truncated at a header boundary)") from None
                    raise DamagedShardError(url, f"truncated inside a header at byte {at}") from None
                base, pos = at, 0
                buf = os.pread(fd, max(_SCAN_WINDOW, more.need), base)
                continue
            except _BadHeader as bad:
                raise DamagedShardError(url, f"invalid header at byte {base + bad.pos}: {bad.why}"
                                        + (f" (after member {_text(name)!r})" if name else "")) from None
            if member is None:  # end-of-archive block
                break
            start, name, data_start, msize, regular = member
            end = data_start + msize
            if base + end > size:
                raise DamagedShardError(url, f"member {_text(name)!r} truncated: {size - base - data_start} of "
                                             f"{msize} bytes")
            if regular:
                mkey, suffix = _split_name(name)
                if mkey is not None:
                    if mkey != key:
                        close_sample()
                        key, label = mkey, None
                        starts.append(base + start)
                        ends.append(0)
                        crcs.append(zlib.crc32(mkey))
                    ends[-1] = base + data_start + _padded(msize)
                    suffix = suffix.lower()
                    if label_suffix is not None and suffix == label_suffix and label is None:
                        raw = (buf[data_start:end] if end <= len(buf)
                               else os.pread(fd, msize, base + data_start))
                        try:
                            label = parse_label(raw)
                        except ValueError as exc:
                            raise ValueError(f"shard {url!r}: sample __key__={_text(key)!r}, member "
                                             f"{_text(name)!r}: {exc}") from None
            pos = data_start + _padded(msize)
        close_sample()
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (size, st.st_mtime_ns):
            raise DamagedShardError(url, "changed while it was being indexed")
    finally:
        os.close(fd)
    first = np.asarray(starts, dtype=np.int64)
    last = np.asarray(ends, dtype=np.int64)
    scan = _Scan(first // _BLOCK, (last - first) // _BLOCK, np.asarray(crcs, dtype=np.uint32),
                 None if label_suffix is None else np.asarray(labels, dtype=np.int64))
    return scan, st


def _labels_file(index_path: str) -> str:
    """Where the labels of the index ``index_path`` live: ``x.index.npz`` -> ``x.index.labels.npy``."""
    return (index_path[:-4] if index_path.endswith(".npz") else index_path) + ".labels.npy"


def _write_index(index_path: str, *, urls: Sequence[str], sha256s: Sequence[str | None], counts: Sequence[int],
                 sizes: Sequence[int], mtimes_ns: Sequence[int], offsets: np.ndarray, spans: np.ndarray,
                 crcs: np.ndarray, labels: np.ndarray | None, label_key: str | None, manifest: str | None) -> None:
    """Write an index that :class:`ShardDataset` reads as its cache.

    Per shard (in order): its path, the SHA-256 it was checked against (or None), sample count, size and
    ``st_mtime_ns``; per sample: the first header's offset and the span, both in 512-byte blocks, and
    ``zlib.crc32`` of the key's UTF-8 bytes; ``labels`` one per sample or None. Written atomically (temporary
    files, then ``os.replace``): the labels first, then the ``.npz`` that records the labels file's size and
    time, so that a reader never pairs an index with the labels of another build. Raises ``OSError``.
    """
    base = os.path.dirname(index_path)
    tag = f".tmp{os.getpid()}.{threading.get_ident()}"
    lpath = _labels_file(index_path)
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
        arrays = {"offsets": offsets, "spans": spans, "crcs": crcs,
                  "counts": np.asarray(counts, dtype=np.int64), "sizes": np.asarray(sizes, dtype=np.int64),
                  "mtimes": np.asarray(mtimes_ns, dtype=np.int64),
                  "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        with open(index_path + tag, "wb") as f:
            np.savez(f, **arrays)
        os.replace(index_path + tag, index_path)
    except OSError:
        for p in (index_path + tag, lpath + tag):
            if os.path.exists(p):
                os.remove(p)
        raise


class _Fd:
    """An open shard. Closed when the last reference goes, so an evicted file stays open for a read in flight."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _local_path(url: Any, what: str) -> str:
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str):
        raise TypeError(f"{what} must be a path string; got {type(url).__name__}")
    if url.startswith("file:"):
        url = re.sub(r"^file:(//)?", "", url)
    elif _SCHEME_RE.match(url) and not os.path.exists(url):
        raise ValueError(f"{what} {url!r} is not a local file: ShardDataset reads samples by byte offset, which "
                         "needs local (or mounted) uncompressed .tar files; stream remote shards with "
                         "WeightedWebDataset instead")
    return os.path.abspath(url)


def _smallest_int(labels: np.ndarray) -> np.ndarray:
    hi = int(labels.max()) if labels.size else 0
    for dt in (np.int8, np.int16, np.int32):
        if hi <= np.iinfo(dt).max:
            return labels.astype(dt)
    return labels.astype(np.int64)


class ShardDataset(Dataset):
    """A map-style dataset over WebDataset tar shards: ``ds[i]`` reads sample ``i`` with one positioned read.

    Samples are numbered in manifest order: shard by shard, each shard's samples in file order, as every reader
    of this package (and webdataset without shuffling) yields them; a malformed sample keeps its number. See the
    module docstring for the index (built once, cached beside the manifest) and for what is checked.

    Args:
        manifest: a manifest path written by :func:`~torch_pretrain_update.data.shards.write_shards` (read with
            :func:`~torch_pretrain_update.data.shards.read_manifest`, which refuses urls outside its folder), a
            :class:`~torch_pretrain_update.data.shards.ShardManifest`, or a list of local shard paths.
        decoder: ``decoder(raw_sample) -> sample`` for the dict of raw member bytes (plus ``__key__`` and
            ``__url__``); default ``safe_decode()`` (:func:`~torch_pretrain_update.data.decode.safe_decode`,
            never unpickles). ``decoder=lambda s: s`` keeps the bytes.
        label_key: the label member; default the manifest's ``label_key`` (None for a list of paths: no labels).
        labels: labels to use instead of the scanned ones (e.g. pseudo-labels): 1-D integers, one per sample,
            or the path of a ``.npy`` file (memory-mapped).
        index_path: where the index is cached; default ``<manifest>.index.npz`` for a manifest and no cache for
            a list of paths.
        cache: read and write the cached index (False: build it in memory every time).
        check_sha256: check each shard against its manifest SHA-256 when it is (re-)indexed.
        allow_unsafe_urls: passed to ``read_manifest`` (only for a manifest you trust).
        max_open_files: shards each process keeps open at once.

    Attributes:
        labels: 1-D integer ``numpy`` array (memory-mapped when cached), or None without a label key.
        urls: the shard paths, in order.
        shard_starts: int64 array of length ``num_shards + 1``: shard ``s`` holds samples
            ``shard_starts[s]:shard_starts[s + 1]``.

    Raises:
        DamagedShardError: a shard that is damaged, changed since its manifest was written (SHA-256), or whose
            sample count or class histogram differs from its manifest's (a ``ValueError`` naming the shard).
        ValueError: bad arguments, a compressed shard, ``labels`` of the wrong length.

    Example::

        >>> ds = ShardDataset("/data/train-manifest.json")
        >>> len(ds), ds[0]["__index__"], ds[0]["__key__"]
        (25, 0, '000000')
        >>> sampler = ClassBalancedSampler(ds.labels, seed=0)           # no sample read
        >>> loader = StatefulDataLoader(ds, sampler=sampler, batch_size=64, num_workers=4)
        >>> # balance within a selection, without copying data:
        >>> subset = torch.utils.data.Subset(ds, selected)
        >>> loader = DataLoader(subset, sampler=ClassBalancedSampler(ds.labels[selected]), batch_size=64)
    """

    def __init__(
        self,
        manifest: str | os.PathLike | ShardManifest | Sequence[str | os.PathLike],
        *,
        decoder: Callable[[dict[str, Any]], Any] | None = None,
        label_key: str | None = None,
        labels: Any = None,
        index_path: str | os.PathLike | None = None,
        cache: bool = True,
        check_sha256: bool = True,
        allow_unsafe_urls: bool = False,
        max_open_files: int = 128,
    ) -> None:
        if decoder is None:
            decoder = safe_decode()
        elif not callable(decoder):
            raise TypeError(f"decoder must be callable (a sample dict -> a sample); got {type(decoder).__name__}")
        if label_key is not None and (not isinstance(label_key, str) or not label_key):
            raise TypeError(f"label_key must be a non-empty str or None; got {label_key!r}")
        cache = check_bool(cache, "cache")
        check_sha256 = check_bool(check_sha256, "check_sha256")
        allow_unsafe_urls = check_bool(allow_unsafe_urls, "allow_unsafe_urls")
        self.max_open_files = check_int(max_open_files, "max_open_files", min_value=1)
        self.decoder = decoder

        counts: list[int] | None = None
        hashes: list[str | None]
        histograms: list[tuple[int, ...]] | None = None
        if isinstance(manifest, (str, os.PathLike, ShardManifest)):
            man = manifest if isinstance(manifest, ShardManifest) else read_manifest(
                manifest, allow_unsafe_urls=allow_unsafe_urls)
            urls = [_local_path(s.url, "manifest shard url") for s in man.shards]
            counts = [s.count for s in man.shards]
            hashes = [s.sha256 for s in man.shards]
            if label_key is None:
                label_key = man.label_key
            if label_key is not None and label_key == man.label_key and man.num_classes:
                histograms = [s.class_counts for s in man.shards]
            default_index = man.path + ".index.npz"
            self.manifest: str | None = man.path
        elif isinstance(manifest, Sequence) and not isinstance(manifest, (bytes, bytearray)):
            if not manifest:
                raise ValueError("manifest must be a manifest path or a non-empty list of shard paths; got []")
            urls = [_local_path(u, f"manifest[{i}]") for i, u in enumerate(manifest)]
            seen: dict[str, int] = {}
            for i, u in enumerate(urls):
                real = os.path.realpath(u)
                if real in seen:
                    raise ValueError(f"manifest[{i}] ({u!r}) names the same shard as manifest[{seen[real]}]: a "
                                     "shard listed twice would number its samples twice")
                seen[real] = i
            hashes = [None] * len(urls)
            default_index = None
            self.manifest = None
        else:
            raise TypeError("manifest must be a manifest path, a ShardManifest or a list of shard paths; got "
                            f"{type(manifest).__name__}")
        self.label_key = label_key
        self.urls = urls
        if index_path is not None:
            index_path = os.path.abspath(os.fspath(index_path))
        self.index_path: str | None = (index_path or default_index) if cache else None

        stats = []
        for u in urls:
            try:
                stats.append(os.stat(u))
            except OSError as exc:
                raise DamagedShardError(u, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
        self._build(stats, counts, hashes, histograms, check_sha256)
        if labels is not None:
            self._set_labels(labels)
        self._fds: dict[int, _Fd] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # ----- the index ---------------------------------------------------------------------------------------------
    def _load_cache(self) -> dict[str, Any] | None:
        """The cached index as plain arrays and meta, or None when there is none usable (rebuilt then)."""
        path = self.index_path
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
        # a cache is only trusted where it is self-consistent: spans inside their shard, in order, not overlapping
        if n:
            offsets, spans = arrays["offsets"].astype(np.int64), arrays["spans"].astype(np.int64)
            ends = offsets + spans
            shard_of = np.repeat(np.arange(counts.size), counts)
            if (spans.min() < 1 or offsets.min() < 0
                    or bool((ends * _BLOCK > arrays["sizes"][shard_of]).any())):
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
            lpath = _labels_file(path)
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

    def _build(self, stats: list[os.stat_result], counts: list[int] | None, hashes: list[str | None],
               histograms: list[tuple[int, ...]] | None, check_sha256: bool) -> None:
        cached = self._load_cache()
        reuse: dict[str, int] = {}
        if cached is not None and cached.get("label_key") == self.label_key:
            reuse = {p: s for s, p in enumerate(cached["paths"])}
        else:
            cached = None
        cstarts = None if cached is None else np.concatenate([[0], np.cumsum(cached["arrays"]["counts"])])
        # per shard: (offsets, spans, crcs, labels, count, the SHA-256 it was checked against, stat)
        parts: list[tuple[Any, ...]] = []
        rebuilt = cached is None
        for s, (url, st) in enumerate(zip(self.urls, stats)):
            want_sha = hashes[s] if check_sha256 else None
            c = reuse.get(url)
            if c is not None:
                entry = cached["shards"][c]  # type: ignore[index]
                arr = cached["arrays"]  # type: ignore[index]
                fresh = (int(arr["sizes"][c]) == st.st_size and int(arr["mtimes"][c]) == st.st_mtime_ns
                         and (want_sha is None or entry.get("sha256") == want_sha))
                if fresh:
                    lo, hi = int(cstarts[c]), int(cstarts[c + 1])  # type: ignore[index]
                    lab = cached["labels_array"]  # type: ignore[index]
                    parts.append((arr["offsets"][lo:hi], arr["spans"][lo:hi], arr["crcs"][lo:hi],
                                  None if lab is None else lab[lo:hi], hi - lo, entry.get("sha256"), st))
                    self._check_shard(url, hi - lo, counts, histograms, parts[-1][3], s)
                    continue
            rebuilt = True
            scan, st2 = _scan_shard(url, self.label_key)
            if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise DamagedShardError(url, "changed while the dataset was being built")
            if want_sha is not None:
                got = _sha256(url)
                if got != want_sha:
                    raise DamagedShardError(url, "its SHA-256 differs from the manifest's: the file was modified after "
                                                 "the manifest was written")
            n = scan.offsets.size
            self._check_shard(url, n, counts, histograms, scan.labels, s)
            parts.append((scan.offsets, scan.spans, scan.crcs, scan.labels, n, want_sha, st))
        if cached is not None and cached["paths"] != self.urls:
            rebuilt = True  # shards added, removed or reordered: save the new list
        self._assemble(parts, reuse_whole=not rebuilt, cached=cached)
        if rebuilt and self.index_path is not None:
            self._save(parts)

    def _check_shard(self, url: str, n: int, counts: list[int] | None,
                     histograms: list[tuple[int, ...]] | None, labels: np.ndarray | None, s: int) -> None:
        if counts is not None and n != counts[s]:
            raise DamagedShardError(url, f"holds {n} samples but its manifest count is {counts[s]} (the manifest "
                                         "does not describe this shard)")
        if histograms is not None and labels is not None and histograms[s]:
            want = np.asarray(histograms[s], dtype=np.int64)
            got = np.bincount(np.asarray(labels, dtype=np.int64), minlength=want.size)
            if got.size != want.size or not np.array_equal(got, want):
                raise DamagedShardError(url, f"class histogram {got.tolist()} of its labels differs from the "
                                             f"manifest's {want.tolist()}")

    def _assemble(self, parts: list[tuple[Any, ...]], *, reuse_whole: bool, cached: dict[str, Any] | None) -> None:
        counts = np.asarray([p[4] for p in parts], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._starts = self.shard_starts.tolist()
        self._n = int(self.shard_starts[-1])
        self._stat = [(p[6].st_size, p[6].st_mtime_ns) for p in parts]
        if reuse_whole and cached is not None and len(parts) == len(cached["paths"]) and all(
                a == b for a, b in zip(self.urls, cached["paths"])):
            arr = cached["arrays"]
            self._offsets, self._spans, self._crcs = arr["offsets"], arr["spans"], arr["crcs"]
            self._labels = cached["labels_array"]
            self._labels_source = None if self._labels is None else _labels_file(self.index_path or "")
            return
        if any(p[1].size and int(p[1].max()) >= _UINT32_BLOCKS for p in parts):
            raise ValueError("a sample spans 2 TiB or more: too large to index")
        big = any(p[0].size and int(p[0].max()) + int(p[1].max()) >= _UINT32_BLOCKS for p in parts)

        def cat(k: int, dtype: Any) -> np.ndarray:
            return np.concatenate([np.asarray(p[k]).astype(dtype, copy=False) for p in parts]) if parts else \
                np.zeros(0, dtype)

        self._offsets = cat(0, np.int64 if big else np.uint32)
        self._spans, self._crcs = cat(1, np.uint32), cat(2, np.uint32)
        self._labels = None if self.label_key is None else _smallest_int(cat(3, np.int64))
        self._labels_source = None

    def _save(self, parts: list[tuple[Any, ...]]) -> None:
        path = self.index_path
        if path is None:
            return
        try:
            _write_index(path, urls=self.urls, sha256s=[p[5] for p in parts], counts=[p[4] for p in parts],
                         sizes=[s for s, _ in self._stat], mtimes_ns=[m for _, m in self._stat],
                         offsets=self._offsets, spans=self._spans, crcs=self._crcs, labels=self._labels,
                         label_key=self.label_key, manifest=self.manifest)
        except OSError as exc:
            warnings.warn(f"ShardDataset: could not cache the index at {path!r} ({exc}); it will be built again "
                          "next time (pass index_path= to put it elsewhere)", RuntimeWarning, stacklevel=3)
            return
        if self._labels is not None:  # serve the labels memory-mapped, as a cached index would
            self._labels = np.load(_labels_file(path), mmap_mode="r", allow_pickle=False)
            self._labels_source = _labels_file(path)

    def _set_labels(self, labels: Any) -> None:
        source = None
        if isinstance(labels, (str, os.PathLike)):
            source = os.path.abspath(os.fspath(labels))
            arr = np.load(source, mmap_mode="r", allow_pickle=False)
        else:
            arr = labels.numpy() if hasattr(labels, "numpy") and not isinstance(labels, np.ndarray) else labels
            arr = np.asarray(arr)
        if arr.ndim != 1 or arr.shape[0] != self._n:
            raise ValueError(f"labels must be 1-D with one label per sample ({self._n}); got shape {arr.shape}")
        if self._n:
            check_labels(arr, "labels", max_classes=None)
        self._labels, self._labels_source = arr, source

    # ----- reading -----------------------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray | None:
        """1-D integer labels, one per sample (memory-mapped when cached); None without a label key."""
        return self._labels

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def index_nbytes(self) -> int:
        """Bytes the index holds in memory (offsets, spans, key CRCs; labels not included)."""
        return int(self._offsets.nbytes + self._spans.nbytes + self._crcs.nbytes)

    def __len__(self) -> int:
        return self._n

    def _position(self, index: Any) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"ShardDataset indices must be integers; got {type(index).__name__}") from None
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"ShardDataset index {index} out of range for {self._n} samples")
        return i

    def _file(self, s: int) -> _Fd:
        if self._pid != os.getpid():  # forked: the parent's descriptors share its file state; use our own
            self._fds = {}
            self._pid = os.getpid()
            self._lock = threading.Lock()
        f = self._fds.get(s)
        if f is not None:
            return f
        with self._lock:
            f = self._fds.get(s)
            if f is not None:
                return f
            url = self.urls[s]
            try:
                f = _Fd(os.open(url, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
            except OSError as exc:
                raise DamagedShardError(url, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
            st = os.fstat(f.fd)
            if (st.st_size, st.st_mtime_ns) != self._stat[s]:
                raise DamagedShardError(url, f"changed since its index was built (size {self._stat[s][0]} -> "
                                             f"{st.st_size} bytes, or its modification time): build the "
                                             "ShardDataset again to re-index it")
            while len(self._fds) >= self.max_open_files:
                self._fds.pop(next(iter(self._fds)))  # oldest first; a read in flight keeps its _Fd alive
            self._fds[s] = f
            return f

    def raw(self, index: int) -> dict[str, Any]:
        """Sample ``index`` undecoded: ``{"__key__", "__url__", suffix: bytes, ...}`` (no ``__index__``)."""
        return self._read(self._position(index))

    def _read(self, i: int) -> dict[str, Any]:
        s = bisect.bisect_right(self._starts, i) - 1
        url = self.urls[s]
        offset = int(self._offsets[i]) * _BLOCK
        span = int(self._spans[i]) * _BLOCK
        f = self._file(s)  # held through the read: an eviction by another thread cannot close it meanwhile
        data = os.pread(f.fd, span, offset)
        del f
        if len(data) != span:
            raise DamagedShardError(url, f"sample {i}: {len(data)} of {span} bytes at byte {offset} could be read "
                                         "(the shard was truncated after it was indexed)")
        sample: dict[str, Any] = {}
        key: bytes | None = None
        pos = 0
        try:
            while pos < span:
                member = _parse_member(data, pos, False)
                if member is None:
                    raise _BadHeader(pos, "an end-of-archive block inside the sample")
                _, name, data_start, size, regular = member
                end = data_start + size
                if end > span:
                    raise _BadHeader(pos, f"member {_text(name)!r} runs past the sample's indexed span")
                pos = data_start + _padded(size)
                if not regular:
                    continue
                mkey, suffix = _split_name(name)
                if mkey is None:
                    continue
                if key is None:
                    key = mkey
                    if zlib.crc32(key) != int(self._crcs[i]):
                        raise _BadHeader(0, f"the header names sample {_text(key)!r}, not the indexed one")
                elif mkey != key:
                    raise _BadHeader(pos, f"member {_text(name)!r} belongs to another sample than {_text(key)!r}")
                text = _text(suffix).lower()
                problem = None
                try:
                    name.decode("utf-8")
                except UnicodeDecodeError:
                    problem = f"member name {_text(name)!r} is not valid UTF-8"
                if problem is None and text.startswith("__"):
                    problem = (f"member {_text(name)!r} is named like the sample's metadata ({text!r}); webdataset "
                               "would overwrite the metadata or drop the sample")
                if problem is None and text in sample:
                    problem = (f"member {_text(name)!r} repeats the member {text!r} (suffixes are compared in lower "
                               "case), so one of them would be lost")
                if problem is not None:
                    raise MalformedSampleError(url, f"sample __key__={_text(key)!r}: {problem}", key=_text(key),
                                               member=_text(name))
                sample[text] = data[data_start:end]
        except _BadHeader as bad:
            raise DamagedShardError(url, f"sample {i} (byte {offset + bad.pos}): {bad.why}; the shard changed "
                                         "since its index was built, or the index is damaged (delete "
                                         f"{self.index_path!r} to rebuild it)") from None
        if key is None:
            raise DamagedShardError(url, f"sample {i}: no member at byte {offset}; the index is damaged")
        sample["__key__"] = _text(key)
        sample["__url__"] = url
        return sample

    def __getitem__(self, index: int) -> Any:
        i = self._position(index)
        out = self.decoder(self._read(i))
        if isinstance(out, dict):
            out["__index__"] = i
        return out

    def close(self) -> None:
        """Close this process's open shards (they are opened again by the next read)."""
        self._fds = {}

    # ----- pickling: open files stay in their process ----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_lock"] = None
        if self._labels_source is not None:
            state["_labels"] = None  # memory-mapped again on the other side instead of copied through the pipe
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        if self._labels_source is not None:
            self._labels = np.load(self._labels_source, mmap_mode="r", allow_pickle=False)

    def __repr__(self) -> str:
        return (f"ShardDataset({self._n} samples in {len(self.urls)} shards, label_key={self.label_key!r}, "
                f"index={self.index_path!r})")


