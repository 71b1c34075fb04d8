"""Size caps of the readers and bounded decompression: nothing is inflated past a cap before it is refused.

Two caps, shared by the member decoders (:mod:`~torch_pretrain_update.data.decode`) and the tar reader
(:mod:`~torch_pretrain_update.data.tar_reader`):

- ``max_member_bytes`` (default :data:`DEFAULT_MAX_MEMBER_BYTES`, 256 MiB): the largest member, stored or
  decompressed, that a reader holds in memory;
- ``max_ratio`` (default :data:`DEFAULT_MAX_RATIO`): decompressed bytes per compressed byte, checked once the
  output passes :data:`RATIO_FLOOR` (16 MiB): the signature of a decompression bomb.

``None`` lifts a cap. Decompression runs in steps of :data:`STEP` bytes, so a cap stops a bomb within one step.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
from typing import Any, Optional

from torch_pretrain_update._checks import check_float, check_int

__all__ = ["DEFAULT_MAX_MEMBER_BYTES", "DEFAULT_MAX_RATIO", "RATIO_FLOOR"]

#: default ``max_member_bytes``: the largest member, stored or decompressed, that a reader holds in memory.
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
#: default ``max_ratio``: decompressed bytes per compressed byte. Real data stays far below it (a .tar.gz of tiny
#: samples, mostly tar padding, compresses ~100x with gzip and ~300x with bz2); zeros reach 1028x with gzip and
#: 650,000x with bz2.
DEFAULT_MAX_RATIO = 1000.0
#: decompressed sizes up to this are never refused for their ratio (small regular payloads compress well).
RATIO_FLOOR = 16 * 2**20
#: inflate in steps of this size, so that a cap stops a bomb within one step
STEP = 2**20


def check_limits(max_member_bytes: Optional[int], max_ratio: Optional[float]) -> tuple[Optional[int], Optional[float]]:
    """Validate ``max_member_bytes`` (None or an int >= 1) and ``max_ratio`` (None or a finite float >= 1)."""
    if max_member_bytes is not None:
        max_member_bytes = check_int(max_member_bytes, "max_member_bytes", min_value=1)
    if max_ratio is not None:
        max_ratio = check_float(max_ratio, "max_ratio", low=1.0)
    return max_member_bytes, max_ratio


def output_cap(max_member_bytes: Optional[int], max_ratio: Optional[float],
               compressed: int) -> tuple[float, float, str]:
    """``(cap, limit, name)``: the most bytes ``compressed`` bytes may inflate to, and the cap that sets it."""
    cap, limit, name = math.inf, 0.0, ""
    if max_member_bytes is not None:
        cap, limit, name = max_member_bytes, max_member_bytes, f"max_member_bytes={max_member_bytes}"
    if max_ratio is not None:
        by_ratio = max(RATIO_FLOOR, max_ratio * compressed)
        if by_ratio < cap:
            cap, limit, name = by_ratio, max_ratio, f"max_ratio={max_ratio:g} (checked past {RATIO_FLOOR} bytes)"
    return cap, limit, name


def read_capped(f: Any, cap: float) -> Optional[bytes]:
    """Read ``f`` to its end in steps of 1 MiB; ``None`` as soon as more than ``cap`` bytes came out."""
    chunks: list[bytes] = []
    n = 0
    while True:
        chunk = f.read(int(min(STEP, cap - n + 1)))
        if not chunk:
            return b"".join(chunks)
        n += len(chunk)
        if n > cap:
            return None
        chunks.append(chunk)


class TooExpanded(Exception):
    """A compressed stream inflated more than ``limit`` times (raised by :func:`decompressed_stream`'s reader)."""

    def __init__(self, out: int, raw: int, limit: float) -> None:
        super().__init__(f"{raw} compressed bytes inflated to {out}")
        self.limit = limit


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
            raise TooExpanded(self.out, self.src.n, self.max_ratio)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.dec.close()


def decompressed_stream(raw: Any, max_ratio: float | None) -> Any:
    """A file object over a shard's tar bytes: the raw stream, or a bounded decompressor for the formats
    ``tarfile.open(mode="r|*")`` recognises (gzip, bzip2, xz/lzma; by their magic bytes, as tarfile does). Its
    ``read`` raises :class:`TooExpanded` past ``max_ratio``."""
    head = raw.peek(10)[:10] if hasattr(raw, "peek") else b""
    if len(head) == 10:  # a buffered file or pipe: looked at without consuming (no wrapper on the plain path)
        if not head.startswith((b"\x1f\x8b\x08", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00\x80")):
            return raw
        src = _CountingSource(raw, b"")
    else:
        head = raw.read(10)
        src = _CountingSource(raw, head)
    # the wrappers read like the binary files the stubs ask for
    if head.startswith(b"\x1f\x8b\x08"):
        return _Inflating(gzip.GzipFile(fileobj=src, mode="rb"), src, max_ratio)  # type: ignore[call-overload]
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return _Inflating(bz2.BZ2File(src), src, max_ratio)  # type: ignore[call-overload]
    if head.startswith((b"\xfd7zXZ", b"\x5d\x00\x00\x80")):
        return _Inflating(lzma.LZMAFile(src), src, max_ratio)  # type: ignore[arg-type]
    return src
