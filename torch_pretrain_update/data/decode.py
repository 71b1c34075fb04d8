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
``*.gz``                                        gunzipped (webdataset's ``gzfilter``), then decoded as above
anything else                                   left as ``bytes``
==============================================  =============================================================

An object ``.npy``/``.npz`` array (a pickle inside numpy) and a ``.pth`` file that needs globals outside
``torch.load``'s ``weights_only`` allow-list are refused with :class:`UnsafeMemberError` too. Every refusal
names the member, the sample's ``__key__`` and ``__url__`` and says how to opt in: ``allow_unsafe=True``
(only for data you produced yourself: it runs ``pickle.loads`` / ``torch.load(weights_only=False)``).

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

import io
import json
import pickle
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from webdataset import autodecode
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_bool

__all__ = [
    "safe_decode",
    "safe_handler",
    "SafeDecoder",
    "UnsafeMemberError",
    "MemberDecodeError",
    "UNSAFE_EXTENSIONS",
]

#: extensions whose content is a pickle: refused unless ``allow_unsafe=True``.
UNSAFE_EXTENSIONS = ("pyd", "pickle", "pkl")

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
    """A member would be unpickled (arbitrary code execution) and ``allow_unsafe`` is False."""


def _weights_only_detail(exn: BaseException) -> str:
    """The one specific line of torch's page-long weights_only error (after "WeightsUnpickler error:")."""
    text = str(exn)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1]
        for line in rest.splitlines():
            if line.strip():
                return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(exn).__name__


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

    def __init__(self, image: Optional[str], allow_unsafe: bool) -> None:
        if image is not None and (not isinstance(image, str) or image.lower() not in _IMAGE_SPECS):
            allowed = ", ".join(repr(s) for s in _IMAGE_SPECS)
            raise ValueError(f"image must be None or one of {allowed}; got {image!r}")
        self.image = image
        self.allow_unsafe = check_bool(allow_unsafe, "allow_unsafe")
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
        )

    def decode(
        self, member: str, data: bytes, key: Any = None, url: Any = None, shown: Optional[str] = None
    ) -> Any:
        """Decode ``data`` by the extension of ``member``; errors name ``shown`` (default ``member``)."""
        shown = member if shown is None else shown
        ext = _extension(member)
        if ext == "gz":
            # webdataset's gzfilter: gunzip, then decode the inner name (x.pyd.gz is still a pickle).
            try:
                cont = autodecode.gzfilter("." + member, data)
            except Exception as exn:
                raise MemberDecodeError(
                    f"could not decode {_where(shown, key, url)}: {type(exn).__name__}: {exn}",
                    member=shown,
                    key=key,
                    url=url,
                ) from exn
            return self.decode(cont.key.lstrip("."), cont.data, key, url, shown)
        try:
            return self._decode(shown, ext, data, key, url)
        except MemberDecodeError:
            raise
        except Exception as exn:
            raise MemberDecodeError(
                f"could not decode {_where(shown, key, url)}: {type(exn).__name__}: {exn}",
                member=shown,
                key=key,
                url=url,
            ) from exn

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
            # Hand-written (webdataset's npy_loads has no allow_pickle switch): refuse object arrays by header
            # so that the error is specific, then load with allow_pickle=False as a second line of defence.
            header = _npy_header(data)
            if header is not None and header[2].hasobject:
                if not self.allow_unsafe:
                    raise self._refuse(
                        member, "the .npy array has an object dtype (a pickle inside)", key, url
                    )
                return np.load(io.BytesIO(data), allow_pickle=True)
            if header is not None:
                array = _load_plain_npy(data, header)
                if array is not None:
                    return array
            return np.load(io.BytesIO(data), allow_pickle=False)
        if ext == "npz":
            with np.load(io.BytesIO(data), allow_pickle=self.allow_unsafe) as npz:
                out = {}
                for name in npz.files:
                    try:
                        out[name] = npz[name]
                    except ValueError as exn:
                        if "allow_pickle" in str(exn):
                            raise self._refuse(
                                member,
                                f"array {name!r} in the .npz has an object dtype (a pickle inside)",
                                key,
                                url,
                            ) from exn
                        raise
                return out
        if ext in _TORCH:
            # Hand-written: webdataset's torch_loads uses weights_only=False unless an env variable is set.
            stream = io.BytesIO(data)
            if self.allow_unsafe:
                return torch.load(stream, weights_only=False, map_location="cpu")
            try:
                return torch.load(stream, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as exn:
                detail = _weights_only_detail(exn)
                if "global" in detail.lower():  # the payload names code to import/call: a refusal
                    raise self._refuse(
                        member,
                        f"the .{ext} payload needs globals outside torch.load's weights_only allow-list ({detail})",
                        key,
                        url,
                    ) from exn
                raise MemberDecodeError(
                    f"could not decode {_where(member, key, url)}: torch.load(weights_only=True) failed "
                    f"({detail}); the file is corrupt or is a full pickle. If you trust it, allow_unsafe=True "
                    "loads it with weights_only=False",
                    member=member,
                    key=key,
                    url=url,
                ) from exn
        if ext in _TENBIN:
            return autodecode.tenbin_loads(data)
        if self._image is not None and ext in self._image_ext:
            return self._image("." + member, data)
        return data


def safe_handler(image: Optional[str] = None, *, allow_unsafe: bool = False) -> Callable[[str, bytes], Any]:
    """A member-level ``(key, data) -> value`` handler for ``wds.WebDataset(...).decode(safe_handler())``.

    Args:
        image: webdataset image spec (``"pil"``, ``"rgb8"``, ``"torchrgb8"``, ...; see
            ``webdataset.autodecode.imagespecs``) or None to leave images as bytes.
        allow_unsafe: unpickle ``.pyd``/``.pickle``/``.pkl``, object ``.npy``/``.npz`` and full ``.pth``
            (runs code from the shard; only for trusted data).

    It returns a value for every member (``bytes`` for unknown extensions), so webdataset's default (unsafe)
    post-handlers are never reached. Refusals raise :class:`UnsafeMemberError`, which webdataset wraps in its
    ``DecodingError`` (our error is its ``__cause__``).

    Example::

        >>> ds = wds.WebDataset(urls, shardshuffle=False).decode(safe_handler("torchrgb8"))
    """
    dec = _MemberDecoder(image, allow_unsafe)

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

    Attributes:
        stats: ``{"seen": n, "decoded": n, "skipped": n, "unsafe": n}`` (``unsafe`` counts skipped samples
            whose error was a refusal).

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
    ) -> None:
        self._member = _MemberDecoder(image, allow_unsafe)
        if isinstance(only, str):
            only = only.split()
        self.only = None if only is None else frozenset(only)
        self.partial = check_bool(partial, "partial")
        if not callable(handler):
            raise TypeError(f"handler must be callable; got {handler!r}")
        self.handler = handler
        self.stats: dict[str, int] = {"seen": 0, "decoded": 0, "skipped": 0, "unsafe": 0}

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
                if self.handler(exn):
                    self.stats["skipped"] += 1
                    if isinstance(exn, UnsafeMemberError):
                        self.stats["unsafe"] += 1
                    continue
                self.stats["skipped"] += 1  # ignore_and_stop: this sample is lost too; count it
                break
            self.stats["decoded"] += 1
            yield out

    def __call__(self, data: Union[dict, Iterable[dict]]) -> Any:
        """A dict is decoded and returned; an iterator of dicts gives a generator (a pipeline stage)."""
        if isinstance(data, dict):
            return self.decode_sample(data)
        return self._stage(data)

    def __repr__(self) -> str:
        return f"SafeDecoder(image={self._member.image!r}, allow_unsafe={self.allow_unsafe})"


def safe_decode(
    image: Optional[str] = "torchrgb8",
    *,
    allow_unsafe: bool = False,
    only: Optional[Iterable[str]] = None,
    partial: bool = False,
    handler: Callable[[BaseException], Any] = reraise_exception,
) -> SafeDecoder:
    """Build a :class:`SafeDecoder` (see its docstring and the module docstring for the decoding table).

    Example::

        >>> ds = wds.WebDataset(urls, shardshuffle=False).map(safe_decode())
        >>> next(iter(ds))["cls"]
        3
    """
    return SafeDecoder(image, allow_unsafe=allow_unsafe, only=only, partial=partial, handler=handler)
