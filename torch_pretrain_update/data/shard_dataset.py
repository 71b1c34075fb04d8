"""Random access to WebDataset shards: a map-style dataset that reads sample ``i`` with one positioned read.

:class:`ShardDataset` turns tar shards (written by :func:`~torch_pretrain_update.data.write.write_shards`, or by
``webdataset.ShardWriter``/``TarWriter``) into a ``torch.utils.data.Dataset``: ``len(ds)``, and ``ds[i]`` the
safely decoded sample with its global index ``"__index__": i``. So every sampler of this library (and
``torch.utils.data.Subset``) works on data too big for memory exactly as on an in-memory dataset, and
``ds.labels`` (read once, kept as a memory-mapped array) lets the class-aware samplers start without reading a
sample.

**The index** (:mod:`~torch_pretrain_update.data.shard_index`): per sample, where its first tar header starts,
how many 512-byte blocks it spans and a CRC-32 of its key, 12 bytes per sample. Reading ``ds[i]`` is one
``os.pread`` of that span; the member headers inside it are parsed then. It is built once by a scan of the tar
headers and cached beside the manifest (``<manifest>.index.npz``, labels in ``<manifest>.index.labels.npy``);
``write_shards`` writes it with the shards, so a dataset it wrote opens without a scan.

**What is checked, so that nothing is read from the wrong place silently.**

- Building: every header's checksum, the end-of-archive block (a truncated or corrupt shard raises
  :class:`~torch_pretrain_update.data.errors.DamagedShardError` naming it, where ``tarfile`` would silently stop),
  each shard's sample count against the manifest and its labels against the manifest's class histogram
  (``DamagedShardError``, a ``ValueError``, naming the shard), the SHA-256 against the manifest's.
- Opening a shard (once per process): its size and modification time against the index; a shard changed since
  the dataset was built raises ``DamagedShardError`` naming it.
- Every read: every header in the span is a tar header of the sample the index names (its key's CRC-32), the
  members tile the span exactly; a sample whose member names repeat, use the metadata names or are not UTF-8
  raises :class:`~torch_pretrain_update.data.errors.MalformedSampleError` (as the package's stream readers do;
  it still counts as a sample, so indices match the manifest's counts).

**Workers and processes.** Each process opens each shard lazily, at most ``max_open_files`` at a time; open files
are never pickled (a spawned DataLoader worker opens its own) and are re-opened after a ``fork``. Reads use
``os.pread`` (no shared file position), so threads may share a dataset too.

Only uncompressed local tar files can be read by offset; a ``.tar.gz`` shard is refused with a message saying so.
"""

from __future__ import annotations

import bisect
import operator
import os
import threading
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import numpy as np
from torch.utils.data import Dataset

from torch_pretrain_update._checks import check_bool, check_int, check_labels
from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.errors import DamagedShardError
from torch_pretrain_update.data.manifest import ShardManifest, local_file_path, read_manifest
from torch_pretrain_update.data.shard_index import build_index
from torch_pretrain_update.data.tar_headers import BLOCK, BadHeader, parse_sample

__all__ = ["ShardDataset"]


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
    path = local_file_path(url)
    if path is None and not os.path.exists(url):
        raise ValueError(f"{what} {url!r} is not a local file: ShardDataset reads samples by byte offset, which "
                         "needs local (or mounted) uncompressed .tar files; stream remote shards with "
                         "WeightedWebDataset instead")
    return os.path.abspath(url if path is None else path)


class _Shards(NamedTuple):
    """What ``manifest=`` says about the shards."""

    urls: list[str]
    counts: list[int] | None
    hashes: list[str | None]
    histograms: list[tuple[int, ...]] | None
    label_key: str | None
    manifest: str | None  # the manifest's path


def _shards(manifest: Any, label_key: str | None, allow_unsafe_urls: bool) -> _Shards:
    if isinstance(manifest, (str, os.PathLike, ShardManifest)):
        man = manifest if isinstance(manifest, ShardManifest) else read_manifest(
            manifest, allow_unsafe_urls=allow_unsafe_urls)
        if label_key is None:
            label_key = man.label_key
        histograms = None
        if label_key is not None and label_key == man.label_key and man.num_classes:
            histograms = [s.class_counts for s in man.shards]
        return _Shards([_local_path(s.url, "manifest shard url") for s in man.shards], [s.count for s in man.shards],
                       [s.sha256 for s in man.shards], histograms, label_key, man.path)
    if isinstance(manifest, Sequence) and not isinstance(manifest, (bytes, bytearray)):
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
        return _Shards(urls, None, [None] * len(urls), None, label_key, None)
    raise TypeError("manifest must be a manifest path, a ShardManifest or a list of shard paths; got "
                    f"{type(manifest).__name__}")


class ShardDataset(Dataset):
    """A map-style dataset over WebDataset tar shards: ``ds[i]`` reads sample ``i`` with one positioned read.

    Samples are numbered in manifest order: shard by shard, each shard's samples in file order, as every reader
    of this package (and webdataset without shuffling) yields them; a malformed sample keeps its number. See the
    module docstring for the index (built once, cached beside the manifest) and for what is checked.

    Args:
        manifest: a manifest path written by :func:`~torch_pretrain_update.data.write.write_shards` (read with
            :func:`~torch_pretrain_update.data.manifest.read_manifest`, which refuses urls outside its folder), a
            :class:`~torch_pretrain_update.data.manifest.ShardManifest`, or a list of local shard paths.
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
        shards = _shards(manifest, label_key, allow_unsafe_urls)
        self.label_key = shards.label_key
        self.urls = shards.urls
        self.manifest = shards.manifest
        default_index = None if shards.manifest is None else shards.manifest + ".index.npz"
        if index_path is not None:
            index_path = os.path.abspath(os.fspath(index_path))
        self.index_path: str | None = (index_path or default_index) if cache else None

        stats = []
        for u in self.urls:
            try:
                stats.append(os.stat(u))
            except OSError as exc:
                raise DamagedShardError(u, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
        index = build_index(self.urls, stats, label_key=self.label_key, counts=shards.counts, hashes=shards.hashes,
                            histograms=shards.histograms, check_sha256=check_sha256, index_path=self.index_path,
                            manifest=self.manifest)
        self._offsets, self._spans, self._crcs = index.offsets, index.spans, index.crcs
        self._labels, self._labels_source = index.labels, index.labels_source
        self._stat = index.stat
        self.shard_starts = np.concatenate([[0], np.cumsum(np.asarray(index.counts, dtype=np.int64))]).astype(np.int64)
        self._starts = self.shard_starts.tolist()
        self._n = int(self.shard_starts[-1])
        if labels is not None:
            self._set_labels(labels)
        self._fds: dict[int, _Fd] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

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
        offset = int(self._offsets[i]) * BLOCK
        span = int(self._spans[i]) * BLOCK
        f = self._file(s)  # held through the read: an eviction by another thread cannot close it meanwhile
        data = os.pread(f.fd, span, offset)
        del f
        if len(data) != span:
            raise DamagedShardError(url, f"sample {i}: {len(data)} of {span} bytes at byte {offset} could be read "
                                         "(the shard was truncated after it was indexed)")
        try:
            sample = parse_sample(data, int(self._crcs[i]), url)
        except BadHeader as bad:
            raise DamagedShardError(url, f"sample {i} (byte {offset + bad.pos}): {bad.why}; the shard changed "
                                         "since its index was built, or the index is damaged (delete "
                                         f"{self.index_path!r} to rebuild it)") from None
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
