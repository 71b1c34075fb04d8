"""Strict reading of WebDataset tar shards: every loss is an error naming the shard, never a silent end.

Python's ``tarfile`` (used by webdataset) treats an invalid header after the start of an archive as its end, so a
shard with a corrupt header in the middle silently loses the rest of its samples, even under webdataset's default
``reraise_exception`` handler. :func:`iter_shard_files` is like ``webdataset.tariterators.tar_file_iterator`` but
also checks how the archive ended. A well-formed tar ends with a zero block; when ``tarfile`` stops at anything
else (no block at all: truncated at a header boundary; a partial block: truncated inside a header; a non-zero
block: a corrupt header) the reader raises :class:`~torch_pretrain_update.data.errors.DamagedShardError` naming the
shard and the byte offset. That detects truncation and corrupt headers even *without* a manifest. What only a
manifest (:mod:`~torch_pretrain_update.data.manifest`) detects: a shard that is a complete, well-formed tar archive
but holds fewer (or more) samples than were written, a shard that is missing altogether, and changed bytes.

The reader also refuses, before spending the memory, a member (or a tar header extension) over
``max_member_bytes`` and a compressed shard inflating past ``max_ratio``
(:class:`~torch_pretrain_update.data.errors.TarMemberTooLargeError`; see :mod:`~torch_pretrain_update.data.limits`),
and refuses, sample by sample, member names that cannot form a sample
(:class:`~torch_pretrain_update.data.errors.MalformedSampleError`).

Two ways in: :func:`iter_shard_files` (member records) and :func:`iter_shard_samples` (samples grouped by key, with
an optional count check); :func:`~torch_pretrain_update.data.strict_samples.strict_tarfile_to_samples` is the
pipeline stage built on them, a drop-in for ``webdataset.tarfile_to_samples`` in ``wds.DataPipeline``.
"""

from __future__ import annotations

import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

from webdataset.gopen import gopen as wds_gopen
from webdataset.tariterators import base_plus_ext

from torch_pretrain_update._checks import check_int
from torch_pretrain_update.data.errors import (
    DamagedShardError,
    MalformedSampleError,
    TarMemberTooLargeError,
    sample_location,
)
from torch_pretrain_update.data.limits import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_RATIO,
    STEP,
    TooExpanded,
    check_limits,
    decompressed_stream,
)
from torch_pretrain_update.data.tar_headers import member_name_problem

__all__ = ["iter_shard_files", "iter_shard_samples"]

#: member names webdataset's reader drops as metadata (``__meta__``-style names, ``__x__/...`` folders)
_META_RE = re.compile(r"__[^/]*__($|/)")

#: header types whose data ``tarfile`` reads into memory while parsing the header after them (pax, GNU names)
_HEADER_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                      tarfile.GNUTYPE_LONGLINK)

SelectFiles = Optional[Callable[[str], bool]]
RenameFiles = Optional[Callable[[str], str]]


class _HeaderTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a header extension (pax or GNU long name) of {size} bytes")
        self.size, self.limit = size, limit


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
    def fromtarfile(cls, tf: tarfile.TarFile) -> Any:
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


def _iter_files(url: str, check_end: bool, max_member_bytes: int | None, max_ratio: float | None,
                select_files: SelectFiles = None, rename_files: RenameFiles = None,
                local_copy: str | None = None) -> Iterator[dict[str, Any]]:
    """:func:`iter_shard_files`, with webdataset's ``rename_files`` (applied first) and ``select_files``: a member
    that is not selected comes out as ``{"fname", "data": None}``, its data never read, so that the grouping still
    sees where its sample is (a sample counts for the manifest whether or not its members are selected). With
    ``local_copy`` (a downloaded copy of ``url``, as webdataset's cache keeps) the bytes are read from it."""
    try:
        stream = wds_gopen(local_copy or url, "rb")
    except Exception as exc:  # FileNotFoundError, PermissionError, a failing pipe ...
        raise DamagedShardError(url, f"cannot be opened ({type(exc).__name__}: {exc})") from exc
    fname = None
    reading: str | None = None  # the member whose data is being read (None between members)
    try:
        try:
            tf = tarfile.open(fileobj=decompressed_stream(stream, max_ratio), mode="r|",
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
                if rename_files is not None:
                    fname = rename_files(fname)
                if select_files is not None and not select_files(fname):
                    yield {"fname": fname, "data": None, "__url__": url}
                    continue
                if max_member_bytes is not None and tarinfo.size > max_member_bytes:
                    key = base_plus_ext(fname)[0]
                    raise TarMemberTooLargeError(
                        url, f"{sample_location(key, member=fname)} announces {tarinfo.size} bytes, more than "
                             f"max_member_bytes={max_member_bytes}; refused before reading it, and the rest of the "
                             "shard is not read", limit=max_member_bytes, key=key, member=fname)
                reading = fname
                data: bytes | None = _read_member(tf.extractfile(tarinfo), tarinfo.size)
                if data is None or len(data) != tarinfo.size:
                    got = 0 if data is None else len(data)
                    raise DamagedShardError(url, f"member {fname!r} truncated: {got} of {tarinfo.size} bytes",
                                            key=base_plus_ext(fname)[0], member=fname)
                reading = None
                yield {"fname": fname, "data": data, "__url__": url}
                data = None  # the record holds it now: do not keep it alive while reading the next member
                tf.members = []  # type: ignore[attr-defined]  # tarfile keeps every TarInfo otherwise
        except DamagedShardError:
            raise
        except (_HeaderTooLarge, TooExpanded):
            raise
        except _READ_ERRORS as exc:
            where = f"after member {fname!r}" if fname else "at the first member"
            if "unexpected end of data" in str(exc) or "end-of-stream marker" in str(exc):
                key = base_plus_ext(reading)[0] if reading is not None else None
                raise DamagedShardError(url, f"truncated inside member {fname!r} (unexpected end of data)",
                                        key=key, member=reading) from exc
            raise DamagedShardError(url, f"unreadable {where}: {exc}") from exc
        _check_end(url, tf, fname, check_end)
    except _HeaderTooLarge as exc:
        after = f" after member {fname!r}" if fname else ""
        raise TarMemberTooLargeError(url, f"{exc}{after} is more than max_member_bytes={exc.limit}; refused "
                                          "before reading it, and the rest of the shard is not read",
                                     limit=exc.limit) from None
    except TooExpanded as exc:
        after = f" (after member {fname!r})" if fname else ""
        raise TarMemberTooLargeError(url, f"the compressed shard inflates more than max_ratio={exc.limit:g} times "
                                          f"({exc}){after}: refused as a decompression bomb, and the rest of the shard "
                                          "is not read", limit=exc.limit) from None
    finally:
        stream.close()


def _check_end(url: str, tf: tarfile.TarFile, fname: str | None, check_end: bool) -> None:
    """Raise unless ``tarfile`` stopped at a zero block (the header error it met last says why it stopped)."""
    end = getattr(tf, "_tpu_header_error", None)
    if not check_end or isinstance(end, tarfile.EOFHeaderError):  # type: ignore[attr-defined]
        return
    offset = tf.offset
    after = f" after member {fname!r}" if fname else ""
    if isinstance(end, tarfile.EmptyHeaderError):  # type: ignore[attr-defined]
        raise DamagedShardError(url, f"ends without an end-of-archive block at byte {offset}{after} "
                                     "(truncated at a header boundary)")
    if isinstance(end, tarfile.TruncatedHeaderError):  # type: ignore[attr-defined]
        raise DamagedShardError(url, f"truncated inside a header at byte {offset}{after}")
    raise DamagedShardError(url, f"invalid (corrupt) header at byte {offset}{after} ({end}); tarfile "
                                 "stops reading there, so the rest of the shard is lost")


def _read_member(f: Any, size: int) -> bytes | None:
    # In 1 MiB steps: one read() of a large member costs tarfile about three copies of it at once.
    if f is None:
        return None
    if size <= STEP:
        return f.read()
    chunks = []
    while chunk := f.read(STEP):
        chunks.append(chunk)
    return b"".join(chunks)


def _grouped(url: str, files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any] | MalformedSampleError]:
    """webdataset's ``group_by_keys`` (same key/suffix split, suffixes in lower case), except that a sample whose
    member names cannot form a sample comes out as a :class:`MalformedSampleError` in its place (webdataset
    raises a bare ``ValueError`` naming no shard, or drops the sample silently for a member ``x.__bad__``).

    Damage met inside the data of another sample's member ends the sample read so far, complete: it is yielded
    before the error. Damage elsewhere (a header) may have cut the sample short, so it is not."""
    current: dict[str, Any] | None = None
    bad: MalformedSampleError | None = None
    try:
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
            if bad is not None or record["data"] is None:  # refused already, or a member not selected
                continue
            problem = member_name_problem(fname, suffix, current)
            if problem is not None:
                bad = MalformedSampleError(url, f"{sample_location(prefix)}: {problem}", key=prefix, member=fname)
                continue
            current[suffix] = record["data"]
    except DamagedShardError as exc:
        if current is not None and exc.key is not None and exc.key != current["__key__"]:
            yield bad if bad is not None else current
        raise
    if current is not None:
        yield bad if bad is not None else current


def shard_samples(url: str, *, check_end: bool = True, expected: int | None = None,
                  max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
                  max_ratio: float | None = DEFAULT_MAX_RATIO, select_files: SelectFiles = None,
                  rename_files: RenameFiles = None,
                  local_copy: str | None = None) -> Iterator[dict[str, Any] | MalformedSampleError]:
    """The readers' shared source: raw samples, with a :class:`MalformedSampleError` in the place of each sample
    that cannot be formed (so that each reader routes it through its handler and reads on; it counts as a sample
    for the manifest count and for positions). With ``select_files``, a sample none of whose members is selected
    comes out as ``{"__key__", "__url__"}`` alone (counted; webdataset would not produce it). ``local_copy``: see
    :func:`_iter_files`."""
    items = _grouped(url, _iter_files(url, check_end, max_member_bytes, max_ratio, select_files, rename_files,
                                      local_copy))
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
    source, the stream and :func:`~torch_pretrain_update.data.inspect.inspect_shards` skip or report just that
    sample and read on). The size caps are :func:`iter_shard_files`'s.

    ``expected`` (the shard's manifest count) adds the count check: a shard that ends after fewer samples (a
    rewritten shard, or damage ``check_end=False`` lets through), or holds more, raises a
    :class:`DamagedShardError` saying how many were read; so does damage, with the count read before it.

    Example::

        >>> [s["__key__"] for s in iter_shard_samples("/data/train-000000.tar", expected=10)][:2]
        ['000000', '000001']
    """
    max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
    if expected is not None:
        expected = check_int(expected, "expected", min_value=0)
    return _raising(shard_samples(url, check_end=check_end, expected=expected, max_member_bytes=max_member_bytes,
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
            raise DamagedShardError(url, reason, key=exc.key, member=exc.member) from exc
        raise
    if n < expected:
        raise DamagedShardError(
            url,
            f"{n} samples read but the manifest says {expected}: the shard ended early (a corrupt header or "
            "truncation that tarfile treats as the end of the archive, or a rewritten shard)",
        )
