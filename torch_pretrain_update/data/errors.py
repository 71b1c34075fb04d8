"""What goes wrong when data is read, and one way to say where.

Every error of the data readers is a ``ValueError`` (a caller's ``except ValueError`` keeps working) whose message
names the place: the shard's url, the sample's ``__key__`` and the member. :func:`sample_location` writes that
place the same way for every reader (``member 'x.npy' of sample __key__='000001' (__url__='train-0.tar')``).

Two families:

- a member that cannot be decoded (:class:`MemberDecodeError`; :class:`UnsafeMemberError` when decoding it would
  unpickle, :class:`MemberTooLargeError` when it would exceed a size cap): the decoders raise them, only that
  sample is affected;
- a shard that cannot be read completely (:class:`DamagedShardError`; :class:`TarMemberTooLargeError` for a size
  cap, :class:`MalformedSampleError` for a sample whose member names cannot form a sample). A
  ``DamagedShardError`` is also a ``tarfile.ReadError``, the error webdataset's tar reader raises, so code written
  for webdataset's ``tarfile_to_samples`` catches it unchanged.

:class:`SizeLimitError` is the base of both size refusals (``except SizeLimitError`` catches either).
"""

from __future__ import annotations

import tarfile
from typing import Any

__all__ = [
    "SizeLimitError",
    "MemberDecodeError",
    "UnsafeMemberError",
    "MemberTooLargeError",
    "DamagedShardError",
    "TarMemberTooLargeError",
    "MalformedSampleError",
]


def sample_location(key: Any = None, url: Any = None, member: str | None = None) -> str:
    """Where in the data: ``member 'm' of sample __key__='k' (__url__='u')``, leaving out what is unknown
    (without a member the sample is always named, ``sample __key__=None`` included)."""
    if member is not None:
        text = f"member {member!r}" + (f" of sample __key__={key!r}" if key is not None else "")
    else:
        text = f"sample __key__={key!r}"
    return text + (f" (__url__={url!r})" if url is not None else "")


class SizeLimitError(ValueError):
    """Base of the refusals for size: a member larger than ``max_member_bytes``, or a compressed payload that
    inflates more than ``max_ratio`` times. ``limit`` is the cap that was hit (bytes, or the ratio)."""

    limit: float


class MemberDecodeError(ValueError):
    """A member could not be decoded (corrupt data, wrong type); the message names member, key and url."""

    def __init__(self, message: str, *, member: str, key: Any = None, url: Any = None) -> None:
        super().__init__(message)
        self.member, self.key, self.url = member, key, url


class UnsafeMemberError(MemberDecodeError):
    """A member would be unpickled (arbitrary code execution) and ``allow_unsafe`` is False. ``reason`` says
    what was blocked (a pickle extension, an object dtype, the globals a ``.pth`` names)."""

    def __init__(self, message: str, *, member: str, key: Any = None, url: Any = None, reason: str = "") -> None:
        super().__init__(message, member=member, key=key, url=url)
        self.reason = reason


class MemberTooLargeError(MemberDecodeError, SizeLimitError):
    """A member whose decoded form would exceed ``max_member_bytes`` or inflate more than ``max_ratio`` times;
    refused before that memory is spent. ``reason`` says what and ``limit`` which cap."""

    def __init__(self, message: str, *, member: str, key: Any = None, url: Any = None, reason: str = "",
                 limit: float = 0) -> None:
        super().__init__(message, member=member, key=key, url=url)
        self.reason = reason
        self.limit = limit


class DamagedShardError(ValueError, tarfile.ReadError):
    """A shard that cannot be read completely: truncated, corrupt, empty, unreadable, or whose sample count
    disagrees with its manifest. ``url`` names the shard and ``reason`` says what is wrong; ``key`` and
    ``member`` name the sample and member where the damage was met, when that is known (None otherwise).

    Also a ``tarfile.ReadError`` (what webdataset's reader raises for a broken archive), so handlers written for
    webdataset keep working."""

    def __init__(self, url: str, reason: str, *, key: str | None = None, member: str | None = None) -> None:
        super().__init__(f"damaged shard {url!r}: {reason}")
        self.url = url
        self.reason = reason
        self.key, self.member = key, member


class TarMemberTooLargeError(DamagedShardError, SizeLimitError):
    """A tar member (or a header extension) larger than ``max_member_bytes``, or a compressed shard inflating
    more than ``max_ratio`` times: refused before the bytes are held, and the rest of the shard is not read
    (reading past the member would inflate it). ``key``/``member`` name it (None for the ratio) and ``limit``
    the cap."""

    def __init__(self, url: str, reason: str, *, limit: float, key: str | None = None,
                 member: str | None = None) -> None:
        super().__init__(url, reason, key=key, member=member)
        self.limit = limit


class MalformedSampleError(DamagedShardError):
    """A sample whose member names cannot form a webdataset sample: a repeated member (suffixes are compared in
    lower case, so ``a.cls`` and ``a.CLS`` collide), a member named like the metadata (``a.__key__``,
    ``a.__url__``; webdataset drops a sample with ``a.__bad__`` silently) or a name that is not valid UTF-8.
    Only this sample is refused: the readers skip it (under a skipping handler) and read on. ``key`` and
    ``member`` name it."""

    def __init__(self, url: str, reason: str, *, key: str, member: str) -> None:
        super().__init__(url, reason, key=key, member=member)
