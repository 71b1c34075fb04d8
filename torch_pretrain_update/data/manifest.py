"""Shard manifests: what :func:`~torch_pretrain_update.data.write.write_shards` records, and how it is read.

A **manifest** is a small JSON file written next to the shards. It records, for every shard, the number of samples,
the class histogram, the byte size and the SHA-256 of the file. Readers use it to catch what the tar format cannot:
a shard that is a complete, well-formed tar archive but holds fewer (or more) samples than were written, a shard
that is missing altogether, and changed bytes.

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

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand

__all__ = ["ShardInfo", "ShardManifest", "read_manifest", "expand_urls"]

MANIFEST_FORMAT = "torch-pretrain-update/shards"
MANIFEST_VERSION = 1

#: a url scheme as webdataset's ``gopen`` dispatches on it (``pipe:``, ``file:``, ``http:``, ``s3:`` ...)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


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
    """A parsed manifest (see the module docstring). ``shards`` keep the order they were written in.

    Example::

        >>> m = read_manifest("/data/train-manifest.json")
        >>> m.num_samples, m.class_counts, m.lookup(m.urls[0]).count
        (25, [9, 8, 8], 10)
    """

    path: str
    shards: tuple[ShardInfo, ...]
    label_key: str | None
    num_classes: int

    def __post_init__(self) -> None:
        # A shard listed twice would be read twice each epoch (and its lookup would be ambiguous).
        seen: dict[str, str] = {}
        for s in self.shards:
            key = absolute_url(s.url)
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
        hit = index["abs"].get(absolute_url(url))
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
            cached = {"abs": {absolute_url(s.url): s for s in self.shards}, "name": names}
            object.__setattr__(self, "_cached_index", cached)
        return cached


def local_file_path(url: str) -> str | None:
    """The path of a url that names a local file (a plain path, or ``file:``/``file://`` + path, as webdataset's
    opener reads them), else None (``pipe:``, ``http:``, ``s3:`` ...)."""
    if url.startswith("file:"):
        return re.sub(r"^file:(//)?", "", url)
    return None if _SCHEME_RE.match(url) else url


def absolute_url(url: str) -> str:
    """A url as shards are compared: a local file's absolute, normalised path; any other url verbatim."""
    path = local_file_path(url)
    return url if path is None else os.path.normpath(os.path.abspath(path))


def shard_key(url: str) -> str:
    """What makes two urls the same shard: the resolved real path of a local file (so ``./a.tar``, ``b/../a.tar``
    and a symlink to it are one shard), else the url itself."""
    url = absolute_url(url)
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


def directory_message(path: str, option: str | None = None) -> str:
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


def load_manifest(path: str | os.PathLike, allow_unsafe_urls: bool) -> tuple[ShardManifest, list[str]]:
    """Parse a manifest. Returns it without the entries that are refused (a url that is not a file inside the
    manifest's folder, unless ``allow_unsafe_urls``; a shard listed a second time), and one message per refused
    entry. Malformed files and entries raise ``ValueError`` at once."""
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"manifest must be a path; got {type(path).__name__}")
    if os.path.isdir(path):
        raise ValueError(f"manifest {directory_message(path)}")
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
        key = shard_key(url)
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
    """Read and validate a manifest written by :func:`~torch_pretrain_update.data.write.write_shards`.

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
    man, refused = load_manifest(path, allow_unsafe_urls)
    if refused:
        more = f" (and {len(refused) - 1} more refused entries)" if len(refused) > 1 else ""
        raise ValueError(refused[0] + more)
    return man


def as_manifest(manifest: str | os.PathLike | ShardManifest | None, *,
                 allow_unsafe_urls: bool = False) -> ShardManifest | None:
    """A manifest argument -> a :class:`ShardManifest`: a path is read with :func:`read_manifest` (whose url
    checks ``allow_unsafe_urls`` relaxes); a ``ShardManifest`` built or read by the caller is taken as it is."""
    if manifest is None or isinstance(manifest, ShardManifest):
        return manifest
    if isinstance(manifest, (str, os.PathLike)):
        return read_manifest(manifest, allow_unsafe_urls=allow_unsafe_urls)
    raise TypeError(f"manifest must be a path or a ShardManifest; got {type(manifest).__name__}")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern (``"train-{000000..000009}.tar"``), a ``::``-separated list, a path, or a sequence of
    them -> a list of urls (webdataset's expansion rules; globs such as ``*.tar`` are not expanded).

    Example::

        >>> expand_urls("train-{000000..000002}.tar")
        ['train-000000.tar', 'train-000001.tar', 'train-000002.tar']
    """
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    out: list[str] = []
    if isinstance(urls, str):
        for part in urls.split("::"):
            out.extend(braceexpand.braceexpand(part))
    elif isinstance(urls, Sequence):
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


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (hex), as a manifest records it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
