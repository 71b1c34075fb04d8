"""The pipeline stage :func:`strict_tarfile_to_samples`: webdataset's ``tarfile_to_samples`` with strict reading.

Shard sources (``{"url": ...}`` dicts from ``webdataset.SimpleShardList`` or ``ResampledShards``) in, raw samples
out, read with :func:`~torch_pretrain_update.data.tar_reader.iter_shard_samples`' rules: damage is a
:class:`~torch_pretrain_update.data.errors.DamagedShardError` naming the shard, routed through the handler and
counted in ``stats``, never the silent end of a shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from webdataset.handlers import reraise_exception

from torch_pretrain_update.data.errors import DamagedShardError, MalformedSampleError, SizeLimitError
from torch_pretrain_update.data.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_RATIO, check_limits
from torch_pretrain_update.data.manifest import ShardManifest, as_manifest, local_file_path
from torch_pretrain_update.data.tar_reader import RenameFiles, SelectFiles, shard_samples

__all__ = ["strict_tarfile_to_samples", "StrictTarfileSamples"]

#: messages kept in ``StrictTarfileSamples.stats["events"]``
_MAX_EVENTS = 50


class StrictTarfileSamples:
    """The stage :func:`strict_tarfile_to_samples` returns: shard sources -> raw samples, with ``stats``.

    Attributes:
        handler: the webdataset-style exception handler for damaged shards.
        manifest: the :class:`~torch_pretrain_update.data.manifest.ShardManifest` the shards are checked
            against, or ``None``.
        select_files, rename_files: webdataset's member filters (None: every member, names as stored).
        stats: counts over every pass of this stage: ``shards`` (shards opened), ``samples`` (yielded),
            ``damaged_shards`` (shards the handler skipped, or the one it raised or stopped on),
            ``lost_samples`` (samples of damaged shards never yielded: the malformed samples skipped, plus the
            manifest count minus what was read; without a manifest the loss of a shard that ends early is unknown
            and not counted here), ``malformed_samples`` (samples refused for their member names, see
            :class:`MalformedSampleError`; the shard is read on), ``oversized`` (shards ended by a size cap, see
            :class:`~torch_pretrain_update.data.errors.TarMemberTooLargeError`) and ``events`` (the first 50 error
            messages, each naming its shard). With DataLoader workers each worker counts its own.
    """

    def __init__(self, handler: Callable[[BaseException], Any], manifest: ShardManifest | None,
                 max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
                 max_ratio: float | None = DEFAULT_MAX_RATIO, select_files: SelectFiles = None,
                 rename_files: RenameFiles = None) -> None:
        self.handler = handler
        self.manifest = manifest
        self.max_member_bytes, self.max_ratio = check_limits(max_member_bytes, max_ratio)
        self.select_files, self.rename_files = select_files, rename_files
        self.stats: dict[str, Any] = {"shards": 0, "samples": 0, "damaged_shards": 0, "lost_samples": 0,
                                      "malformed_samples": 0, "oversized": 0, "events": []}

    def _event(self, exc: BaseException) -> None:
        if len(self.stats["events"]) < _MAX_EVENTS:
            self.stats["events"].append(str(exc))

    def _expected(self, url: str) -> int | None:
        if self.manifest is None:
            return None
        info = self.manifest.lookup(url)
        if info is None:
            raise ValueError(f"strict_tarfile_to_samples: shard {url!r} is not listed in the manifest "
                             f"{self.manifest.path!r}")
        return info.count

    def __call__(self, src: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in src:
            if not isinstance(source, Mapping) or not isinstance(source.get("url"), str):
                raise TypeError(f"strict_tarfile_to_samples: each source must be a dict with a str 'url' (as "
                                f"webdataset.SimpleShardList yields); got {source!r}")
            url = source["url"]
            expected = self._expected(url)
            # as webdataset's opener records it for local files, and its cache for the copy it downloaded (read that)
            copy = source.get("local_path")
            local_path = copy if isinstance(copy, str) and copy else local_file_path(url)
            self.stats["shards"] += 1
            n = 0
            damaged = False  # count the shard once, however many of its samples are malformed
            try:
                for sample in shard_samples(url, expected=expected, max_member_bytes=self.max_member_bytes,
                                            max_ratio=self.max_ratio, select_files=self.select_files,
                                            rename_files=self.rename_files, local_copy=local_path):
                    n += 1
                    if isinstance(sample, MalformedSampleError):  # only this sample is refused; read on
                        self.stats["damaged_shards"] += not damaged
                        damaged = True
                        self.stats["malformed_samples"] += 1
                        self.stats["lost_samples"] += 1
                        self._event(sample)
                        if not self.handler(sample):  # raises by default; False stops the stream
                            return
                        continue
                    if len(sample) == 2:  # no member selected: webdataset would not produce this sample
                        continue
                    if local_path is not None:
                        sample["__local_path__"] = local_path
                    self.stats["samples"] += 1
                    yield sample
            except Exception as exc:  # DamagedShardError (TarMemberTooLargeError included)
                if not isinstance(exc, DamagedShardError):
                    cause, exc = exc, DamagedShardError(url, f"{type(exc).__name__}: {exc}")
                    exc.__cause__ = cause
                self.stats["damaged_shards"] += not damaged
                self.stats["lost_samples"] += max(0, expected - n) if expected is not None else 0
                self.stats["oversized"] += isinstance(exc, SizeLimitError)
                self._event(exc)
                if not self.handler(exc):  # raises by default; False stops the stream (webdataset's convention)
                    return

    def __repr__(self) -> str:
        man = None if self.manifest is None else self.manifest.path
        return f"{type(self).__name__}(handler={getattr(self.handler, '__name__', self.handler)}, manifest={man!r})"


def strict_tarfile_to_samples(
    handler: Callable[[BaseException], Any] = reraise_exception,
    select_files: SelectFiles = None,
    rename_files: RenameFiles = None,
    *,
    manifest: str | os.PathLike | ShardManifest | None = None,
    allow_unsafe_urls: bool = False,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    max_ratio: float | None = DEFAULT_MAX_RATIO,
) -> StrictTarfileSamples:
    """A drop-in for ``webdataset.tarfile_to_samples`` that never loses the rest of a shard silently.

    webdataset 1.0.2's reader uses ``tarfile``, which takes a corrupt header, or a file truncated at a header,
    for the end of the archive: the rest of the shard vanishes with no error even under ``reraise_exception``,
    and a skipping handler counts nothing. This stage reads each shard with
    :func:`~torch_pretrain_update.data.tar_reader.iter_shard_samples` (which checks the end-of-archive block)
    and, given a manifest, checks each shard's sample count. Every damaged shard raises a
    :class:`DamagedShardError` naming it through ``handler``, and is counted in ``stats``; so does a member over
    the size caps (:class:`~torch_pretrain_update.data.errors.TarMemberTooLargeError`) and, sample by sample, a
    sample whose member names repeat, use the metadata names or are not UTF-8 (:class:`MalformedSampleError`).
    ``DamagedShardError`` is also a ``tarfile.ReadError``, the error webdataset raises for a truncated shard.

    As webdataset's: the same positional arguments (``handler, select_files, rename_files``), samples with
    ``__key__`` and ``__url__``, and ``__local_path__`` for a shard that is a local file (or whose source names a
    ``local_path``, as webdataset's cache does). Damage inside a member's data ends the shard after the last
    complete sample, which is yielded.

    Args:
        handler: webdataset's convention: ``reraise_exception`` (default) raises; a handler returning True
            (``warn_and_continue``, ``ignore_and_continue``) skips the rest of the damaged shard (just the sample,
            for a :class:`MalformedSampleError`) and goes on; False (``ignore_and_stop``) ends the stream.
            Either way the shard is counted.
        select_files: ``name -> bool``; only members it accepts are read (the others are skipped without reading
            their data). A sample none of whose members is selected is not yielded, but still counts against the
            manifest.
        rename_files: ``name -> new name``, applied to each member name before ``select_files`` and grouping.
        manifest: a manifest path (or :class:`~torch_pretrain_update.data.manifest.ShardManifest`) from
            :func:`~torch_pretrain_update.data.write.write_shards`: adds the per-shard count check (the only
            detector of a well-formed shard that lost whole samples) and the ``lost_samples`` count. Every shard
            read must be listed in it (else ``ValueError``).
        allow_unsafe_urls: passed to :func:`~torch_pretrain_update.data.manifest.read_manifest` when ``manifest``
            is a path (accept urls that are not files inside the manifest's folder: only for a manifest you
            trust).
        max_member_bytes: the largest tar member read (default 256 MiB); None: no cap. See
            :func:`~torch_pretrain_update.data.tar_reader.iter_shard_files`.
        max_ratio: the most a compressed shard may inflate per compressed byte past 16 MiB (default 1000);
            None: no cap.

    Returns:
        a :class:`StrictTarfileSamples` stage: an iterator of ``{"url": ...}`` dicts (what
        ``webdataset.SimpleShardList`` or ``ResampledShards`` yield, split by node or worker as usual) -> raw
        samples, with ``stats`` (see :class:`StrictTarfileSamples`).

    Example::

        >>> source = strict_tarfile_to_samples(wds.warn_and_continue, manifest="/data/train-manifest.json")
        >>> pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, source, safe_decode())
        >>> for sample in pipe: ...
        >>> source.stats["damaged_shards"], source.stats["lost_samples"]
    """
    if not callable(handler):
        raise TypeError(f"handler must be callable (e.g. webdataset.warn_and_continue); got {handler!r}")
    for name, fn in (("select_files", select_files), ("rename_files", rename_files)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be None or a callable taking a member name; got {fn!r}")
    max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
    return StrictTarfileSamples(handler, as_manifest(manifest, allow_unsafe_urls=allow_unsafe_urls),
                                max_member_bytes, max_ratio, select_files, rename_files)
