"""Reading cached teacher outputs (the shards :func:`~torch_pretrain_update.training.teacher_cache.
write_teacher_outputs` writes) and turning them into what the distillation losses take.

Reading never unpickles: :func:`read_teacher_outputs` reads shards strictly
(:func:`~torch_pretrain_update.data.strict_samples.strict_tarfile_to_samples`: damage and, with the manifest, count
mismatches are errors naming the shard) and decodes members with
:func:`~torch_pretrain_update.data.decode.safe_decode` (``.npy`` with ``allow_pickle=False``; pickle members
refused); non-finite stored teacher outputs are errors naming the shard and the key. With a skipping handler each
of these is skipped and counted in the reader's ``stats``.
:func:`teacher_targets` turns a decoded sample, a list of them or a DataLoader batch into what :class:`KDLoss`
takes: a dense tensor or a :class:`SparseTeacher`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import short_repr
from torch_pretrain_update.data.decode import SafeDecoder
from torch_pretrain_update.data.errors import UnsafeMemberError, sample_location
from torch_pretrain_update.data.manifest import ShardManifest, expand_urls, read_manifest
from torch_pretrain_update.data.strict_samples import strict_tarfile_to_samples
from torch_pretrain_update.training.sparse_teacher import SparseTeacher
from torch_pretrain_update.training.teacher_cache import (
    TEACHER_LOGITS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOGPROBS_KEY,
)

__all__ = ["read_teacher_outputs", "teacher_targets", "TeacherOutputReader"]


class TeacherOutputReader:
    """The iterator :func:`read_teacher_outputs` returns: decoded samples, plus ``stats`` (single pass).

    Attributes:
        stats: ``samples`` (yielded), ``skipped`` (every sample not yielded: bad samples the handler skipped plus
            samples lost in damaged shards, as far as the manifest tells), ``bad_samples`` (of which: refused or
            undecodable members, non-finite or inconsistent teacher outputs), ``unsafe`` (refusals to unpickle),
            ``nonfinite`` (non-finite teacher outputs), ``damaged_shards``, ``lost_samples`` and ``events`` (the
            first 50 messages, naming shard and key).
    """

    def __init__(self, urls: list[str], manifest: ShardManifest | None, image: Optional[str],
                 handler: Callable[[BaseException], Any]) -> None:
        self._source = strict_tarfile_to_samples(handler, manifest=manifest)
        self._decoder = SafeDecoder(image)
        self._handler = handler
        self._counts = {"samples": 0, "bad_samples": 0, "unsafe": 0, "nonfinite": 0}
        self._events: list[str] = []
        self._gen = self._run(urls)

    @property
    def stats(self) -> dict[str, Any]:
        src = self._source.stats
        out: dict[str, Any] = dict(self._counts)
        out["damaged_shards"] = src["damaged_shards"]
        out["lost_samples"] = src["lost_samples"]
        out["skipped"] = self._counts["bad_samples"] + src["lost_samples"]
        out["events"] = (list(src["events"]) + self._events)[:50]
        return out

    def __iter__(self) -> TeacherOutputReader:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._gen)

    def _run(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        for raw in self._source({"url": u} for u in urls):
            try:
                sample = self._decoder.decode_sample(raw)
                _check_teacher_members(sample)
            except Exception as exc:
                self._counts["bad_samples"] += 1
                if isinstance(exc, UnsafeMemberError):
                    self._counts["unsafe"] += 1
                if isinstance(exc, _NonFiniteTeacher):
                    self._counts["nonfinite"] += 1
                if len(self._events) < 50:
                    self._events.append(str(exc))
                if self._handler(exc):
                    continue
                return  # ignore_and_stop: the stream ends here (this sample is counted)
            self._counts["samples"] += 1
            yield sample


class _NonFiniteTeacher(ValueError):
    pass


def _check_teacher_members(sample: dict[str, Any]) -> None:
    """The teacher members of a decoded sample: float arrays, finite, top-k values and indices aligned."""
    key, url = sample.get("__key__"), sample.get("__url__")
    where = sample_location(key, url)
    lp, idx = sample.get(TEACHER_TOPK_LOGPROBS_KEY), sample.get(TEACHER_TOPK_INDICES_KEY)
    if (lp is None) != (idx is None):
        have = TEACHER_TOPK_LOGPROBS_KEY if lp is not None else TEACHER_TOPK_INDICES_KEY
        raise ValueError(f"{where}: has {have!r} without its top-k partner member")
    for name in (TEACHER_LOGITS_KEY, TEACHER_TOPK_LOGPROBS_KEY):
        arr = sample.get(name)
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise ValueError(f"{where}: teacher member {name!r} must be a float array; got {short_repr(arr)}")
        finite = np.isfinite(arr)
        if not finite.all():
            bad = arr[~finite].reshape(-1)[0]
            raise _NonFiniteTeacher(f"{where}: teacher member {name!r} holds a non-finite value ({bad})")
    if lp is not None and idx is not None:  # both or neither (checked above)
        if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu" or idx.shape != lp.shape:
            raise ValueError(
                f"{where}: {TEACHER_TOPK_INDICES_KEY!r} must be an integer array shaped like the top-k values "
                f"{lp.shape}; got {short_repr(idx)}"
            )


def read_teacher_outputs(
    source: str | os.PathLike | Sequence[str] | ShardManifest,
    *,
    image: Optional[str] = None,
    handler: Callable[[BaseException], Any] = reraise_exception,
    allow_unsafe_urls: bool = False,
) -> TeacherOutputReader:
    """Read cached teacher shards in order, strictly and without unpickling; yield decoded samples.

    Args:
        source: the manifest returned by :func:`write_teacher_outputs` (a ``*.json`` path or a
            :class:`~torch_pretrain_update.data.manifest.ShardManifest`), whose per-shard sample counts are then
            checked, or shard urls / a brace pattern (no count check).
        image: webdataset image spec for image members (``"torchrgb8"``, ``"pil"``, ...) or None to keep their
            bytes.
        handler: webdataset's convention for damaged shards (:func:`~torch_pretrain_update.data.strict_samples.
            strict_tarfile_to_samples`) and bad samples (a member that is refused or cannot be decoded, a
            non-finite teacher output): ``reraise_exception`` (default) raises, naming the shard and the key; a
            handler returning True (``warn_and_continue``) skips and counts; False stops.
        allow_unsafe_urls: read the manifest with ``read_manifest(..., allow_unsafe_urls=True)`` (urls that are
            not files inside its folder, ``pipe:`` commands included): only for a manifest you trust. By default
            such a manifest is refused with ``ValueError``.

    Returns:
        a :class:`TeacherOutputReader`: an iterator of dicts with ``__key__``, ``__url__`` and every member
        decoded by :func:`~torch_pretrain_update.data.decode.safe_decode` (the teacher members are numpy arrays read
        with ``allow_pickle=False``; a pickle member raises ``UnsafeMemberError`` and is never unpickled), with
        ``stats`` counting what was skipped. Pass the samples (or a collated batch of them) to
        :func:`teacher_targets`.

    Example::

        >>> reader = read_teacher_outputs("/data/kd/teacher-manifest.json")
        >>> for sample in reader:
        ...     teacher = teacher_targets(sample)   # (C,) tensor or SparseTeacher
        >>> reader.stats["skipped"]
        0
    """
    if not callable(handler):
        raise TypeError(f"handler must be callable (e.g. webdataset.warn_and_continue); got {handler!r}")
    if isinstance(source, ShardManifest):
        manifest: ShardManifest | None = source
    elif isinstance(source, (str, os.PathLike)) and (os.fspath(source).endswith(".json") or os.path.isdir(source)):
        manifest = read_manifest(source, allow_unsafe_urls=allow_unsafe_urls)  # a directory: names the file to pass
    else:
        manifest = None
        urls = expand_urls(os.fspath(source) if isinstance(source, os.PathLike) else source)
    if manifest is not None:
        urls = manifest.urls
    return TeacherOutputReader(urls, manifest, image, handler)


def _stack(values: Any, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, np.ndarray):
        return torch.from_numpy(np.array(values) if not values.flags.writeable else values)
    if isinstance(values, (list, tuple)) and values:
        return torch.stack([_stack(v, name) for v in values])
    raise TypeError(f"{name} must be an array, a tensor or a list of them; got {type(values).__name__}")


def teacher_targets(
    batch: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, device: torch.device | str | None = None
) -> Union[torch.Tensor, SparseTeacher]:
    """The teacher targets of a decoded sample, a list of samples, or a collated batch, for :class:`KDLoss`.

    Dense caches give the stored logits as a tensor ((C,), or (B, C) for a batch; float16 by default, which
    ``KDLoss`` accepts next to float32 student logits). Top-k caches give a
    :class:`~torch_pretrain_update.training.distill.SparseTeacher` (int64 indices).

    Example::

        >>> loader = DataLoader(list(read_teacher_outputs(manifest)), batch_size=32)  # default_collate
        >>> for batch in loader:
        ...     loss = kd(student(batch["input.npy"]), teacher_targets(batch), batch["cls"])
    """
    get: Callable[[str], Any]
    if isinstance(batch, Mapping):
        get = batch.get
    elif isinstance(batch, Sequence) and batch and all(isinstance(s, Mapping) for s in batch):
        samples = batch

        def get(name: str) -> Any:
            if all(name in s for s in samples):
                return [s[name] for s in samples]
            return None
    else:
        raise TypeError(
            f"batch must be a sample dict, a list of them or a collated batch dict; got {short_repr(batch)}")
    dense = get(TEACHER_LOGITS_KEY)
    lp, idx = get(TEACHER_TOPK_LOGPROBS_KEY), get(TEACHER_TOPK_INDICES_KEY)
    if dense is not None:
        out = _stack(dense, TEACHER_LOGITS_KEY)
        return out.to(device) if device is not None else out
    if lp is not None and idx is not None:
        sparse = SparseTeacher(_stack(lp, TEACHER_TOPK_LOGPROBS_KEY), _stack(idx, TEACHER_TOPK_INDICES_KEY).long())
        return sparse.to(device) if device is not None else sparse
    raise ValueError(
        f"batch has no teacher outputs: expected {TEACHER_LOGITS_KEY!r}, or {TEACHER_TOPK_LOGPROBS_KEY!r} and "
        f"{TEACHER_TOPK_INDICES_KEY!r} (decoded, e.g. by read_teacher_outputs)"
    )
