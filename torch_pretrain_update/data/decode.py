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
``__key__`` and ``__url__`` and says how to opt in: ``safe_decode(allow_unsafe=True)``, which a stream or a
dataset takes as ``decoder=safe_decode(allow_unsafe=True)`` (only for data you produced yourself: it runs
``pickle.loads`` / ``torch.load(weights_only=False)``).

**Size caps.** A member is refused with :class:`MemberTooLargeError` (a :class:`SizeLimitError`) before its
decoded form is held in memory when it would exceed ``max_member_bytes`` (default
:data:`DEFAULT_MAX_MEMBER_BYTES`, 256 MiB): a ``.gz`` member is inflated in 1 MiB steps and stopped at the cap,
the zip entries of ``.npz`` and ``.pth`` members are checked against their directory (and only stored or
deflated entries are read), an image against its pixel count (width x height x channels x bytes per channel)
read from its header. Inflating more than ``max_ratio`` (default :data:`DEFAULT_MAX_RATIO`) bytes per compressed
byte is refused too once the output passes :data:`RATIO_FLOOR` (16 MiB): the signature of a decompression bomb.
``None`` lifts a cap. The tar reader (:mod:`~torch_pretrain_update.data.tar_reader`) applies the same caps to
the members and the compressed stream of a shard (:mod:`~torch_pretrain_update.data.limits`).

Three ways to use it:

- ``wds.WebDataset(urls).map(safe_decode())``: sample-level decoder; errors name ``__key__``/``__url__``.
- ``wds.WebDataset(urls).compose(safe_decode(handler=wds.warn_and_continue))`` or inside ``wds.DataPipeline``:
  called on an *iterator*, the decoder is a stage that applies ``handler`` to bad samples and counts the ones it
  skips in :attr:`SafeDecoder.stats` (never a silent loss). In a ``wds.DataPipeline``, read the shards with
  :func:`~torch_pretrain_update.data.strict_samples.strict_tarfile_to_samples` rather than
  ``wds.tarfile_to_samples``, which silently loses the rest of a shard at a corrupt header or a truncation at a
  header boundary.
- ``wds.WebDataset(urls).decode(safe_handler())``: the member-level ``(key, data)`` handler webdataset's
  ``Decoder`` expects. It returns a value (``bytes`` for unknown extensions) for every member, so webdataset's
  default (unsafe) post-handlers never see a member. webdataset wraps errors in its ``DecodingError`` (empty
  message, ``__key__``/``__url__`` as attributes, ours as ``__cause__``), so prefer ``.map(safe_decode())``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union

from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_bool
from torch_pretrain_update.data.errors import MemberDecodeError, SizeLimitError, UnsafeMemberError, sample_location
from torch_pretrain_update.data.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_RATIO
from torch_pretrain_update.data.member_decoder import MemberDecoder

__all__ = ["safe_decode", "safe_handler", "SafeDecoder"]


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
    dec = MemberDecoder(image, allow_unsafe, max_member_bytes, max_ratio)

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
        >>> src = strict_tarfile_to_samples(wds.ignore_and_continue, manifest=manifest)  # strict_samples.py
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
        self._member = MemberDecoder(image, allow_unsafe, max_member_bytes, max_ratio)
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
                    f"could not decode {sample_location(key, url, member=name)}: expected bytes, got "
                    f"{type(value).__name__} (already decoded? pass partial=True)",
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
