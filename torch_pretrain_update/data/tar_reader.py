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
The reader also refuses, before spending the memory, a member (or a tar header extension) over
``max_member_bytes`` and a compressed shard inflating past ``max_ratio`` (:class:`TarMemberTooLargeError`), and
refuses, sample by sample, member names that cannot form a sample (:class:`MalformedSampleError`).

Manifest format (``version`` 1)::

    {"format": "torch-pretrain-update/shards", "version": 1, "label_key": "cls", "num_classes": 3,
     "num_samples": 25, "class_counts": [9, 8, 8],
     "shards": [{"url": "train-000000.tar", "count": 10, "class_counts": [4, 3, 3], "bytes": 51200,
                 "sha256": "..."}, ...]}

Shard ``url`` entries are relative to the manifest's directory (so the directory can be moved);
:func:`read_manifest` resolves them to absolute paths. A manifest travels with the shards and is trusted no more
than they are: by default :func:`read_manifest` (hence every reader given a manifest path) refuses a url that is
not a file inside the manifest's folder (a ``pipe:`` url would run a shell command in webdataset's opener; other
schemes, absolute paths, ``..`` or symlinks leading outside are refused too) and a shard listed twice;
``allow_unsafe_urls=True`` keeps the urls of a manifest you trust as written. Urls the caller passes directly
(``urls=``, ``urls_or_pattern``) are the caller's own and opened as given, ``pipe:`` included.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
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
from webdataset.tariterators import base_plus_ext

from torch_pretrain_update._checks import MAX_CLASSES, check_int
from torch_pretrain_update.data.decode import (
    _STEP,
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_RATIO,
    RATIO_FLOOR,
    UNSAFE_EXTENSIONS,
    MemberDecodeError,
    MemberTooLargeError,
    SizeLimitError,
    UnsafeMemberError,
    _MemberDecoder,
    _npy_header,
    check_limits,
)

__all__ = [
    "DamagedShardError",
    "TarMemberTooLargeError",
    "MalformedSampleError",
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
#: ``weights_only``), also under a compression suffix (``x.pyd.gz``, ``x.pickle.bz2``). Nothing in this module
#: ever decodes them; :func:`inspect_shards` reports them.
_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth")
#: compression suffixes peeled off a member name before its type is judged
_COMPRESSION_EXTENSIONS = ("gz", "bz2", "xz", "lzma", "zst", "zstd", "lz4", "z", "br")

_META_RE = re.compile(r"__[^/]*__($|/)")


class DamagedShardError(ValueError):
    """A shard that cannot be read completely: truncated, corrupt, empty, unreadable, or whose sample count
    disagrees with its manifest. ``url`` names the shard and ``reason`` says what is wrong."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"damaged shard {url!r}: {reason}")
        self.url = url
        self.reason = reason


class TarMemberTooLargeError(DamagedShardError, SizeLimitError):
    """A tar member (or a header extension) larger than ``max_member_bytes``, or a compressed shard inflating
    more than ``max_ratio`` times: refused before the bytes are held, and the rest of the shard is not read
    (reading past the member would inflate it). ``key``/``member`` name it (None for the ratio) and ``limit``
    the cap."""

    def __init__(self, url: str, reason: str, *, limit: float, key: str | None = None,
                 member: str | None = None) -> None:
        super().__init__(url, reason)
        self.limit, self.key, self.member = limit, key, member


class MalformedSampleError(DamagedShardError):
    """A sample whose member names cannot form a webdataset sample: a repeated member (suffixes are compared in
    lower case, so ``a.cls`` and ``a.CLS`` collide), a member named like the metadata (``a.__key__``,
    ``a.__url__``; webdataset drops a sample with ``a.__bad__`` silently) or a name that is not valid UTF-8.
    Only this sample is refused: the readers skip it (under a skipping handler) and read on. ``key`` and
    ``member`` name it."""

    def __init__(self, url: str, reason: str, *, key: str, member: str) -> None:
        super().__init__(url, reason)
        self.key, self.member = key, member


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

    def __post_init__(self) -> None:
        # A shard listed twice would be read twice each epoch (and its lookup would be ambiguous).
        seen: dict[str, str] = {}
        for s in self.shards:
            key = _abs(s.url)
            if key in seen:
                raise ValueError(f"manifest {self.path!r}: shard {s.url!r} is listed twice (also as {seen[key]!r})")
            seen[key] = s.url

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


#: a url scheme as webdataset's ``gopen`` dispatches on it (``pipe:``, ``file:``, ``http:``, ``s3:`` ...)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _abs(url: str) -> str:
    if url.startswith("file:"):
        url = re.sub(r"^file:(//)?", "", url)
    if _SCHEME_RE.match(url):  # pipe:, http:, s3: ... compared verbatim
        return url
    return os.path.normpath(os.path.abspath(url))


def _shard_key(url: str) -> str:
    """What makes two urls the same shard: the resolved real path of a local file (so ``./a.tar``, ``b/../a.tar``
    and a symlink to it are one shard), else the url itself."""
    url = _abs(url)
    return url if _SCHEME_RE.match(url) else os.path.realpath(url)


def _inside(folder: str, path: str) -> bool:
    return path != folder and os.path.commonpath([folder, path]) == folder


def _refuse_url(url: str, base: str, real_base: str) -> str | None:
    """Why a manifest entry's url is not a plain file inside the manifest's folder ``base``, or None if it is.

    webdataset's opener runs a ``pipe:`` url through the shell and fetches ``http:``/``s3:``... urls, and a
    path can name any file: a manifest travels with untrusted shards, so none of that may come from it."""
    if not url:
        return "it is empty"
    if "\x00" in url:
        return "it contains a NUL character"
    scheme = _SCHEME_RE.match(url)
    if scheme:
        what = ("webdataset's opener would run the rest as a shell command" if scheme.group(0).lower() == "pipe:"
                else "webdataset's opener would open it as a url, not as a file of this folder")
        return f"it has the scheme {scheme.group(0)!r} ({what})"
    if os.path.isabs(url):
        return "it is an absolute path"
    path = os.path.normpath(os.path.join(base, url))
    if path == base:
        return "it names the manifest's folder itself, not a file"
    if not _inside(base, path):
        return f"it leads outside the manifest's folder {base!r}"
    real = os.path.realpath(path)
    if not _inside(real_base, real):
        return f"it is a symlink (or lies under one) that leads outside the manifest's folder, to {real!r}"
    return None


def _manifests_in(folder: str) -> list[str]:
    """The manifests directly inside ``folder``: ``*.json`` files whose first 4 KiB hold our format field."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    pattern = re.compile(rb'"format"\s*:\s*"' + re.escape(MANIFEST_FORMAT.encode()) + rb'"')
    found = []
    for name in names:
        p = os.path.join(folder, name)
        if not name.endswith(".json") or not os.path.isfile(p):
            continue
        try:
            with open(p, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        if pattern.search(head):
            found.append(p)
    return found


def _directory_message(path: str, option: str | None = None) -> str:
    """``path`` is a directory: say so, and which manifest file in it to pass (with ``option``, e.g.
    ``"--manifest"``, as a command-line hint)."""
    found = _manifests_in(path)
    msg = f"{path!r} is a directory, not a manifest file; "
    if not found:
        return msg + f"it holds no manifest (no *.json file with format {MANIFEST_FORMAT!r})"
    if len(found) == 1:
        how = f"pass {option} {found[0]}" if option else "pass that file's path"
        return msg + f"it holds the manifest {found[0]!r}: {how}"
    names = ", ".join(repr(os.path.basename(p)) for p in found[:10]) + (" ..." if len(found) > 10 else "")
    return msg + f"it holds {len(found)} manifests ({names}): pass the one you mean" + (
        f" with {option}" if option else "")


def _load_manifest(path: str | os.PathLike, allow_unsafe_urls: bool) -> tuple[ShardManifest, list[str]]:
    """Parse a manifest. Returns it without the entries that are refused (a url that is not a file inside the
    manifest's folder, unless ``allow_unsafe_urls``; a shard listed a second time), and one message per refused
    entry. Malformed files and entries raise ``ValueError`` at once."""
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"manifest must be a path; got {type(path).__name__}")
    if os.path.isdir(path):
        raise ValueError(f"manifest {_directory_message(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"manifest {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {path!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {path!r} is not a {MANIFEST_FORMAT!r} manifest (format field missing or wrong)")
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"manifest {path!r} has version {raw.get('version')!r}; this library reads version 1")
    num_classes = raw.get("num_classes", 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"manifest {path!r}: num_classes must be a non-negative int; got {num_classes!r}")
    label_key = raw.get("label_key")
    if label_key is not None and (not isinstance(label_key, str) or not label_key):
        raise ValueError(f"manifest {path!r}: label_key must be a non-empty string or null; got {label_key!r}")
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    shards = []
    refused: list[str] = []
    seen: dict[str, int] = {}  # shard key -> index of the entry that named it first
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
        nbytes, digest = e.get("bytes"), e.get("sha256")
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
            raise ValueError(f"manifest {path!r}: shards[{i}] bytes must be an int >= 0 or null; got {nbytes!r}")
        if digest is not None and not isinstance(digest, str):
            raise ValueError(f"manifest {path!r}: shards[{i}] sha256 must be a string or null; got {digest!r}")
        url = e["url"]
        why = None if allow_unsafe_urls else _refuse_url(url, base, real_base)
        if why is not None:
            refused.append(
                f"manifest {path!r}: shards[{i}] url {url!r} is refused: {why}. A manifest's urls must be files "
                "inside its folder, given relative to it; read_manifest(..., allow_unsafe_urls=True) opens any "
                "url webdataset can (shell pipes included): only for a manifest you trust"
            )
            continue
        if not _SCHEME_RE.match(url) and not os.path.isabs(url):
            url = os.path.normpath(os.path.join(base, url))
        key = _shard_key(url)
        if key in seen:
            j = seen[key]
            refused.append(
                f"manifest {path!r}: shards[{i}] url {e['url']!r} names the same shard as shards[{j}] "
                f"({entries[j]['url']!r}): a shard listed twice would be read twice each epoch"
            )
            continue
        seen[key] = i
        shards.append(ShardInfo(url=url, count=count, class_counts=tuple(cc), bytes=nbytes, sha256=digest))
    man = ShardManifest(path=os.path.abspath(path), shards=tuple(shards), label_key=label_key,
                        num_classes=num_classes)
    return man, refused


def read_manifest(path: str | os.PathLike, *, allow_unsafe_urls: bool = False) -> ShardManifest:
    """Read and validate a manifest written by :func:`write_shards`.

    A manifest is data that travels with the shards, as untrusted as they are, so by default every entry's
    ``url`` must be a file inside the manifest's folder, given relative to it: no scheme (webdataset's opener
    runs ``pipe:`` urls through the shell and fetches ``http:``, ``s3:``... urls), no absolute path, no ``..``
    and no symlink that leads outside the folder. No shard may be listed twice (after resolving the paths):
    it would be read twice every epoch.

    Args:
        path: the manifest's path.
        allow_unsafe_urls: keep every url as written (scheme urls verbatim, absolute paths as they are) for a
            manifest you trust, e.g. one you wrote with ``pipe:`` urls yourself. Duplicates are refused anyway.

    Returns:
        a :class:`ShardManifest` whose shard urls are absolute paths.

    Raises:
        ValueError: the path is a directory (the message names the manifest file in it, if any), the file is
            not a manifest of this format, its entries are inconsistent, a url is refused, or a shard is listed
            twice; the message names the manifest, the entry and why.

    Example::

        >>> m = read_manifest(write_shards(samples, "/data/train-%06d.tar"))
        >>> m.num_samples, m.class_counts
    """
    if not isinstance(allow_unsafe_urls, bool):
        raise TypeError(f"allow_unsafe_urls must be a bool; got {allow_unsafe_urls!r}")
    man, refused = _load_manifest(path, allow_unsafe_urls)
    if refused:
        more = f" (and {len(refused) - 1} more refused entries)" if len(refused) > 1 else ""
        raise ValueError(refused[0] + more)
    return man


def _as_manifest(manifest: str | os.PathLike | ShardManifest | None, *,
                 allow_unsafe_urls: bool = False) -> ShardManifest | None:
    """A manifest argument -> a :class:`ShardManifest`: a path is read with :func:`read_manifest` (whose url
    checks ``allow_unsafe_urls`` relaxes); a ``ShardManifest`` built or read by the caller is taken as it is."""
    if manifest is None or isinstance(manifest, ShardManifest):
        return manifest
    if isinstance(manifest, (str, os.PathLike)):
        return read_manifest(manifest, allow_unsafe_urls=allow_unsafe_urls)
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
                if label >= MAX_CLASSES:  # the manifest's class histogram has one entry per class id
                    raise ValueError(f"samples[{n}] (key {key!r}): label {label} must be < {MAX_CLASSES} (the "
                                     "manifest's class histogram is indexed by label: relabel the classes as 0..C-1)")
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


#: header types whose data ``tarfile`` reads into memory while parsing the header after them (pax, GNU names)
_HEADER_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                      tarfile.GNUTYPE_LONGLINK)


class _HeaderTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a header extension (pax or GNU long name) of {size} bytes")
        self.size, self.limit = size, limit


class _TooExpanded(Exception):
    def __init__(self, out: int, raw: int, limit: float) -> None:
        super().__init__(f"{raw} compressed bytes inflated to {out}")
        self.limit = limit


class _HeaderRecordingTarInfo(tarfile.TarInfo):
    """``TarInfo`` that records on its ``TarFile`` the header error that ended the iteration, and refuses a
    header extension larger than ``max_header`` (``tarfile`` reads one into memory whole).

    Why not a library function: ``tarfile`` converts an invalid, truncated or missing header after the start of
    an archive into "end of archive" and keeps no trace of which it was, and webdataset's
    ``tar_file_iterator`` discards the ``TarFile``. ``fromtarfile`` is where every header is parsed; the error
    it raises last tells a proper end (``EOFHeaderError``: a zero block) from damage. One extra call per header.
    """

    max_header: int | None = None

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf._tpu_header_error = exc  # type: ignore[attr-defined]
            raise

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile's hook between parsing a header block and reading what it announces: check the size first.
        if self.max_header is not None and self.type in _HEADER_EXTENSIONS and self.size > self.max_header:
            raise _HeaderTooLarge(self.size, self.max_header)
        return super()._proc_member(tf)  # type: ignore[misc]


_TARINFO_CLASSES: dict[int | None, type] = {}


def _tarinfo_class(max_header: int | None) -> type:
    # tarfile parses the first header inside TarFile.__init__, so the cap travels on the TarInfo class.
    cls = _TARINFO_CLASSES.get(max_header)
    if cls is None:
        cls = type("_CappedTarInfo", (_HeaderRecordingTarInfo,), {"max_header": max_header})
        _TARINFO_CLASSES[max_header] = cls
    return cls


class _CountingSource:
    """The shard's bytes as they come from its file or pipe, counted (the compressed size), after ``head``."""

    def __init__(self, raw: Any, head: bytes) -> None:
        self.raw, self.head, self.n = raw, head, len(head)

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size is None or size < 0:
                data, self.head = self.head + self.raw.read(), b""
                self.n += len(data)
                return data
            data, self.head = self.head[:size], self.head[size:]
            return data
        data = self.raw.read(size)
        self.n += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:  # the caller closes the raw stream
        pass


class _Inflating:
    """The decompressed tar stream. ``tarfile``'s own decompression (``mode="r|*"``) inflates each 10 KiB block
    without an output bound (bz2 and xz turn 10 KiB into gigabytes); Python's ``GzipFile``/``BZ2File``/``LZMAFile``
    return at most what is asked, and every read checks the expansion against ``max_ratio``."""

    def __init__(self, dec: Any, src: _CountingSource, max_ratio: float | None) -> None:
        self.dec, self.src, self.max_ratio, self.out = dec, src, max_ratio, 0

    def read(self, size: int = -1) -> bytes:
        data = self.dec.read(size)
        self.out += len(data)
        if self.max_ratio is not None and self.out > RATIO_FLOOR and self.out > self.max_ratio * self.src.n:
            raise _TooExpanded(self.out, self.src.n, self.max_ratio)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.dec.close()


def _decompressed(raw: Any, max_ratio: float | None) -> Any:
    """A file object over the shard's tar bytes: the raw stream, or a bounded decompressor for the formats
    ``tarfile.open(mode="r|*")`` recognises (gzip, bzip2, xz/lzma; by their magic bytes, as tarfile does)."""
    head = raw.peek(10)[:10] if hasattr(raw, "peek") else b""
    if len(head) == 10:  # a buffered file or pipe: looked at without consuming (no wrapper on the plain path)
        if not head.startswith((b"\x1f\x8b\x08", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00\x80")):
            return raw
        src = _CountingSource(raw, b"")
    else:
        head = raw.read(10)
        src = _CountingSource(raw, head)
    if head.startswith(b"\x1f\x8b\x08"):
        return _Inflating(gzip.GzipFile(fileobj=src, mode="rb"), src, max_ratio)
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return _Inflating(bz2.BZ2File(src), src, max_ratio)
    if head.startswith((b"\xfd7zXZ", b"\x5d\x00\x00\x80")):
        return _Inflating(lzma.LZMAFile(src), src, max_ratio)
    return src


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def iter_shard_files(
    url: str,
    *,
    check_end: bool = True,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
) -> Iterator[dict[str, Any]]:
    """The members of one tar shard as webdataset file records ``{"fname", "data", "__url__"}``.

    Same skipping rules as ``webdataset.tariterators.tar_file_iterator`` (non-regular files and ``__meta__``
    entries are skipped), opened with webdataset's ``gopen`` (local paths, ``file:``, ``pipe:``, ``http(s):``).
    Unlike it, every problem raises :class:`DamagedShardError` naming the shard: unopenable or empty file,
    truncated member data, a bad header anywhere, and (``check_end``) an archive that does not end with a zero
    block (truncated at a header boundary, or a corrupt header that ``tarfile`` would silently treat as the end).

    Size caps (:class:`TarMemberTooLargeError`, raised before the bytes are held; the rest of the shard is not
    read): a member, or a pax / GNU long-name header, larger than ``max_member_bytes`` (default 256 MiB, from
    its header), and a compressed shard (``.tar.gz``, ``.tar.bz2``, ``.tar.xz``) inflating to more than
    ``max_ratio`` (default 1000) times the compressed bytes read, once past 16 MiB. ``None`` lifts a cap.

    Example::

        >>> [r["fname"] for r in iter_shard_files("/data/train-000000.tar")][:2]
        ['000000.cls', '000000.npy']
    """
    max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
    return _iter_files(url, check_end, max_member_bytes, max_ratio)


def _iter_files(url: str, check_end: bool, max_member_bytes: int | None,
                max_ratio: float | None) -> Iterator[dict[str, Any]]:
    try:
        stream = wds_gopen(url, "rb")
    except Exception as exc:  # FileNotFoundError, PermissionError, a failing pipe ...
        raise DamagedShardError(url, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
    fname = None
    try:
        try:
            tf = tarfile.open(fileobj=_decompressed(stream, max_ratio), mode="r|",
                              tarinfo=_tarinfo_class(max_member_bytes))
        except _READ_ERRORS as exc:
            reason = "empty file" if "empty file" in str(exc) else f"not a readable tar archive ({exc})"
            raise DamagedShardError(url, reason) from exc
        try:
            for tarinfo in tf:
                fname = tarinfo.name
                if not tarinfo.isreg() or fname is None:
                    continue
                if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                    continue
                if _META_RE.match(fname):
                    continue
                if max_member_bytes is not None and tarinfo.size > max_member_bytes:
                    key = base_plus_ext(fname)[0]
                    raise TarMemberTooLargeError(
                        url, f"member {fname!r} of sample __key__={key!r} announces {tarinfo.size} bytes, more than "
                             f"max_member_bytes={max_member_bytes}; refused before reading it, and the rest of the "
                             "shard is not read", limit=max_member_bytes, key=key, member=fname)
                data = _read_member(tf.extractfile(tarinfo), tarinfo.size)
                if len(data) != tarinfo.size:
                    raise DamagedShardError(url, f"member {fname!r} truncated: {len(data)} of {tarinfo.size} bytes")
                yield {"fname": fname, "data": data, "__url__": url}
                data = None  # the record holds it now: do not keep it alive while reading the next member
                tf.members = []
        except DamagedShardError:
            raise
        except (_HeaderTooLarge, _TooExpanded):
            raise
        except _READ_ERRORS as exc:
            where = f"after member {fname!r}" if fname else "at the first member"
            if "unexpected end of data" in str(exc) or "end-of-stream marker" in str(exc):
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
    except _HeaderTooLarge as exc:
        after = f" after member {fname!r}" if fname else ""
        raise TarMemberTooLargeError(url, f"{exc}{after} is more than max_member_bytes={exc.limit}; refused "
                                          "before reading it, and the rest of the shard is not read",
                                     limit=exc.limit) from None
    except _TooExpanded as exc:
        after = f" (after member {fname!r})" if fname else ""
        raise TarMemberTooLargeError(url, f"the compressed shard inflates more than max_ratio={exc.limit:g} times "
                                          f"({exc}){after}: refused as a decompression bomb, and the rest of the shard "
                                          "is not read", limit=exc.limit) from None
    finally:
        stream.close()


def _read_member(f: Any, size: int) -> bytes:
    # In 1 MiB steps: one read() of a large member costs tarfile about three copies of it at once.
    if size <= _STEP:
        return f.read()
    chunks = []
    while chunk := f.read(_STEP):
        chunks.append(chunk)
    return b"".join(chunks)


def _grouped(url: str, files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any] | MalformedSampleError]:
    """webdataset's ``group_by_keys`` (same key/suffix split, suffixes in lower case), except that a sample whose
    member names cannot form a sample comes out as a :class:`MalformedSampleError` in its place (webdataset
    raises a bare ``ValueError`` naming no shard, or drops the sample silently for a member ``x.__bad__``)."""
    current: dict[str, Any] | None = None
    bad: MalformedSampleError | None = None
    for record in files:
        fname = record["fname"]
        prefix, suffix = base_plus_ext(fname)
        if prefix is None:  # no extension: not part of a sample (as in webdataset)
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield bad if bad is not None else current
            current, bad = {"__key__": prefix, "__url__": url}, None
        if bad is not None:
            continue
        problem = None
        if not fname.isascii() and not _is_utf8(fname):
            problem = f"member name {fname!r} is not valid UTF-8"
        elif suffix.startswith("__"):
            problem = (f"member {fname!r} is named like the sample's metadata ({suffix!r}); webdataset would "
                       "overwrite the metadata or drop the sample")
        elif suffix in current:
            problem = (f"member {fname!r} repeats the member {suffix!r} (suffixes are compared in lower case), "
                       "so one of them would be lost")
        if problem is not None:
            bad = MalformedSampleError(url, f"sample __key__={prefix!r}: {problem}", key=prefix, member=fname)
            continue
        current[suffix] = record["data"]
    if current is not None:
        yield bad if bad is not None else current


def _is_utf8(name: str) -> bool:
    # tarfile decodes names with surrogateescape: bytes that are not UTF-8 become lone surrogates
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _samples(url: str, *, check_end: bool = True, expected: int | None = None,
             max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
             max_ratio: float | None = DEFAULT_MAX_RATIO) -> Iterator[dict[str, Any] | MalformedSampleError]:
    """The readers' shared source: raw samples, with a :class:`MalformedSampleError` in the place of each sample
    that cannot be formed (so that each reader routes it through its handler and reads on; it counts as a sample
    for the manifest count and for positions)."""
    items = _grouped(url, _iter_files(url, check_end, max_member_bytes, max_ratio))
    return items if expected is None else _counted(url, items, expected)


def iter_shard_samples(
    url: str,
    *,
    check_end: bool = True,
    expected: int | None = None,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of one shard: :func:`iter_shard_files` grouped by key like webdataset's
    ``group_by_keys``. A sample cut off by damage is never yielded; the :class:`DamagedShardError` follows the
    last complete one. A sample whose member names repeat (``a.cls`` and ``a.CLS``), use the metadata names
    (``a.__key__``, ``a.__url__``) or are not valid UTF-8 raises :class:`MalformedSampleError` (the pipeline
    source, the stream and :func:`inspect_shards` skip or report just that sample and read on). The size caps
    are :func:`iter_shard_files`'s.

    ``expected`` (the shard's manifest count) adds the count check: a shard that ends after fewer samples (a
    rewritten shard, or damage ``check_end=False`` lets through), or holds more, raises a
    :class:`DamagedShardError` saying how many were read; so does damage, with the count read before it."""
    max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
    if expected is not None:
        expected = check_int(expected, "expected", min_value=0)
    return _raising(_samples(url, check_end=check_end, expected=expected, max_member_bytes=max_member_bytes,
                             max_ratio=max_ratio))


def _raising(items: Iterator[dict[str, Any] | MalformedSampleError]) -> Iterator[dict[str, Any]]:
    for item in items:
        if isinstance(item, MalformedSampleError):
            raise item
        yield item


def _counted(url: str, samples: Iterator[Any], expected: int) -> Iterator[Any]:
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
            reason = f"{exc.reason}; {n} of the manifest's {expected} samples read"
            if isinstance(exc, TarMemberTooLargeError):  # keep the class: it is what the readers count
                raise TarMemberTooLargeError(url, reason, limit=exc.limit, key=exc.key, member=exc.member) from exc
            raise DamagedShardError(url, reason) from exc
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
            ``lost_samples`` (samples of damaged shards never yielded: the malformed samples skipped, plus the
            manifest count minus what was read; without a manifest the loss of a shard that ends early is unknown
            and not counted here), ``malformed_samples`` (samples refused for their member names, see
            :class:`MalformedSampleError`; the shard is read on), ``oversized`` (shards ended by a size cap, see
            :class:`TarMemberTooLargeError`) and ``events`` (the first 50 error messages, each naming its shard).
            With DataLoader workers each worker counts its own.
    """

    def __init__(self, handler: Callable[[BaseException], Any], manifest: ShardManifest | None,
                 max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
                 max_ratio: float | None = DEFAULT_MAX_RATIO) -> None:
        self.handler = handler
        self.manifest = manifest
        self.max_member_bytes, self.max_ratio = check_limits(max_member_bytes, max_ratio)
        self.stats: dict[str, Any] = {"shards": 0, "samples": 0, "damaged_shards": 0, "lost_samples": 0,
                                      "malformed_samples": 0, "oversized": 0, "events": []}

    def _event(self, exc: BaseException) -> None:
        if len(self.stats["events"]) < _MAX_EVENTS:
            self.stats["events"].append(str(exc))

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
            damaged = False  # count the shard once, however many of its samples are malformed
            try:
                for sample in _samples(url, expected=expected, max_member_bytes=self.max_member_bytes,
                                       max_ratio=self.max_ratio):
                    n += 1
                    if isinstance(sample, MalformedSampleError):  # only this sample is refused; read on
                        self.stats["damaged_shards"] += not damaged
                        damaged = True
                        self.stats["malformed_samples"] += 1
                        self.stats["lost_samples"] += 1
                        self._event(sample)
                        if not self.handler(sample):  # raises by default; False stops the stream
                            return
                        continue
                    self.stats["samples"] += 1
                    yield sample
            except Exception as exc:  # DamagedShardError (TarMemberTooLargeError included)
                if not isinstance(exc, DamagedShardError):
                    cause, exc = exc, DamagedShardError(url, f"{type(exc).__name__}: {exc}")
                    exc.__cause__ = cause
                self.stats["damaged_shards"] += not damaged
                self.stats["lost_samples"] += max(0, expected - n) if expected is not None else 0
                self.stats["oversized"] += isinstance(exc, SizeLimitError)
                self._event(exc)
                if not self.handler(exc):  # raises by default; False stops the stream (webdataset's convention)
                    return

    def __repr__(self) -> str:
        man = None if self.manifest is None else self.manifest.path
        return f"{type(self).__name__}(handler={getattr(self.handler, '__name__', self.handler)}, manifest={man!r})"


def strict_tarfile_to_samples(
    handler: Callable[[BaseException], Any] = reraise_exception,
    *,
    manifest: str | os.PathLike | ShardManifest | None = None,
    allow_unsafe_urls: bool = False,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
) -> StrictTarfileSamples:
    """A drop-in for ``webdataset.tarfile_to_samples`` that never loses the rest of a shard silently.

    webdataset 1.0.2's reader uses ``tarfile``, which takes a corrupt header, or a file truncated at a header,
    for the end of the archive: the rest of the shard vanishes with no error even under ``reraise_exception``,
    and a skipping handler counts nothing. This stage reads each shard with :func:`iter_shard_samples` (which
    checks the end-of-archive block) and, given a manifest, checks each shard's sample count. Every damaged
    shard raises a :class:`DamagedShardError` naming it through ``handler``, and is counted in ``stats``; so
    does a member over the size caps (:class:`TarMemberTooLargeError`) and, sample by sample, a sample whose
    member names repeat, use the metadata names or are not UTF-8 (:class:`MalformedSampleError`).

    Args:
        handler: webdataset's convention: ``reraise_exception`` (default) raises; a handler returning True
            (``warn_and_continue``, ``ignore_and_continue``) skips the rest of the damaged shard (just the sample,
            for a :class:`MalformedSampleError`) and goes on; False (``ignore_and_stop``) ends the stream.
            Either way the shard is counted.
        manifest: a manifest path (or :class:`ShardManifest`) from :func:`write_shards`: adds the per-shard count
            check (the only detector of a well-formed shard that lost whole samples) and the ``lost_samples``
            count. Every shard read must be listed in it (else ``ValueError``).
        allow_unsafe_urls: passed to :func:`read_manifest` when ``manifest`` is a path (accept urls that are not
            files inside the manifest's folder: only for a manifest you trust).
        max_member_bytes: the largest tar member read (default 256 MiB); None: no cap. See
            :func:`iter_shard_files`.
        max_ratio: the most a compressed shard may inflate per compressed byte past 16 MiB (default 1000);
            None: no cap.

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
    max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
    return StrictTarfileSamples(handler, _as_manifest(manifest, allow_unsafe_urls=allow_unsafe_urls),
                                max_member_bytes, max_ratio)


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
    oversized_members: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "count": self.count, "expected_count": self.expected_count,
                "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())}, "bytes": self.bytes,
                "sha256": self.sha256, "ok": self.ok, "problems": list(self.problems),
                "unsafe_members": list(self.unsafe_members), "oversized_members": list(self.oversized_members)}


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
            if s.oversized_members:
                lines.append(f"{'':<40} {'':>8} {'':>8}  members over the size caps (refused): "
                             f"{', '.join(s.oversized_members[:5])}{' ...' if len(s.oversized_members) > 5 else ''}")
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


def _member_kind(name: str) -> str:
    """A member's type under its compression suffixes: ``pyd.gz`` -> ``pyd``, ``pickle.bz2`` -> ``pickle``."""
    parts = name.lower().split(".")
    while len(parts) > 1 and parts[-1] in _COMPRESSION_EXTENSIONS:
        parts.pop()
    return parts[-1]


def _check_members(rep: ShardReport, key: Any, sample: dict[str, Any], screen: _MemberDecoder) -> None:
    """List a sample's unsafe and oversized members on ``rep``; what the default decoder would refuse although
    it looks like data (an object array, a ``.pth`` calling code, a member over a size cap) is also a problem."""
    for k, data in sample.items():
        if k.startswith("__") or not isinstance(data, (bytes, bytearray, memoryview)):
            continue
        name = f"{key}.{k}"
        kind = _member_kind(k)
        if kind in _PICKLE_EXTENSIONS:
            rep.unsafe_members.append(name)
            if kind in UNSAFE_EXTENSIONS:  # a pickle by its name: listed, never opened
                continue
        try:
            screen.screen(k, bytes(data), key)
        except UnsafeMemberError as exc:
            if kind not in _PICKLE_EXTENSIONS:
                rep.unsafe_members.append(name)
            reason = exc.reason
            reason = reason[:-1] + "; never decoded)" if reason.endswith(")") else reason + " (never decoded)"
            rep.problems.append(f"sample {key!r}, member {k!r}: {reason}")
        except MemberTooLargeError as exc:
            rep.oversized_members.append(name)
            rep.problems.append(f"sample {key!r}, member {k!r}: {exc.reason}")
        except MemberDecodeError:  # corrupt: inspect does not decode, the reader reports it
            pass


def inspect_shards(
    urls_or_pattern: str | Sequence[str] | None = None,
    manifest: str | os.PathLike | ShardManifest | None = None,
    *,
    label_key: str | None = None,
    required_keys: Sequence[str] | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    allow_unsafe_urls: bool = False,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
) -> InspectReport:
    """Read every shard completely (nothing is decoded except the integer label) and report what is in it.

    Per shard: sample count, class histogram, size, SHA-256, and problems: read damage (truncation, corrupt or
    missing headers, an archive without an end-of-archive block, an empty or missing file), samples missing
    ``label_key`` or one of ``required_keys``, labels that are not integers or not below ``num_classes``, and,
    against the manifest: count, class histogram, size and SHA-256 mismatches. Members with pickle-based
    extensions (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``), also under a compression suffix
    (``x.pyd.gz``, ``x.pickle.bz2``), are listed as ``unsafe_members``; they are never decoded. So are members
    the default decoder refuses although they look like data, which are also problems: ``.npy`` (or
    ``.npy.gz``) and ``.npz`` members whose array headers (read alone, no array loaded) give an object dtype (a
    pickle inside), and ``.pth``/``.pt`` members whose pickle (scanned, never run) calls globals outside
    ``torch.load``'s weights_only allow-list. Members over the size caps (``max_member_bytes``, or a ``.gz``
    member inflating more than ``max_ratio`` times) are ``oversized_members`` and problems; a tar member over
    the cap ends the shard's reading, like damage. A sample whose member names repeat (``a.cls`` and
    ``a.CLS``), use the metadata names (``a.__key__``) or are not UTF-8 is a problem (it counts as read, and
    its label is not counted).
    A sample without ``label_key`` is a problem when a label is expected: ``label_key`` was given, the manifest
    names one, or other samples have it. Dataset-level problems: shards in the manifest that were not found
    among ``urls``, manifest entries that :func:`read_manifest` refuses (a url that is not a file inside the
    manifest's folder: never opened; a shard listed twice: inspected once), and a url given twice.

    Args:
        urls_or_pattern: shard urls or a brace pattern; defaults to the manifest's shards.
        manifest: a manifest path (or :class:`ShardManifest`) to check against.
        label_key: label member; defaults to the manifest's ``label_key``, else ``"cls"``.
        required_keys: members every sample must have.
        num_classes: labels must be below it; defaults to the manifest's.
        progress: show a tqdm progress bar.
        allow_unsafe_urls: read the manifest with :func:`read_manifest`'s ``allow_unsafe_urls`` (only for a
            manifest you trust).
        max_member_bytes: the size cap of the readers (default 256 MiB; None: no cap), see
            :func:`iter_shard_files` and :func:`~torch_pretrain_update.data.decode.safe_decode`.
        max_ratio: the expansion cap of the readers (default 1000; None: no cap).

    Returns:
        an :class:`InspectReport` (``.ok``, ``.format()``, ``.to_dict()``).

    Example::

        >>> report = inspect_shards("/data/train-{000000..000009}.tar", manifest="/data/train-manifest.json")
        >>> print(report.format())
    """
    if not isinstance(allow_unsafe_urls, bool):
        raise TypeError(f"allow_unsafe_urls must be a bool; got {allow_unsafe_urls!r}")
    max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
    # what the stream's default decoder (safe_decode()) refuses, checked without decoding
    screen = _MemberDecoder("torchrgb8", False, max_member_bytes, max_ratio)
    problems: list[str] = []
    if isinstance(manifest, (str, os.PathLike)):
        # Refused entries are reported (and never opened) rather than raised: inspecting is how one finds them.
        man, problems = _load_manifest(manifest, allow_unsafe_urls)
    else:
        man = _as_manifest(manifest)
    if urls_or_pattern is None:
        if man is None:
            raise ValueError("inspect_shards needs urls_or_pattern or a manifest; got neither")
        urls = man.urls
    else:
        urls = []
        first: dict[str, str] = {}
        for u in expand_urls(urls_or_pattern):
            k = _shard_key(u)
            if k in first:
                problems.append(f"shard {u!r} is listed twice among the urls (also as {first[k]!r}); inspected once")
                continue
            first[k] = u
            urls.append(u)
    label_expected = label_key is not None or (man is not None and bool(man.label_key))
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
    # Samples without the label member met before any label was seen: a problem only if a label turns up later
    # (unlabelled data is fine). Per report: its first keys (at most 100) and how many there were.
    deferred: list[tuple[ShardReport, list[str], list[int]]] = []
    for url in bar if bar is not None else urls:
        rep = ShardReport(url=url)
        info = man.lookup(url) if man is not None else None
        if info is not None:
            rep.expected_count = info.count
            seen_entries.add(info.url)
        elif man is not None:
            rep.problems.append("not listed in the manifest")
        try:
            for sample in _samples(url, max_member_bytes=max_member_bytes, max_ratio=max_ratio):
                rep.count += 1
                if isinstance(sample, MalformedSampleError):  # refused by every reader: a problem, read on
                    rep.problems.append(sample.reason)
                    continue
                key = sample.get("__key__")
                _check_members(rep, key, sample, screen)
                missing = [k for k in required if k not in sample]
                if missing:
                    rep.problems.append(f"sample {key!r} misses required member(s) {missing}")
                if label_key in sample:
                    label_expected = True
                    try:
                        label = parse_label(sample[label_key])
                    except ValueError as exc:
                        rep.problems.append(f"sample {key!r}, member {label_key!r}: {exc}")
                        continue
                    if num_classes is not None and label >= num_classes:
                        rep.problems.append(f"sample {key!r}: label {label} out of range [0, {num_classes})")
                        continue
                    rep.class_counts[label] = rep.class_counts.get(label, 0) + 1
                elif label_expected:
                    rep.problems.append(f"sample {key!r} has no label member {label_key!r}")
                else:
                    if not deferred or deferred[-1][0] is not rep:
                        deferred.append((rep, [], [0]))
                    deferred[-1][2][0] += 1
                    if len(deferred[-1][1]) < 100:
                        deferred[-1][1].append(key)
        except DamagedShardError as exc:
            rep.problems.append(exc.reason)
            if isinstance(exc, TarMemberTooLargeError) and exc.member is not None:
                rep.oversized_members.append(exc.member)
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
    if label_expected:
        for rep, keys, (n,) in deferred:
            rep.problems += [f"sample {key!r} has no label member {label_key!r}" for key in keys]
            if n > len(keys):
                rep.problems.append(f"{n - len(keys)} more sample(s) have no label member {label_key!r}")
    if man is not None:
        absent = [s.url for s in man.shards if s.url not in seen_entries]
        if absent and urls_or_pattern is None:
            problems += [f"manifest shard {u!r} was not inspected" for u in absent]
        elif absent:
            problems.append(f"{len(absent)} shard(s) of the manifest were not among the urls (e.g. {absent[0]!r})")
    return InspectReport(shards=reports, manifest=man.path if man is not None else None, problems=problems)

