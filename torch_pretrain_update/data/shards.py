"""WebDataset shards with a manifest: writing, strict reading and inspection.

A **manifest** is a small JSON file written next to the shards by :func:`write_shards`. It records, for every
shard, the number of samples, the class histogram, the byte size and the SHA-256 of the file. Readers use it to
catch what the tar format cannot: Python's ``tarfile`` (used by webdataset) treats an invalid header after the
start of an archive as its end, so a shard with a corrupt header in the middle silently loses the rest of its
samples, even under webdataset's default ``reraise_exception`` handler. Comparing the number of samples read
with the manifest's count catches every such loss.

:func:`iter_shard_files` is the strict per-shard reader used by the streams, by :func:`inspect_shards` and, as
a drop-in for ``webdataset.tarfile_to_samples`` in ``wds.DataPipeline``, by :func:`strict_tarfile_to_samples`: like
``webdataset.tariterators.tar_file_iterator`` but it also checks how the archive ended. A well-formed tar ends
with a zero block; when ``tarfile`` stops at anything else (no block at all: truncated at a header boundary; a
partial block: truncated inside a header; a non-zero block: a corrupt header) the reader raises
:class:`DamagedShardError` naming the shard and the byte offset. That detects truncation and corrupt headers even
*without* a manifest. What only a manifest detects: a shard that is a complete, well-formed tar archive but holds
fewer (or more) samples than were written, a shard that is missing altogether, and changed bytes (SHA-256).

Manifest format (``version`` 1)::

    {"format": "torch-pretrain-update/shards", "version": 1, "label_key": "cls", "num_classes": 3,
     "num_samples": 25, "class_counts": [9, 8, 8],
     "shards": [{"url": "train-000000.tar", "count": 10, "class_counts": [4, 3, 3], "bytes": 51200,
                 "sha256": "..."}, ...]}

Shard ``url`` entries are relative to the manifest's directory (so the directory can be moved);
:func:`read_manifest` resolves them to absolute paths.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen as wds_gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys

from torch_pretrain_update._checks import check_int
from torch_pretrain_update.data.decode import _npy_header

__all__ = [
    "DamagedShardError",
    "ShardInfo",
    "ShardManifest",
    "ShardReport",
    "InspectReport",
    "write_shards",
    "read_manifest",
    "expand_urls",
    "iter_shard_files",
    "iter_shard_samples",
    "strict_tarfile_to_samples",
    "StrictTarfileSamples",
    "parse_label",
    "inspect_shards",
]

MANIFEST_FORMAT = "torch-pretrain-update/shards"
MANIFEST_VERSION = 1

#: Member extensions whose standard decoders execute code (pickle) or may do so (``.pth`` without
#: ``weights_only``). Nothing in this module ever decodes them; :func:`inspect_shards` reports them.
_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth")

_META_RE = re.compile(r"__[^/]*__($|/)")


class DamagedShardError(ValueError):
    """A shard that cannot be read completely: truncated, corrupt, empty, unreadable, or whose sample count
    disagrees with its manifest. ``url`` names the shard and ``reason`` says what is wrong."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"damaged shard {url!r}: {reason}")
        self.url = url
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard's manifest entry. ``url`` is absolute once read through :func:`read_manifest`."""

    url: str
    count: int
    class_counts: tuple[int, ...] = ()
    bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ShardManifest:
    """A parsed manifest (see the module docstring). ``shards`` keep the order they were written in."""

    path: str
    shards: tuple[ShardInfo, ...]
    label_key: str | None
    num_classes: int

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def class_counts(self) -> list[int]:
        """Total samples per class over all shards (length ``num_classes``)."""
        total = [0] * self.num_classes
        for s in self.shards:
            for c, n in enumerate(s.class_counts):
                total[c] += n
        return total

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    def lookup(self, url: str) -> ShardInfo | None:
        """The entry for ``url`` (matched by absolute path, else by file name when that is unique)."""
        index = self._index()
        hit = index["abs"].get(_abs(url))
        if hit is not None:
            return hit
        by_name = index["name"].get(os.path.basename(url))
        return by_name if isinstance(by_name, ShardInfo) else None

    def _index(self) -> dict[str, dict[str, Any]]:
        cached = self.__dict__.get("_cached_index")
        if cached is None:
            names: dict[str, Any] = {}
            for s in self.shards:
                name = os.path.basename(s.url)
                names[name] = s if name not in names else None  # None marks an ambiguous file name
            cached = {"abs": {_abs(s.url): s for s in self.shards}, "name": names}
            object.__setattr__(self, "_cached_index", cached)
        return cached


def _abs(url: str) -> str:
    if url.startswith("file:"):
        url = re.sub(r"^file:(//)?", "", url)
    if re.match(r"^[a-z][a-z0-9+.-]*:", url):  # pipe:, http:, s3: ... compared verbatim
        return url
    return os.path.normpath(os.path.abspath(url))


def read_manifest(path: str | os.PathLike) -> ShardManifest:
    """Read and validate a manifest written by :func:`write_shards`.

    Args:
        path: the manifest's path.

    Returns:
        a :class:`ShardManifest` whose shard urls are absolute paths.

    Raises:
        ValueError: the file is not a manifest of this format or its entries are inconsistent.

    Example::

        >>> m = read_manifest(write_shards(samples, "/data/train-%06d.tar"))
        >>> m.num_samples, m.class_counts
    """
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"manifest must be a path; got {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"manifest {path!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {path!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {path!r} is not a {MANIFEST_FORMAT!r} manifest (format field missing or wrong)")
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"manifest {path!r} has version {raw.get('version')!r}; this library reads version 1")
    num_classes = raw.get("num_classes", 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"manifest {path!r}: num_classes must be a non-negative int; got {num_classes!r}")
    base = os.path.dirname(os.path.abspath(path))
    shards = []
    entries = raw.get("shards")
    if not isinstance(entries, list):
        raise ValueError(f"manifest {path!r}: 'shards' must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("url"), str):
            raise ValueError(f"manifest {path!r}: shards[{i}] must be an object with a string 'url'")
        count = e.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"manifest {path!r}: shards[{i}] ({e['url']!r}) count must be an int >= 0; got {count!r}")
        cc = e.get("class_counts", [])
        if not isinstance(cc, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in cc):
            raise ValueError(f"manifest {path!r}: shards[{i}] class_counts must be a list of ints >= 0")
        if num_classes and (len(cc) != num_classes or sum(cc) != count):
            raise ValueError(
                f"manifest {path!r}: shards[{i}] ({e['url']!r}) class_counts {cc} must have num_classes="
                f"{num_classes} entries summing to count={count}"
            )
        url = e["url"]
        if not re.match(r"^[a-z][a-z0-9+.-]*:", url) and not os.path.isabs(url):
            url = os.path.normpath(os.path.join(base, url))
        shards.append(ShardInfo(url=url, count=count, class_counts=tuple(cc), bytes=e.get("bytes"),
                                sha256=e.get("sha256")))
    return ShardManifest(path=os.path.abspath(path), shards=tuple(shards), label_key=raw.get("label_key"),
                         num_classes=num_classes)


def _as_manifest(manifest: str | os.PathLike | ShardManifest | None) -> ShardManifest | None:
    if manifest is None or isinstance(manifest, ShardManifest):
        return manifest
    if isinstance(manifest, (str, os.PathLike)):
        return read_manifest(manifest)
    raise TypeError(f"manifest must be a path or a ShardManifest; got {type(manifest).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# writing


def parse_label(value: Any) -> int:
    """A class label as stored in a sample (int, numpy/torch integer, or the ASCII bytes/str webdataset writes
    for ``.cls``) -> a Python int >= 0. Raises ``ValueError`` (a readable message without the argument name;
    callers add the shard and key)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("ascii", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"label {value!r} is not an integer")
        value = int(text)
    elif isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise ValueError(f"label must be a single integer; got a tensor of shape {tuple(value.shape)}, "
                             f"dtype {value.dtype}")
        value = int(value.item())
    elif isinstance(value, np.ndarray):
        if value.size != 1 or value.dtype.kind not in "iu":
            raise ValueError(f"label must be a single integer; got an array of shape {value.shape}, "
                             f"dtype {value.dtype}")
        value = int(value.reshape(()))
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"label {value!r} of type {type(value).__name__} is not an integer")
    value = int(value)
    if value < 0:
        raise ValueError(f"label {value} is negative")
    return value


def _default_manifest_path(pattern: str) -> str:
    prefix = pattern[: pattern.index("%")]
    return prefix + "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        the manifest's path (accepted by :func:`read_manifest`, :func:`inspect_shards` and ``manifest=`` of
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
    sizes: dict[str, tuple[int, str]] = {}

    def _post(fname: str) -> None:
        sizes[fname] = (os.path.getsize(fname), _sha256(fname))

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
                if label_key not in sample:
                    raise ValueError(f"samples[{n}] (key {key!r}) has no label member {label_key!r}")
                try:
                    label = parse_label(sample[label_key])
                except ValueError as exc:
                    raise ValueError(f"samples[{n}] (key {key!r}), member {label_key!r}: {exc}") from None
                if num_classes is not None and label >= num_classes:
                    raise ValueError(f"samples[{n}] (key {key!r}): label {label} must be < num_classes={num_classes}")
                if not isinstance(sample[label_key], int):
                    sample = {**sample, label_key: label}  # numpy/torch scalars would be str()-encoded wrongly
            writer.write(dict(sample))
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
    mdir = os.path.dirname(os.path.abspath(manifest_path))
    shards = []
    for fname in order:
        nbytes, digest = sizes[fname]
        hist = [hists[fname].get(c, 0) for c in range(c_total)] if label_key is not None else []
        shards.append({"url": os.path.relpath(os.path.abspath(fname), mdir), "count": counts[fname],
                       "class_counts": hist, "bytes": nbytes, "sha256": digest})
    class_counts = [sum(s["class_counts"][c] for s in shards) for c in range(c_total)]
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "label_key": label_key,
           "num_classes": c_total if label_key is not None else 0, "num_samples": sum(counts.values()),
           "class_counts": class_counts if label_key is not None else [], "shards": shards}
    os.makedirs(mdir, exist_ok=True)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, manifest_path)
    return manifest_path


# ----------------------------------------------------------------------------------------------------------------
# strict reading


class _HeaderRecordingTarInfo(tarfile.TarInfo):
    """``TarInfo`` that records on its ``TarFile`` the header error that ended the iteration.

    Why not a library function: ``tarfile`` converts an invalid, truncated or missing header after the start of
    an archive into "end of archive" and keeps no trace of which it was, and webdataset's
    ``tar_file_iterator`` discards the ``TarFile``. ``fromtarfile`` is where every header is parsed; the error
    it raises last tells a proper end (``EOFHeaderError``: a zero block) from damage. One extra call per header.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf._tpu_header_error = exc  # type: ignore[attr-defined]
            raise


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def iter_shard_files(url: str, *, check_end: bool = True) -> Iterator[dict[str, Any]]:
    """The members of one tar shard as webdataset file records ``{"fname", "data", "__url__"}``.

    Same skipping rules as ``webdataset.tariterators.tar_file_iterator`` (non-regular files and ``__meta__``
    entries are skipped), opened with webdataset's ``gopen`` (local paths, ``file:``, ``pipe:``, ``http(s):``).
    Unlike it, every problem raises :class:`DamagedShardError` naming the shard: unopenable or empty file,
    truncated member data, a bad header anywhere, and (``check_end``) an archive that does not end with a zero
    block (truncated at a header boundary, or a corrupt header that ``tarfile`` would silently treat as the end).

    Example::

        >>> [r["fname"] for r in iter_shard_files("/data/train-000000.tar")][:2]
        ['000000.cls', '000000.npy']
    """
    try:
        stream = wds_gopen(url, "rb")
    except Exception as exc:  # FileNotFoundError, PermissionError, a failing pipe ...
        raise DamagedShardError(url, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderRecordingTarInfo)
        except _READ_ERRORS as exc:
            reason = "empty file" if "empty file" in str(exc) else f"not a readable tar archive ({exc})"
            raise DamagedShardError(url, reason) from exc
        fname = None
        try:
            for tarinfo in tf:
                fname = tarinfo.name
                if not tarinfo.isreg() or fname is None:
                    continue
                if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                    continue
                if _META_RE.match(fname):
                    continue
                data = tf.extractfile(tarinfo).read()
                if len(data) != tarinfo.size:
                    raise DamagedShardError(url, f"member {fname!r} truncated: {len(data)} of {tarinfo.size} bytes")
                yield {"fname": fname, "data": data, "__url__": url}
                tf.members = []
        except DamagedShardError:
            raise
        except _READ_ERRORS as exc:
            where = f"after member {fname!r}" if fname else "at the first member"
            if "unexpected end of data" in str(exc):
                raise DamagedShardError(url, f"truncated inside member {fname!r} (unexpected end of data)") from exc
            raise DamagedShardError(url, f"unreadable {where}: {exc}") from exc
        end = getattr(tf, "_tpu_header_error", None)
        if check_end and not isinstance(end, tarfile.EOFHeaderError):
            offset = tf.offset
            after = f" after member {fname!r}" if fname else ""
            if isinstance(end, tarfile.EmptyHeaderError):
                raise DamagedShardError(url, f"ends without an end-of-archive block at byte {offset}{after} "
                                             "(truncated at a header boundary)")
            if isinstance(end, tarfile.TruncatedHeaderError):
                raise DamagedShardError(url, f"truncated inside a header at byte {offset}{after}")
            raise DamagedShardError(url, f"invalid (corrupt) header at byte {offset}{after} ({end}); tarfile "
                                         "stops reading there, so the rest of the shard is lost")
    finally:
        stream.close()


def iter_shard_samples(url: str, *, check_end: bool = True, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of one shard: :func:`iter_shard_files` grouped by key with webdataset's
    ``group_by_keys``. A sample cut off by damage is never yielded; the :class:`DamagedShardError` follows the
    last complete one.

    ``expected`` (the shard's manifest count) adds the count check: a shard that ends after fewer samples (a
    rewritten shard, or damage ``check_end=False`` lets through), or holds more, raises a
    :class:`DamagedShardError` saying how many were read; so does damage, with the count read before it."""
    samples = group_by_keys(iter_shard_files(url, check_end=check_end))
    if expected is None:
        return samples
    return _counted(url, samples, check_int(expected, "expected", min_value=0))


def _counted(url: str, samples: Iterator[dict[str, Any]], expected: int) -> Iterator[dict[str, Any]]:
    n = 0
    try:
        for sample in samples:
            if n == expected:
                extra = 1 + sum(1 for _ in samples)
                raise DamagedShardError(url, f"holds {expected + extra} samples but its manifest count is "
                                             f"{expected} ({extra} extra)")
            n += 1
            yield sample
    except DamagedShardError as exc:
        if n < expected and exc.url == url:
            raise DamagedShardError(url, f"{exc.reason}; {n} of the manifest's {expected} samples read") from exc
        raise
    if n < expected:
        raise DamagedShardError(
            url,
            f"{n} samples read but the manifest says {expected}: the shard ended early (a corrupt header or "
            "truncation that tarfile treats as the end of the archive, or a rewritten shard)",
        )


#: messages kept in ``StrictTarfileSamples.stats["events"]``
_MAX_EVENTS = 50


class StrictTarfileSamples:
    """The stage :func:`strict_tarfile_to_samples` returns: shard sources -> raw samples, with ``stats``.

    Attributes:
        handler: the webdataset-style exception handler for damaged shards.
        manifest: the :class:`ShardManifest` the shards are checked against, or ``None``.
        stats: counts over every pass of this stage: ``shards`` (shards opened), ``samples`` (yielded),
            ``damaged_shards`` (shards the handler skipped, or the one it raised or stopped on),
            ``lost_samples`` (samples of damaged shards never yielded: their manifest count minus what was read;
            without a manifest a damaged shard's loss is unknown and not counted here) and ``events`` (the first
            50 error messages, each naming its shard). With DataLoader workers each worker counts its own.
    """

    def __init__(self, handler: Callable[[BaseException], Any], manifest: ShardManifest | None) -> None:
        self.handler = handler
        self.manifest = manifest
        self.stats: dict[str, Any] = {"shards": 0, "samples": 0, "damaged_shards": 0, "lost_samples": 0,
                                      "events": []}

    def __call__(self, src: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in src:
            if not isinstance(source, Mapping) or not isinstance(source.get("url"), str):
                raise TypeError(f"strict_tarfile_to_samples: each source must be a dict with a str 'url' (as "
                                f"webdataset.SimpleShardList yields); got {source!r}")
            url = source["url"]
            expected = None
            if self.manifest is not None:
                info = self.manifest.lookup(url)
                if info is None:
                    raise ValueError(f"strict_tarfile_to_samples: shard {url!r} is not listed in the manifest "
                                     f"{self.manifest.path!r}")
                expected = info.count
            self.stats["shards"] += 1
            n = 0
            try:
                for sample in iter_shard_samples(url, expected=expected):
                    n += 1
                    self.stats["samples"] += 1
                    yield sample
            except Exception as exc:  # DamagedShardError, or group_by_keys's ValueError (a repeated member)
                if not isinstance(exc, DamagedShardError):
                    cause, exc = exc, DamagedShardError(url, f"{type(exc).__name__}: {exc}")
                    exc.__cause__ = cause
                self.stats["damaged_shards"] += 1
                self.stats["lost_samples"] += max(0, expected - n) if expected is not None else 0
                if len(self.stats["events"]) < _MAX_EVENTS:
                    self.stats["events"].append(str(exc))
                if not self.handler(exc):  # raises by default; False stops the stream (webdataset's convention)
                    return

    def __repr__(self) -> str:
        man = None if self.manifest is None else self.manifest.path
        return f"{type(self).__name__}(handler={getattr(self.handler, '__name__', self.handler)}, manifest={man!r})"


def strict_tarfile_to_samples(
    handler: Callable[[BaseException], Any] = reraise_exception,
    *,
    manifest: str | os.PathLike | ShardManifest | None = None,
) -> StrictTarfileSamples:
    """A drop-in for ``webdataset.tarfile_to_samples`` that never loses the rest of a shard silently.

    webdataset 1.0.2's reader uses ``tarfile``, which takes a corrupt header, or a file truncated at a header,
    for the end of the archive: the rest of the shard vanishes with no error even under ``reraise_exception``,
    and a skipping handler counts nothing. This stage reads each shard with :func:`iter_shard_samples` (which
    checks the end-of-archive block) and, given a manifest, checks each shard's sample count. Every damaged
    shard raises a :class:`DamagedShardError` naming it through ``handler``, and is counted in ``stats``.

    Args:
        handler: webdataset's convention: ``reraise_exception`` (default) raises; a handler returning True
            (``warn_and_continue``, ``ignore_and_continue``) skips the rest of the damaged shard and goes on with
            the next; False (``ignore_and_stop``) ends the stream. Either way the shard is counted.
        manifest: a manifest path (or :class:`ShardManifest`) from :func:`write_shards`: adds the per-shard count
            check (the only detector of a well-formed shard that lost whole samples) and the ``lost_samples``
            count. Every shard read must be listed in it (else ``ValueError``).

    Returns:
        a :class:`StrictTarfileSamples` stage: an iterator of ``{"url": ...}`` dicts (what
        ``webdataset.SimpleShardList`` or ``ResampledShards`` yield, split by node or worker as usual) -> raw
        samples with ``__key__`` and ``__url__``, with ``stats`` (see :class:`StrictTarfileSamples`).

    Example::

        >>> source = strict_tarfile_to_samples(wds.warn_and_continue, manifest="/data/train-manifest.json")
        >>> pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, source, safe_decode())
        >>> for sample in pipe: ...
        >>> source.stats["damaged_shards"], source.stats["lost_samples"]
    """
    if not callable(handler):
        raise TypeError(f"handler must be callable (e.g. webdataset.warn_and_continue); got {handler!r}")
    return StrictTarfileSamples(handler, _as_manifest(manifest))


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern (``"train-{000000..000009}.tar"``), a ``::``-separated list, a path, or a sequence of
    them -> a list of urls (webdataset's expansion rules)."""
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    if isinstance(urls, str):
        out = []
        for part in urls.split("::"):
            out.extend(braceexpand.braceexpand(part))
    elif isinstance(urls, Sequence):
        out = []
        for u in urls:
            if isinstance(u, os.PathLike):
                u = os.fspath(u)
            if not isinstance(u, str):
                raise TypeError(f"urls must contain strings; got {type(u).__name__}")
            out.append(u)
    else:
        raise TypeError(f"urls must be a str pattern or a sequence of str; got {type(urls).__name__}")
    if not out:
        raise ValueError(f"urls must name at least one shard; got {urls!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# inspection


@dataclass
class ShardReport:
    """What :func:`inspect_shards` found in one shard. ``problems`` is empty for a healthy shard."""

    url: str
    count: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)
    bytes: int | None = None
    sha256: str | None = None
    expected_count: int | None = None
    problems: list[str] = field(default_factory=list)
    unsafe_members: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "count": self.count, "expected_count": self.expected_count,
                "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())}, "bytes": self.bytes,
                "sha256": self.sha256, "ok": self.ok, "problems": list(self.problems),
                "unsafe_members": list(self.unsafe_members)}


@dataclass
class InspectReport:
    """The result of :func:`inspect_shards`: one :class:`ShardReport` per shard plus dataset-level problems
    (e.g. shards listed in the manifest but not inspected)."""

    shards: list[ShardReport]
    manifest: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def class_counts(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for s in self.shards:
            for c, n in s.class_counts.items():
                total[c] = total.get(c, 0) + n
        return dict(sorted(total.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "manifest": self.manifest, "num_samples": self.num_samples,
                "class_counts": {str(k): v for k, v in self.class_counts.items()}, "problems": list(self.problems),
                "shards": [s.to_dict() for s in self.shards]}

    def format(self) -> str:
        """A human-readable table (what ``pretrain-update inspect`` prints)."""
        lines = [f"{'shard':<40} {'samples':>8} {'expected':>8}  status"]
        for s in self.shards:
            name = os.path.basename(s.url) or s.url
            exp = "-" if s.expected_count is None else str(s.expected_count)
            status = "ok" if s.ok else "; ".join(s.problems)
            lines.append(f"{name:<40} {s.count:>8} {exp:>8}  {status}")
            if s.unsafe_members:
                lines.append(f"{'':<40} {'':>8} {'':>8}  unsafe members (never decoded): "
                             f"{', '.join(s.unsafe_members[:5])}{' ...' if len(s.unsafe_members) > 5 else ''}")
        lines.append(f"total: {self.num_samples} samples in {len(self.shards)} shards; "
                     f"classes: {self.class_counts}")
        lines += [f"problem: {p}" for p in self.problems]
        bad = sum(not s.ok for s in self.shards)
        lines.append("OK" if self.ok else f"DAMAGED: {bad} shard(s) with problems, {len(self.problems)} other")
        return "\n".join(lines)


def _is_object_npy(data: Any) -> bool:
    """Whether an undecoded ``.npy`` member holds an object array (pickled items), from its header alone."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return False
    header = _npy_header(bytes(data))
    return header is not None and header[2].hasobject


def inspect_shards(
    urls_or_pattern: str | Sequence[str] | None = None,
    manifest: str | os.PathLike | ShardManifest | None = None,
    *,
    label_key: str | None = None,
    required_keys: Sequence[str] | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> InspectReport:
    """Read every shard completely (nothing is decoded except the integer label) and report what is in it.

    Per shard: sample count, class histogram, size, SHA-256, and problems: read damage (truncation, corrupt or
    missing headers, an archive without an end-of-archive block, an empty or missing file), samples missing
    ``label_key`` or one of ``required_keys``, labels that are not integers or not below ``num_classes``, and,
    against the manifest: count, class histogram, size and SHA-256 mismatches. Members with pickle-based
    extensions (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``) are listed as ``unsafe_members``; they are never
    decoded. So are ``.npy`` members whose header (read alone, the array never loaded) gives an object dtype (a
    pickle inside); these are also problems, since the default decoder refuses what looks like a plain array.
    Dataset-level problems: shards in the manifest that were not found among ``urls``.

    Args:
        urls_or_pattern: shard urls or a brace pattern; defaults to the manifest's shards.
        manifest: a manifest path (or :class:`ShardManifest`) to check against.
        label_key: label member; defaults to the manifest's ``label_key``, else ``"cls"``.
        required_keys: members every sample must have.
        num_classes: labels must be below it; defaults to the manifest's.
        progress: show a tqdm progress bar.

    Returns:
        an :class:`InspectReport` (``.ok``, ``.format()``, ``.to_dict()``).

    Example::

        >>> report = inspect_shards("/data/train-{000000..000009}.tar", manifest="/data/train-manifest.json")
        >>> print(report.format())
    """
    man = _as_manifest(manifest)
    if urls_or_pattern is None:
        if man is None:
            raise ValueError("inspect_shards needs urls_or_pattern or a manifest; got neither")
        urls = man.urls
    else:
        urls = expand_urls(urls_or_pattern)
    if label_key is None:
        label_key = man.label_key if man is not None and man.label_key else "cls"
    if num_classes is None and man is not None and man.num_classes:
        num_classes = man.num_classes
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", min_value=1)
    required = list(required_keys or [])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(urls, desc="inspect", unit="shard")
    reports = []
    seen_entries = set()
    for url in bar if bar is not None else urls:
        rep = ShardReport(url=url)
        info = man.lookup(url) if man is not None else None
        if info is not None:
            rep.expected_count = info.count
            seen_entries.add(info.url)
        elif man is not None:
            rep.problems.append("not listed in the manifest")
        try:
            for sample in iter_shard_samples(url):
                rep.count += 1
                key = sample.get("__key__")
                for k in sample:
                    ext = k.rsplit(".", 1)[-1].lower()
                    if ext in _PICKLE_EXTENSIONS:
                        rep.unsafe_members.append(f"{key}.{k}")
                    elif ext == "npy" and _is_object_npy(sample[k]):
                        # a pickle disguised as an array: safe_decode refuses it, so reading with defaults fails
                        rep.unsafe_members.append(f"{key}.{k}")
                        rep.problems.append(f"sample {key!r}, member {k!r}: the .npy array has an object dtype "
                                            "(a pickle inside; never decoded)")
                missing = [k for k in required if k not in sample]
                if missing:
                    rep.problems.append(f"sample {key!r} misses required member(s) {missing}")
                if label_key in sample:
                    try:
                        label = parse_label(sample[label_key])
                    except ValueError as exc:
                        rep.problems.append(f"sample {key!r}, member {label_key!r}: {exc}")
                        continue
                    if num_classes is not None and label >= num_classes:
                        rep.problems.append(f"sample {key!r}: label {label} out of range [0, {num_classes})")
                        continue
                    rep.class_counts[label] = rep.class_counts.get(label, 0) + 1
                elif man is not None and man.label_key:
                    rep.problems.append(f"sample {key!r} has no label member {label_key!r}")
        except DamagedShardError as exc:
            rep.problems.append(exc.reason)
        rep.class_counts = dict(sorted(rep.class_counts.items()))
        local = _abs(url)
        if os.path.isfile(local):
            rep.bytes = os.path.getsize(local)
            rep.sha256 = _sha256(local)
        if info is not None:
            if rep.count != info.count:
                rep.problems.append(f"{rep.count} samples read but the manifest says {info.count} "
                                    f"({'missing' if rep.count < info.count else 'extra'} "
                                    f"{abs(info.count - rep.count)})")
            if info.class_counts:
                want = {c: n for c, n in enumerate(info.class_counts) if n}
                if want != rep.class_counts and rep.count == info.count:
                    rep.problems.append(f"class histogram {rep.class_counts} differs from the manifest's {want}")
            if info.bytes is not None and rep.bytes is not None and rep.bytes != info.bytes:
                rep.problems.append(f"size {rep.bytes} bytes differs from the manifest's {info.bytes}")
            elif info.sha256 and rep.sha256 and rep.sha256 != info.sha256:
                rep.problems.append("SHA-256 differs from the manifest's (the file was modified)")
        reports.append(rep)
    problems = []
    if man is not None:
        absent = [s.url for s in man.shards if s.url not in seen_entries]
        if absent and urls_or_pattern is None:
            problems += [f"manifest shard {u!r} was not inspected" for u in absent]
        elif absent:
            problems.append(f"{len(absent)} shard(s) of the manifest were not among the urls (e.g. {absent[0]!r})")
    return InspectReport(shards=reports, manifest=man.path if man is not None else None, problems=problems)

