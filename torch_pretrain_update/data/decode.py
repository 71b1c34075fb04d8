"""Safe decoding of WebDataset samples: no member is ever unpickled unless the caller opts in.

webdataset 1.0.2's default decoder (``.decode()``) calls ``pickle.loads`` on ``.pyd``/``.pickle``/``.pkl``
members and ``torch.load(..., weights_only=False)`` on ``.pth`` members, so a shard from an untrusted source can
run arbitrary code the moment a pipeline decodes it (only ``WDS_SECURE=1`` or an explicit decoder list avoids
it). :func:`safe_decode` is a drop-in replacement:

==============================================  =============================================================
member extension (last dot-component)           result
==============================================  =============================================================
images (webdataset's ``IMAGE_EXTENSIONS``)      webdataset's ``ImageHandler(image)`` (``image=None``: bytes)
``npy``                                         ``numpy.ndarray`` (``allow_pickle=False``)
``npz``                                         ``dict`` of arrays (``allow_pickle=False``)
``json`` ``jsn``                                ``json.loads``
``txt`` ``text`` ``transcript``                 ``str`` (UTF-8)
``cls`` ``cls2`` ``index`` ``inx`` ``id``       ``int``
``pth`` ``pt``                                  ``torch.load(weights_only=True, map_location="cpu")``
``ten`` ``tb``                                  webdataset's tenbin (no pickle inside)
``pyd`` ``pickle`` ``pkl``                      **refused** (:class:`UnsafeMemberError`)
``*.gz``                                        gunzipped (like webdataset's ``gzfilter``, but capped), then
                                                decoded as above (``x.pyd.gz`` is still a pickle)
anything else                                   left as ``bytes``
==============================================  =============================================================

An object ``.npy``/``.npz`` array (a pickle inside numpy) and a ``.pth`` file that needs globals outside
``torch.load``'s ``weights_only`` allow-list are refused with :class:`UnsafeMemberError` too. A refusal is
classified by what was blocked, not by the words of an error: the object dtype is read from the array headers
before anything is loaded, and when ``torch.load(weights_only=True)`` fails, the globals the payload names are
listed by a static scan of its pickle opcodes (nothing is unpickled): one outside the allow-list makes the member
unsafe, none makes it corrupt (:class:`MemberDecodeError`). Every refusal names the member, the sample's
``__key__`` and ``__url__`` and says how to opt in: ``allow_unsafe=True`` (only for data you produced yourself:
it runs ``pickle.loads`` / ``torch.load(weights_only=False)``).

**Size caps.** A member is refused with :class:`MemberTooLargeError` (a :class:`SizeLimitError`) before its
decoded form is held in memory when it would exceed ``max_member_bytes`` (default
:data:`DEFAULT_MAX_MEMBER_BYTES`, 256 MiB): a ``.gz`` member is inflated in 1 MiB steps and stopped at the cap,
the zip entries of ``.npz`` and ``.pth`` members are checked against their directory (and only stored or
deflated entries are read), an image against its pixel count (width x height x channels x bytes per channel)
read from its header. Inflating more than ``max_ratio`` (default :data:`DEFAULT_MAX_RATIO`) bytes per compressed
byte is refused too once the output passes :data:`RATIO_FLOOR` (16 MiB): the signature of a decompression bomb.
``None`` lifts a cap. The tar reader (:mod:`~torch_pretrain_update.data.shards`) applies the same caps to the
members and the compressed stream of a shard.

Three ways to use it:

- ``wds.WebDataset(urls).map(safe_decode())``: sample-level decoder; errors name ``__key__``/``__url__``.
- ``wds.WebDataset(urls).compose(safe_decode(handler=wds.warn_and_continue))`` or inside ``wds.DataPipeline``:
  called on an *iterator*, the decoder is a stage that applies ``handler`` to bad samples and counts the ones it
  skips in :attr:`SafeDecoder.stats` (never a silent loss). In a ``wds.DataPipeline``, read the shards with
  :func:`~torch_pretrain_update.data.shards.strict_tarfile_to_samples` rather than ``wds.tarfile_to_samples``, which
  silently loses the rest of a shard at a corrupt header or a truncation at a header boundary.
- ``wds.WebDataset(urls).decode(safe_handler())``: the member-level ``(key, data)`` handler webdataset's
  ``Decoder`` expects. It returns a value (``bytes`` for unknown extensions) for every member, so webdataset's
  default (unsafe) post-handlers never see a member. webdataset wraps errors in its ``DecodingError`` (empty
  message, ``__key__``/``__url__`` as attributes, ours as ``__cause__``), so prefer ``.map(safe_decode())``.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import pickle
import pickletools
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from webdataset import autodecode
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_bool, check_float, check_int

__all__ = [
    "safe_decode",
    "safe_handler",
    "SafeDecoder",
    "UnsafeMemberError",
    "MemberDecodeError",
    "MemberTooLargeError",
    "SizeLimitError",
    "UNSAFE_EXTENSIONS",
    "DEFAULT_MAX_MEMBER_BYTES",
    "DEFAULT_MAX_RATIO",
    "RATIO_FLOOR",
]

#: extensions whose content is a pickle: refused unless ``allow_unsafe=True``.
UNSAFE_EXTENSIONS = ("pyd", "pickle", "pkl")

#: default ``max_member_bytes``: the largest member, stored or decompressed, that a reader holds in memory.
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
#: default ``max_ratio``: decompressed bytes per compressed byte. Real data stays far below it (a .tar.gz of tiny
#: samples, mostly tar padding, compresses ~100x with gzip and ~300x with bz2); zeros reach 1028x with gzip and
#: 650,000x with bz2.
DEFAULT_MAX_RATIO = 1000.0
#: decompressed sizes up to this are never refused for their ratio (small regular payloads compress well).
RATIO_FLOOR = 16 * 2**20
#: inflate in steps of this size, so that a cap stops a bomb within one step
_STEP = 2**20

_TEXT = ("txt", "text", "transcript")
_INTS = ("cls", "cls2", "index", "inx", "id")
_JSON = ("json", "jsn")
_TORCH = ("pth", "pt")
_TENBIN = ("ten", "tb")
_IMAGE_SPECS = tuple(autodecode.imagespecs)
_OPT_IN = "pass allow_unsafe=True to safe_decode()/safe_handler() only if you trust whoever wrote the shard"


def _where(member: str, key: Any = None, url: Any = None) -> str:
    where = f"member {member!r}"
    if key is not None:
        where += f" of sample __key__={key!r}"
    if url is not None:
        where += f" (__url__={url!r})"
    return where


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


class SizeLimitError(ValueError):
    """Base of the refusals for size: a member larger than ``max_member_bytes``, or a compressed payload that
    inflates more than ``max_ratio`` times. ``limit`` is the cap that was hit (bytes, or the ratio)."""

    limit: float


class MemberTooLargeError(MemberDecodeError, SizeLimitError):
    """A member whose decoded form would exceed ``max_member_bytes`` or inflate more than ``max_ratio`` times;
    refused before that memory is spent. ``reason`` says what and ``limit`` which cap."""

    def __init__(self, message: str, *, member: str, key: Any = None, url: Any = None, reason: str = "",
                 limit: float = 0) -> None:
        super().__init__(message, member=member, key=key, url=url)
        self.reason = reason
        self.limit = limit


def check_limits(max_member_bytes: Optional[int], max_ratio: Optional[float]) -> tuple[Optional[int], Optional[float]]:
    """Validate ``max_member_bytes`` (None or an int >= 1) and ``max_ratio`` (None or a finite float >= 1)."""
    if max_member_bytes is not None:
        max_member_bytes = check_int(max_member_bytes, "max_member_bytes", min_value=1)
    if max_ratio is not None:
        max_ratio = check_float(max_ratio, "max_ratio", low=1.0)
    return max_member_bytes, max_ratio


def _output_cap(max_member_bytes: Optional[int], max_ratio: Optional[float],
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


def _read_capped(f: Any, cap: float) -> Optional[bytes]:
    """Read ``f`` to its end in steps of 1 MiB; ``None`` as soon as more than ``cap`` bytes came out."""
    chunks, n = [], 0
    while True:
        chunk = f.read(int(min(_STEP, cap - n + 1)))
        if not chunk:
            return b"".join(chunks)
        n += len(chunk)
        if n > cap:
            return None
        chunks.append(chunk)


def _pickle_globals(data: bytes) -> set[str]:
    """The globals a pickle names (``module.name``), found by reading its opcodes with ``pickletools``: nothing is
    unpickled. Reads consecutive pickles (torch's legacy format writes several) until the data stops parsing.
    A ``STACK_GLOBAL`` whose operands are not plain strings pushed just before gives ``"<computed global>"``."""
    found: set[str] = set()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        pushed: list[Optional[str]] = []  # what each op pushed (strings only; None for anything else)
        memo: dict[Any, Optional[str]] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.add(str(arg).replace(" ", "."))
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and pushed[-1] is not None and pushed[-2] is not None:
                        found.add(f"{pushed[-2]}.{pushed[-1]}")
                    else:
                        found.add("<computed global>")
                    pushed[-2:] = [None]
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif isinstance(arg, str) and ("UNICODE" in name or name.endswith("STRING")):
                    pushed.append(str(arg))
                elif op.stack_after:
                    pushed.append(None)
        except Exception:  # not (or no longer) a pickle: what was read so far is the answer
            break
    return found


def _torch_allowed_globals() -> frozenset[str]:
    """Globals ``torch.load(weights_only=True)`` accepts (its default allow-list plus ``add_safe_globals``).
    Empty when this torch does not expose them: then every global counts as blocked (over-reporting unsafe)."""
    try:
        from torch import _weights_only_unpickler as wou

        return frozenset(wou._get_allowed_globals()) | frozenset(wou._get_user_allowed_globals())
    except Exception:  # private helpers a torch version may rename
        return frozenset()


def _blocked_globals(data: bytes) -> list[str]:
    """The globals a ``torch.save`` payload (zip, legacy, or a bare pickle) names outside the weights_only
    allow-list, by a static scan of its pickles (the zip's ``data.pkl`` records)."""
    pickles = [data]
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                pickles = [zf.read(i) for i in zf.infolist() if i.filename.endswith(".pkl")]
        except Exception:  # an unreadable zip names no globals
            return []
    found: set[str] = set()
    for p in pickles:
        found |= _pickle_globals(p)
    return sorted(found - _torch_allowed_globals())


def _weights_only_detail(exn: BaseException) -> str:
    """The specific line of torch's page-long weights_only error, for the message only (never to classify)."""
    lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    if specific:
        return specific[0].removeprefix("WeightsUnpickler error:").strip() or specific[0]
    return lines[0] if lines else type(exn).__name__


def _extension(member: str) -> str:
    return member.rsplit(".", 1)[-1].lower()


def _npy_header(data: bytes) -> Optional[tuple[tuple[int, ...], bool, np.dtype, int]]:
    """``(shape, fortran_order, dtype, data_offset)`` of an ``.npy`` payload, read from its header only (nothing
    unpickled); ``None`` when the header is unreadable (``np.load`` then reports the error)."""
    from numpy.lib import format as npformat

    try:
        stream = io.BytesIO(data)
        version = npformat.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = npformat.read_array_header_2_0(stream)
    except Exception:  # not a readable header: not an array we can identify
        return None
    return shape, fortran, dtype, stream.tell()


def _load_plain_npy(data: bytes, header: tuple[tuple[int, ...], bool, np.dtype, int]) -> Optional[np.ndarray]:
    """Load a non-object ``.npy`` from its already-parsed header: one header parse per member instead of the two
    that a header check followed by ``np.load`` costs (hand-written for speed on the streaming hot path). Returns
    ``None`` when the payload is shorter than the header says, so that ``np.load`` raises its own error."""
    shape, fortran, dtype, offset = header
    count = 1
    for dim in shape:
        count *= dim
    if len(data) - offset < count * dtype.itemsize:
        return None
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class _MemberDecoder:
    """Decode one member from its name and bytes. Raises :class:`MemberDecodeError` subclasses."""

    def __init__(self, image: Optional[str], allow_unsafe: bool,
                 max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                 max_ratio: Optional[float] = DEFAULT_MAX_RATIO) -> None:
        if image is not None and (not isinstance(image, str) or image.lower() not in _IMAGE_SPECS):
            allowed = ", ".join(repr(s) for s in _IMAGE_SPECS)
            raise ValueError(f"image must be None or one of {allowed}; got {image!r}")
        self.image = image
        self.allow_unsafe = check_bool(allow_unsafe, "allow_unsafe")
        self.max_member_bytes, self.max_ratio = check_limits(max_member_bytes, max_ratio)
        # Reuse webdataset's image decoder (PIL -> numpy/torch/PIL per spec): nothing unsafe in it.
        self._image = autodecode.ImageHandler(image.lower()) if image is not None else None
        self._image_ext = set(autodecode.IMAGE_EXTENSIONS)

    def _refuse(self, member: str, what: str, key: Any, url: Any) -> UnsafeMemberError:
        return UnsafeMemberError(
            f"refused to decode {_where(member, key, url)}: {what}, and unpickling runs arbitrary code "
            f"from the shard; {_OPT_IN}",
            member=member,
            key=key,
            url=url,
            reason=what,
        )

    def _too_large(self, member: str, what: str, limit: float, name: str, key: Any, url: Any) -> MemberTooLargeError:
        reason = f"{what} ({name})"
        return MemberTooLargeError(
            f"refused to decode {_where(member, key, url)}: {reason}; raise max_member_bytes / max_ratio (None: "
            "no cap) of safe_decode() or the reader only if the data is meant to be that large",
            member=member, key=key, url=url, reason=reason, limit=limit,
        )

    def _corrupt(self, member: str, exn: BaseException, key: Any, url: Any) -> MemberDecodeError:
        return MemberDecodeError(f"could not decode {_where(member, key, url)}: {type(exn).__name__}: {exn}",
                                 member=member, key=key, url=url)

    def _gunzip(self, member: str, data: bytes, key: Any, url: Any) -> bytes:
        """Inflate a gzip member in 1 MiB steps, stopping at the size and ratio caps (``gzip.open().read()``, what
        webdataset's gzfilter does, would hold the whole output first)."""
        cap, limit, name = _output_cap(self.max_member_bytes, self.max_ratio, len(data))
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                out = _read_capped(f, cap)
        except (OSError, EOFError, zlib.error) as exn:
            raise self._corrupt(member, exn, key, url) from exn
        if out is None:
            raise self._too_large(member, f"{len(data)} gzipped bytes inflate to more than {int(cap)} bytes", limit,
                                  name, key, url)
        return out

    def _zip(self, member: str, data: bytes, key: Any, url: Any) -> zipfile.ZipFile:
        """Open a zip member (``.npz``, ``.pth``) after checking its directory: stored or deflated entries only
        (zipfile inflates the others without a bound), announcing no more than the caps allow in total. zipfile
        never returns more bytes than an entry announces, so the check bounds what is read."""
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exn:
            raise self._corrupt(member, exn, key, url) from exn
        infos = zf.infolist()
        odd = [i.filename for i in infos if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)]
        if odd:
            zf.close()
            raise MemberDecodeError(f"could not decode {_where(member, key, url)}: zip entries {odd[:3]} use a "
                                    "compression other than stored or deflated", member=member, key=key, url=url)
        total = sum(i.file_size for i in infos)
        cap, limit, name = _output_cap(self.max_member_bytes, self.max_ratio, len(data))
        if total > cap:
            zf.close()
            raise self._too_large(member, f"its zip entries announce {total} bytes from {len(data)}, more than "
                                          f"{int(cap)}", limit, name, key, url)
        return zf

    def _check_image(self, member: str, data: bytes, key: Any, url: Any) -> None:
        """Refuse an image whose decoded array would exceed ``max_member_bytes``, from its header alone."""
        if self.max_member_bytes is None:
            return
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                bands = len(im.getbands())
        except Exception:  # not an image PIL can identify: the decoder reports it
            return
        spec = self.image.lower() if self.image is not None else "pil"
        channels = max(bands, 1 if "l" in spec.replace("pil", "") else 4 if "a" in spec else 3)
        itemsize = 1 if spec.endswith("8") or spec.startswith("pil") else 4
        need = width * height * channels * itemsize
        if need > self.max_member_bytes:
            raise self._too_large(member, f"a {width}x{height} image decodes to {need} bytes", self.max_member_bytes,
                                  f"max_member_bytes={self.max_member_bytes}", key, url)

    def decode(
        self, member: str, data: bytes, key: Any = None, url: Any = None, shown: Optional[str] = None
    ) -> Any:
        """Decode ``data`` by the extension of ``member``; errors name ``shown`` (default ``member``)."""
        shown = member if shown is None else shown
        ext = _extension(member)
        if ext == "gz":
            # gunzip, then decode the inner name (x.pyd.gz is still a pickle).
            inner = ("." + member)[:-3].lstrip(".")
            return self.decode(inner, self._gunzip(shown, data, key, url), key, url, shown)
        try:
            return self._decode(shown, ext, data, key, url)
        except MemberDecodeError:
            raise
        except Exception as exn:
            raise self._corrupt(shown, exn, key, url) from exn

    def screen(self, member: str, data: bytes, key: Any = None, url: Any = None) -> None:
        """Raise what :meth:`decode` would raise for safety or size (:class:`UnsafeMemberError`,
        :class:`MemberTooLargeError`) without decoding: ``.gz`` layers are inflated (capped), array and image
        headers read, ``.pth`` pickles scanned. Corrupt data passes (only decoding finds it)."""
        shown = member
        ext = _extension(member)
        while ext == "gz":
            try:
                data = self._gunzip(shown, data, key, url)
            except MemberTooLargeError:
                raise
            except MemberDecodeError:
                return
            member = ("." + member)[:-3].lstrip(".")
            ext = _extension(member)
        if self.allow_unsafe:
            return
        if ext in UNSAFE_EXTENSIONS:
            raise self._refuse(shown, f"a .{ext} member is a Python pickle", key, url)
        if ext == "npy":
            header = _npy_header(data)
            if header is not None and header[2].hasobject:
                raise self._refuse(shown, "the .npy array has an object dtype (a pickle inside)", key, url)
        elif ext == "npz":
            try:
                with self._zip(shown, data, key, url) as zf:
                    for info in zf.infolist():
                        header = _npy_header(zf.read(info))
                        if header is not None and header[2].hasobject:
                            raise self._refuse(shown, f"array {info.filename.removesuffix('.npy')!r} in the .npz has "
                                                      "an object dtype (a pickle inside)", key, url)
            except (UnsafeMemberError, MemberTooLargeError):
                raise
            except Exception:  # corrupt: only decoding reports it
                return
        elif ext in _TORCH:
            if data[:4] == b"PK\x03\x04":
                try:
                    self._zip(shown, data, key, url).close()
                except MemberTooLargeError:
                    raise
                except MemberDecodeError:
                    return
            blocked = _blocked_globals(data)
            if blocked:
                raise self._refuse(shown, _blocked_what(ext, blocked), key, url)
        elif self._image is not None and ext in self._image_ext:
            self._check_image(shown, data, key, url)

    def _npy(self, member: str, data: bytes, key: Any, url: Any, what: str = "the .npy array") -> np.ndarray:
        # Hand-written (webdataset's npy_loads has no allow_pickle switch): refuse object arrays by header so
        # that the error is specific, then load with allow_pickle=False as a second line of defence.
        header = _npy_header(data)
        if header is not None and header[2].hasobject:
            if not self.allow_unsafe:
                raise self._refuse(member, f"{what} has an object dtype (a pickle inside)", key, url)
            return np.load(io.BytesIO(data), allow_pickle=True)
        if header is not None:
            array = _load_plain_npy(data, header)
            if array is not None:
                return array
            # np.load would allocate the shape the header announces before finding the data short
            raise MemberDecodeError(
                f"could not decode {_where(member, key, url)}: {what} is truncated (its header announces shape "
                f"{header[0]} of {header[2]}, {len(data) - header[3]} bytes of data follow)",
                member=member, key=key, url=url)
        return np.load(io.BytesIO(data), allow_pickle=False)

    def _decode(self, member: str, ext: str, data: bytes, key: Any, url: Any) -> Any:
        if ext in UNSAFE_EXTENSIONS:
            if not self.allow_unsafe:
                raise self._refuse(member, f"a .{ext} member is a Python pickle", key, url)
            return pickle.loads(data)
        if ext in _TEXT:
            return data.decode("utf-8")
        if ext in _INTS:
            return int(data)
        if ext in _JSON:
            return json.loads(data)
        if ext == "npy":
            return self._npy(member, data, key, url)
        if ext == "npz":
            # Read entry by entry (np.load's NpzFile would trust each entry's header for the allocation).
            out = {}
            with self._zip(member, data, key, url) as zf:
                for info in zf.infolist():
                    name = info.filename.removesuffix(".npy")
                    raw = zf.read(info)
                    if raw.startswith(b"\x93NUMPY"):
                        out[name] = self._npy(member, raw, key, url, f"array {name!r} in the .npz")
                    else:  # what np.load returns for an entry that is not an array
                        out[name] = raw
            return out
        if ext in _TORCH:
            # Hand-written: webdataset's torch_loads uses weights_only=False unless an env variable is set.
            if data[:4] == b"PK\x03\x04":  # torch.save's zip: refuse entries that would inflate past the caps
                self._zip(member, data, key, url).close()
            stream = io.BytesIO(data)
            if self.allow_unsafe:
                return torch.load(stream, weights_only=False, map_location="cpu")
            try:
                return torch.load(stream, weights_only=True, map_location="cpu")
            except Exception as exn:
                # Classify by what the payload asks for, not by torch's wording (which changes between versions).
                blocked = _blocked_globals(data)
                if blocked:
                    raise self._refuse(member, _blocked_what(ext, blocked), key, url) from exn
                raise MemberDecodeError(
                    f"could not decode {_where(member, key, url)}: torch.load(weights_only=True) failed "
                    f"({_weights_only_detail(exn)}); the file is corrupt (it names no global outside the "
                    "weights_only allow-list)",
                    member=member,
                    key=key,
                    url=url,
                ) from exn
        if ext in _TENBIN:
            return autodecode.tenbin_loads(data)
        if self._image is not None and ext in self._image_ext:
            self._check_image(member, data, key, url)
            return self._image("." + member, data)
        return data


def _blocked_what(ext: str, blocked: list[str]) -> str:
    more = f" and {len(blocked) - 5} more" if len(blocked) > 5 else ""
    return (f"the .{ext} payload calls globals outside torch.load's weights_only allow-list "
            f"({', '.join(blocked[:5])}{more})")


def safe_handler(
    image: Optional[str] = None,
    *,
    allow_unsafe: bool = False,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: Optional[float] = DEFAULT_MAX_RATIO,
) -> Callable[[str, bytes], Any]:
    """A member-level ``(key, data) -> value`` handler for ``wds.WebDataset(...).decode(safe_handler())``.

    Args:
        image: webdataset image spec (``"pil"``, ``"rgb8"``, ``"torchrgb8"``, ...; see
            ``webdataset.autodecode.imagespecs``) or None to leave images as bytes.
        allow_unsafe: unpickle ``.pyd``/``.pickle``/``.pkl``, object ``.npy``/``.npz`` and full ``.pth``
            (runs code from the shard; only for trusted data).
        max_member_bytes: the largest decoded member (see the module docstring); None: no cap.
        max_ratio: the most decompressed bytes per compressed byte past 16 MiB; None: no cap.

    It returns a value for every member (``bytes`` for unknown extensions), so webdataset's default (unsafe)
    post-handlers are never reached. Refusals raise :class:`UnsafeMemberError`, which webdataset wraps in its
    ``DecodingError`` (our error is its ``__cause__``).

    Example::

        >>> ds = wds.WebDataset(urls, shardshuffle=False).decode(safe_handler("torchrgb8"))
    """
    dec = _MemberDecoder(image, allow_unsafe, max_member_bytes, max_ratio)

    def handler(key: str, data: bytes) -> Any:
        return dec.decode(key.lstrip("."), data)

    return handler


class SafeDecoder:
    """Decode whole samples safely; usable as ``.map(decoder)`` (one sample) or as a stage (an iterator).

    Args:
        image: webdataset image spec (default ``"torchrgb8"``: uint8 CHW tensor) or None to keep image bytes.
        allow_unsafe: opt in to unpickling (see the module docstring). Default False.
        only: decode only these member names (others are passed through unchanged).
        partial: pass through values that are not ``bytes`` (already decoded) instead of raising.
        handler: webdataset-style exception handler used when the decoder is run as a stage over an iterator
            (``reraise_exception`` by default; ``warn_and_continue`` / ``ignore_and_continue`` skip the sample
            and count it in :attr:`stats`). Called on a single sample, the decoder always raises.
        max_member_bytes: refuse a member whose decoded form would exceed this many bytes
            (:class:`MemberTooLargeError`, before the memory is spent; default 256 MiB); None: no cap.
        max_ratio: refuse a compressed member (``.gz``, zip entries) that inflates more than this many times
            once past 16 MiB (default 1000); None: no cap.

    Attributes:
        stats: ``{"seen": n, "decoded": n, "skipped": n, "unsafe": n, "oversized": n}`` (``unsafe`` counts
            skipped samples whose error was a refusal to unpickle, ``oversized`` those refused for a size cap).

    Example::

        >>> ds = wds.WebDataset(urls, shardshuffle=False).map(safe_decode("torchrgb8"))
        >>> dec = safe_decode(handler=wds.ignore_and_continue)
        >>> src = strict_tarfile_to_samples(wds.ignore_and_continue, manifest=manifest)  # shards.py
        >>> ds = wds.DataPipeline(wds.SimpleShardList(urls), src, dec)
        >>> ...; dec.stats["skipped"], src.stats["lost_samples"]
    """

    def __init__(
        self,
        image: Optional[str] = "torchrgb8",
        *,
        allow_unsafe: bool = False,
        only: Optional[Iterable[str]] = None,
        partial: bool = False,
        handler: Callable[[BaseException], Any] = reraise_exception,
        max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
        max_ratio: Optional[float] = DEFAULT_MAX_RATIO,
    ) -> None:
        self._member = _MemberDecoder(image, allow_unsafe, max_member_bytes, max_ratio)
        if isinstance(only, str):
            only = only.split()
        self.only = None if only is None else frozenset(only)
        self.partial = check_bool(partial, "partial")
        if not callable(handler):
            raise TypeError(f"handler must be callable; got {handler!r}")
        self.handler = handler
        self.stats: dict[str, int] = {"seen": 0, "decoded": 0, "skipped": 0, "unsafe": 0, "oversized": 0}

    @property
    def allow_unsafe(self) -> bool:
        return self._member.allow_unsafe

    def decode_sample(self, sample: dict) -> dict:
        """Decode one sample dict; raises :class:`MemberDecodeError` / :class:`UnsafeMemberError`."""
        if not isinstance(sample, dict):
            raise TypeError(f"sample must be a dict (webdataset convention); got {type(sample).__name__}")
        key, url = sample.get("__key__"), sample.get("__url__")
        out = {}
        for name, value in sample.items():
            if name.startswith("__"):
                # metadata (__key__, __url__, __local_path__): bytes -> str as webdataset does.
                out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                continue
            if self.only is not None and name not in self.only:
                out[name] = value
                continue
            if not isinstance(value, (bytes, bytearray, memoryview)):
                if self.partial:
                    out[name] = value
                    continue
                raise MemberDecodeError(
                    f"could not decode {_where(name, key, url)}: expected bytes, got {type(value).__name__} "
                    "(already decoded? pass partial=True)",
                    member=name,
                    key=key,
                    url=url,
                )
            out[name] = self._member.decode(name, bytes(value), key, url)
        return out

    def _stage(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            self.stats["seen"] += 1
            try:
                out = self.decode_sample(sample)
            except Exception as exn:
                keep_going = self.handler(exn)
                self.stats["skipped"] += 1  # with ignore_and_stop this sample is lost too: count it
                if isinstance(exn, UnsafeMemberError):
                    self.stats["unsafe"] += 1
                elif isinstance(exn, SizeLimitError):
                    self.stats["oversized"] += 1
                if not keep_going:
                    break
                continue
            self.stats["decoded"] += 1
            yield out

    def __call__(self, data: Union[dict, Iterable[dict]]) -> Any:
        """A dict is decoded and returned; an iterator of dicts gives a generator (a pipeline stage)."""
        if isinstance(data, dict):
            return self.decode_sample(data)
        return self._stage(data)

    def __repr__(self) -> str:
        return (f"SafeDecoder(image={self._member.image!r}, allow_unsafe={self.allow_unsafe}, "
                f"max_member_bytes={self._member.max_member_bytes}, max_ratio={self._member.max_ratio})")


def safe_decode(
    image: Optional[str] = "torchrgb8",
    *,
    allow_unsafe: bool = False,
    only: Optional[Iterable[str]] = None,
    partial: bool = False,
    handler: Callable[[BaseException], Any] = reraise_exception,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: Optional[float] = DEFAULT_MAX_RATIO,
) -> SafeDecoder:
    """Build a :class:`SafeDecoder` (see its docstring and the module docstring for the decoding table).

    Example::

        >>> ds = wds.WebDataset(urls, shardshuffle=False).map(safe_decode())
        >>> next(iter(ds))["cls"]
        3
    """
    return SafeDecoder(image, allow_unsafe=allow_unsafe, only=only, partial=partial, handler=handler,
                       max_member_bytes=max_member_bytes, max_ratio=max_ratio)
