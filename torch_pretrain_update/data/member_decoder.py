"""How one WebDataset member is decoded by its extension, without ever unpickling unless asked to.

:class:`MemberDecoder` is the engine behind :func:`~torch_pretrain_update.data.decode.safe_decode` (whose module
docstring has the table of extensions) and the screen :func:`~torch_pretrain_update.data.inspect.inspect_shards`
runs without decoding. Refusals are classified by what was blocked, not by the words of an error: an object dtype
is read from the ``.npy``/``.npz`` array headers before anything is loaded (:func:`npy_header`), and the globals a
``.pth`` payload names are listed by a static scan of its pickle opcodes (nothing is unpickled).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import pickletools
import zipfile
import zlib
from typing import Any, Optional

import numpy as np
import torch
from webdataset import autodecode

from torch_pretrain_update._checks import check_bool
from torch_pretrain_update.data.errors import (
    MemberDecodeError,
    MemberTooLargeError,
    UnsafeMemberError,
    sample_location,
)
from torch_pretrain_update.data.limits import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_RATIO,
    check_limits,
    output_cap,
    read_capped,
)

__all__ = ["UNSAFE_EXTENSIONS"]

#: extensions whose content is a pickle: refused unless ``allow_unsafe=True``.
UNSAFE_EXTENSIONS = ("pyd", "pickle", "pkl")

_TEXT = ("txt", "text", "transcript")
_INTS = ("cls", "cls2", "index", "inx", "id")
_JSON = ("json", "jsn")
_TORCH = ("pth", "pt")
_TENBIN = ("ten", "tb")
_IMAGE_SPECS = tuple(autodecode.imagespecs)
#: how to opt in, said by every refusal: the decoder's own form, the one a stream or dataset takes, and webdataset's
_OPT_IN = ("only if you trust whoever wrote the shard, opt in with safe_decode(allow_unsafe=True) (a stream or "
           "dataset takes decoder=safe_decode(allow_unsafe=True); webdataset's .decode() takes "
           "safe_handler(allow_unsafe=True))")


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


def member_extension(member: str) -> str:
    """A member's type by its last dot-component, in lower case (``a.NPY`` -> ``npy``, ``a.pyd.gz`` -> ``gz``)."""
    return member.rsplit(".", 1)[-1].lower()


def npy_header(data: bytes) -> Optional[tuple[tuple[int, ...], bool, np.dtype, int]]:
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


class MemberDecoder:
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
        where = sample_location(key, url, member=member)
        return UnsafeMemberError(
            f"refused to decode {where}: {what}, and unpickling runs arbitrary code from the shard; {_OPT_IN}",
            member=member,
            key=key,
            url=url,
            reason=what,
        )

    def _too_large(self, member: str, what: str, limit: float, name: str, key: Any, url: Any) -> MemberTooLargeError:
        reason = f"{what} ({name})"
        return MemberTooLargeError(
            f"refused to decode {sample_location(key, url, member=member)}: {reason}; raise max_member_bytes / "
            "max_ratio (None: no cap) of safe_decode() or the reader only if the data is meant to be that large",
            member=member, key=key, url=url, reason=reason, limit=limit,
        )

    def _corrupt(self, member: str, exn: BaseException, key: Any, url: Any) -> MemberDecodeError:
        return MemberDecodeError(
            f"could not decode {sample_location(key, url, member=member)}: {type(exn).__name__}: {exn}",
            member=member, key=key, url=url)

    def _gunzip(self, member: str, data: bytes, key: Any, url: Any) -> bytes:
        """Inflate a gzip member in 1 MiB steps, stopping at the size and ratio caps (``gzip.open().read()``, what
        webdataset's gzfilter does, would hold the whole output first)."""
        cap, limit, name = output_cap(self.max_member_bytes, self.max_ratio, len(data))
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                out = read_capped(f, cap)
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
            raise MemberDecodeError(f"could not decode {sample_location(key, url, member=member)}: zip entries "
                                    f"{odd[:3]} use a compression other than stored or deflated", member=member,
                                    key=key, url=url)
        total = sum(i.file_size for i in infos)
        cap, limit, name = output_cap(self.max_member_bytes, self.max_ratio, len(data))
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
        ext = member_extension(member)
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
        ext = member_extension(member)
        while ext == "gz":
            try:
                data = self._gunzip(shown, data, key, url)
            except MemberTooLargeError:
                raise
            except MemberDecodeError:
                return
            member = ("." + member)[:-3].lstrip(".")
            ext = member_extension(member)
        if self.allow_unsafe:
            return
        if ext in UNSAFE_EXTENSIONS:
            raise self._refuse(shown, f"a .{ext} member is a Python pickle", key, url)
        if ext == "npy":
            header = npy_header(data)
            if header is not None and header[2].hasobject:
                raise self._refuse(shown, "the .npy array has an object dtype (a pickle inside)", key, url)
        elif ext == "npz":
            try:
                with self._zip(shown, data, key, url) as zf:
                    for info in zf.infolist():
                        header = npy_header(zf.read(info))
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
        header = npy_header(data)
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
                f"could not decode {sample_location(key, url, member=member)}: {what} is truncated (its header "
                f"announces shape {header[0]} of {header[2]}, {len(data) - header[3]} bytes of data follow)",
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
            out: dict[str, Any] = {}
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
                    f"could not decode {sample_location(key, url, member=member)}: torch.load(weights_only=True) "
                    f"failed ({_weights_only_detail(exn)}); the file is corrupt (it names no global outside the "
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
