"""Tar headers parsed by hand, for reading WebDataset shards by byte offset.

Random access parses the headers of every sample read (a pax header before each member for webdataset's writer),
and ``tarfile``'s per-member cost (about ten times :func:`parse_member`'s) would dominate a read. The rules are
``tarfile``'s: pax ``path``/``size`` records and GNU long names apply to the next header, a POSIX ustar ``prefix``
is joined to the name; members are grouped into samples like webdataset's ``group_by_keys``.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from torch_pretrain_update.data.errors import MalformedSampleError, sample_location

#: the tar block size; offsets and spans are counted in blocks
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: tar types with no data to skip although their size field may be non-zero (tarfile does not skip it either)
_NO_DATA_TYPES = frozenset(b"123456")
_REGULAR_TYPES = frozenset((b"0", b"\x00", b"7"))
#: webdataset's ``base_plus_ext`` on bytes (``/`` and ``.`` never occur inside a UTF-8 multi-byte character)
_KEY_RE = re.compile(rb"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: member names webdataset's reader drops as metadata (``__meta__``-style names, ``__x__/...`` folders)
_META_RE = re.compile(rb"__[^/]*__($|/)")


class NeedMore(Exception):
    """The buffer ends inside a header or a header extension that starts at ``pos``."""

    def __init__(self, pos: int, need: int) -> None:
        self.pos, self.need = pos, need


class BadHeader(Exception):
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
        raise BadHeader(pos, f"a numeric field holds {field!r}, not an octal number") from None


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
            raise BadHeader(pos, "a pax extended header record has no valid length") from None
        record = data[space + 1:i + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise BadHeader(pos, "a pax extended header record is malformed")
        key, value = record[:-1].split(b"=", 1)
        out[key] = value
        i += length
    return out


def parse_member(buf: bytes, pos: int, check_sums: bool) -> tuple[int, bytes, int, int, bool] | None:
    """The tar member whose (first) header starts at ``buf[pos]``.

    Returns ``(start, name, data_start, size, regular)`` with positions in ``buf`` (``data_start + size`` may
    lie beyond the buffer), or None at an end-of-archive (zero) block. Raises :class:`NeedMore` when the
    buffer ends inside the header or one of its extensions, :class:`BadHeader` for anything that is not a
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
        if pos + BLOCK > n:
            raise NeedMore(start, pos + BLOCK - start)
        h = buf[pos:pos + BLOCK]
        if h == _ZERO_BLOCK:
            if pos != start:
                raise BadHeader(pos, "an extended header is followed by the end-of-archive block")
            return None
        if h[257:262] != b"ustar":
            raise BadHeader(pos, "no tar header here (the 'ustar' magic is missing)")
        if check_sums and not _checksum_ok(h):
            raise BadHeader(pos, "a header's checksum does not match (a corrupt header)")
        size = _number(h[124:136], pos)
        kind = h[156:157]
        data_start = pos + BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            if data_start + size > n:
                raise NeedMore(start, data_start + size - start)
            ext = buf[data_start:data_start + size]
            if kind == b"x":
                # only path and size change where the member lies; skip the parse for webdataset's mtime-only ones
                if b"path=" in ext or b"size=" in ext or b"GNU.sparse" in ext:
                    rec = _pax_records(ext, pos)
                    if any(k.startswith(b"GNU.sparse") for k in rec):
                        raise BadHeader(pos, "a sparse member (not supported for reading by offset)")
                    if b"path" in rec:
                        path = rec[b"path"]
                    if b"size" in rec:
                        try:
                            size_override = int(rec[b"size"])
                        except ValueError:
                            raise BadHeader(pos, "a pax size record is not a number") from None
            elif kind == b"L":
                path = ext.split(b"\x00", 1)[0]
            pos = data_start + -(-size // BLOCK) * BLOCK
            continue
        if kind == b"S":
            raise BadHeader(pos, "a GNU sparse member (not supported for reading by offset)")
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


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def split_name(name: bytes) -> tuple[bytes | None, bytes]:
    """``(key, suffix)`` of a member as webdataset groups it; key None for a member it drops."""
    if b"/" not in name and name.startswith(b"__") and name.endswith(b"__"):
        return None, b""
    if _META_RE.match(name):
        return None, b""
    m = _KEY_RE.match(name)
    if m is None:
        return None, b""
    return m.group(1), m.group(2)


def name_text(name: bytes) -> str:
    # tarfile decodes names the same way: undecodable bytes survive as lone surrogates
    return name.decode("utf-8", "surrogateescape")


def parse_sample(data: bytes, crc: int, url: str) -> dict[str, Any]:
    """The members of the sample that ``data`` (its indexed span) holds: ``{suffix: bytes, "__key__": key}``.

    Every header in the span must be a tar header of the sample whose key has CRC-32 ``crc``, and the members
    must tile the span exactly (else :class:`BadHeader`, with the position in ``data``); member names that cannot
    form a sample raise :class:`~torch_pretrain_update.data.errors.MalformedSampleError` naming ``url``, as the
    stream readers do."""
    sample: dict[str, Any] = {}
    key: bytes | None = None
    pos = 0
    span = len(data)
    while pos < span:
        member = parse_member(data, pos, False)
        if member is None:
            raise BadHeader(pos, "an end-of-archive block inside the sample")
        _, name, data_start, size, regular = member
        end = data_start + size
        if end > span:
            raise BadHeader(pos, f"member {name_text(name)!r} runs past the sample's indexed span")
        pos = data_start + padded(size)
        if not regular:
            continue
        mkey, suffix = split_name(name)
        if mkey is None:
            continue
        if key is None:
            key = mkey
            if zlib.crc32(key) != crc:
                raise BadHeader(0, f"the header names sample {name_text(key)!r}, not the indexed one")
        elif mkey != key:
            raise BadHeader(pos, f"member {name_text(name)!r} belongs to another sample than {name_text(key)!r}")
        text = name_text(suffix).lower()
        problem = member_name_problem(name_text(name), text, sample)
        if problem is not None:
            raise MalformedSampleError(url, f"{sample_location(name_text(key))}: {problem}", key=name_text(key),
                                       member=name_text(name))
        sample[text] = data[data_start:end]
    if key is None:
        raise BadHeader(0, "no member here")
    sample["__key__"] = name_text(key)
    return sample


def member_name_problem(name: str, suffix: str, sample: dict[str, Any]) -> str | None:
    """Why member ``name`` (decoded as ``tarfile`` does, undecodable bytes as lone surrogates) with the lower-case
    ``suffix`` cannot join ``sample`` (None when it can): a name that is not UTF-8, a suffix named like the
    metadata, a suffix the sample already has."""
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return f"member name {name!r} is not valid UTF-8"
    if suffix.startswith("__"):
        return (f"member {name!r} is named like the sample's metadata ({suffix!r}); webdataset would overwrite the "
                "metadata or drop the sample")
    if suffix in sample:
        return (f"member {name!r} repeats the member {suffix!r} (suffixes are compared in lower case), so one of "
                "them would be lost")
    return None
