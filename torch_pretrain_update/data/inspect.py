"""Inspection of WebDataset shards: read every shard completely and report what is in it, against a manifest.

What ``pretrain-update inspect`` runs. Nothing is decoded except the integer label; members the default decoder
would refuse (pickles, object arrays, payloads over the size caps) are found by screening their headers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch_pretrain_update._checks import check_int
from torch_pretrain_update.data.errors import (
    DamagedShardError,
    MalformedSampleError,
    MemberDecodeError,
    MemberTooLargeError,
    TarMemberTooLargeError,
    UnsafeMemberError,
)
from torch_pretrain_update.data.labels import parse_label
from torch_pretrain_update.data.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_RATIO, check_limits
from torch_pretrain_update.data.manifest import (
    ShardManifest,
    absolute_url,
    as_manifest,
    expand_urls,
    file_sha256,
    load_manifest,
    shard_key,
)
from torch_pretrain_update.data.member_decoder import UNSAFE_EXTENSIONS, MemberDecoder
from torch_pretrain_update.data.tar_reader import shard_samples

__all__ = ["ShardReport", "InspectReport", "inspect_shards"]

#: Member extensions whose standard decoders execute code (pickle) or may do so (``.pth`` without
#: ``weights_only``), also under a compression suffix (``x.pyd.gz``, ``x.pickle.bz2``). Nothing in this module
#: ever decodes them; :func:`inspect_shards` reports them.
_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth")
#: compression suffixes peeled off a member name before its type is judged
_COMPRESSION_EXTENSIONS = ("gz", "bz2", "xz", "lzma", "zst", "zstd", "lz4", "z", "br")


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


def _member_kind(name: str) -> str:
    """A member's type under its compression suffixes: ``pyd.gz`` -> ``pyd``, ``pickle.bz2`` -> ``pickle``."""
    parts = name.lower().split(".")
    while len(parts) > 1 and parts[-1] in _COMPRESSION_EXTENSIONS:
        parts.pop()
    return parts[-1]


def _check_members(rep: ShardReport, key: Any, sample: dict[str, Any], screen: MemberDecoder) -> None:
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
    among ``urls``, manifest entries that :func:`~torch_pretrain_update.data.manifest.read_manifest` refuses (a
    url that is not a file inside the manifest's folder: never opened; a shard listed twice: inspected once),
    and a url given twice.

    Args:
        urls_or_pattern: shard urls or a brace pattern; defaults to the manifest's shards.
        manifest: a manifest path (or :class:`ShardManifest`) to check against.
        label_key: label member; defaults to the manifest's ``label_key``, else ``"cls"``.
        required_keys: members every sample must have.
        num_classes: labels must be below it; defaults to the manifest's.
        progress: show a tqdm progress bar.
        allow_unsafe_urls: read the manifest with
            :func:`~torch_pretrain_update.data.manifest.read_manifest`'s ``allow_unsafe_urls`` (only for a
            manifest you trust).
        max_member_bytes: the size cap of the readers (default 256 MiB; None: no cap), see
            :func:`~torch_pretrain_update.data.tar_reader.iter_shard_files` and
            :func:`~torch_pretrain_update.data.decode.safe_decode`.
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
    screen = MemberDecoder("torchrgb8", False, max_member_bytes, max_ratio)
    problems: list[str] = []
    man: ShardManifest | None
    if isinstance(manifest, (str, os.PathLike)):
        # Refused entries are reported (and never opened) rather than raised: inspecting is how one finds them.
        man, problems = load_manifest(manifest, allow_unsafe_urls)
    else:
        man = as_manifest(manifest)
    if urls_or_pattern is None:
        if man is None:
            raise ValueError("inspect_shards needs urls_or_pattern or a manifest; got neither")
        urls = man.urls
    else:
        urls = []
        first: dict[str, str] = {}
        for u in expand_urls(urls_or_pattern):
            k = shard_key(u)
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
            for sample in shard_samples(url, max_member_bytes=max_member_bytes, max_ratio=max_ratio):
                rep.count += 1
                if isinstance(sample, MalformedSampleError):  # refused by every reader: a problem, read on
                    rep.problems.append(sample.reason)
                    continue
                key: str = sample["__key__"]
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
        local = absolute_url(url)
        if os.path.isfile(local):
            rep.bytes = os.path.getsize(local)
            rep.sha256 = file_sha256(local)
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
