"""The options of :class:`~torch_pretrain_update.data.stream.WeightedWebDataset`, checked once and normalised.

:meth:`StreamConfig.build` turns the stream's arguments into one frozen :class:`StreamConfig`: every check and
every derived value (the shard list, the manifest entries, the known class counts, the split's
:class:`~torch_pretrain_update.data.partition.Layout`) happens there, in the process that builds the stream, so a
bad argument is an error at construction and never inside a DataLoader worker.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from torch_pretrain_update._checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
    check_vector,
    short_repr,
)
from torch_pretrain_update._dist import resolve_replicas
from torch_pretrain_update._state import tensor_digest
from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.limits import check_limits
from torch_pretrain_update.data.manifest import ShardInfo, ShardManifest, as_manifest, expand_urls
from torch_pretrain_update.data.partition import Layout, check_indices, rank_length
from torch_pretrain_update.data.stages import balance_classes, with_class_weights

__all__ = ["StreamConfig"]

Handler = Callable[[BaseException], Any]


@dataclass(frozen=True, eq=False)
class StreamConfig:
    """A stream's options after :meth:`build` checked them (see ``WeightedWebDataset`` for each one).

    Beyond the arguments: ``urls`` expanded, ``infos`` (each shard's manifest entry, or None without a
    manifest), ``counts`` (known class counts: given, or the manifest's histogram over the selected shards),
    ``required_keys`` (with the label key), ``decoder`` (the default one when None was given), ``split``
    resolved from ``"auto"``, ``samples_per_rank`` resolved, ``offsets`` (global index of each shard's first
    sample, with a manifest) and ``layout`` (what the rank x worker split depends on).
    """

    urls: tuple[str, ...]
    infos: tuple[Optional[ShardInfo], ...]
    manifest: Optional[ShardManifest]
    label_key: str
    num_classes: int
    scheme: str
    counts: Optional[tuple[float, ...]]
    momentum: Optional[float]
    weight_key: str
    balance: bool
    balance_target: Any
    shuffle: bool
    shuffle_buffer: int
    seed: int
    handler: Optional[Handler]
    required_keys: tuple[str, ...]
    num_replicas: int
    rank: int
    split: str
    samples_per_rank: Optional[int]
    drop_last: bool
    decoder: Callable[[dict], dict]
    max_member_bytes: Optional[int]
    max_ratio: Optional[float]
    stages: tuple[Callable[..., Any], ...]
    indices: Optional[np.ndarray]
    offsets: Optional[tuple[int, ...]]
    layout: Layout

    @classmethod
    def build(cls, urls: Any, *, label_key: Any, num_classes: Any, scheme: Any, counts: Any, momentum: Any,
              weight_key: Any, balance: Any, balance_target: Any, shuffle: Any, shuffle_buffer: Any, seed: Any,
              handler: Any, required_keys: Any, manifest: Any, rank: Any, num_replicas: Any, split: Any,
              samples_per_rank: Any, drop_last: Any, decoder: Any, allow_unsafe_urls: Any, max_member_bytes: Any,
              max_ratio: Any, stages: Any, indices: Any) -> StreamConfig:
        """Check and normalise the stream's arguments (``TypeError``/``ValueError`` naming the argument)."""
        label_key = check_str(label_key, "label_key")
        num_classes = check_int(num_classes, "num_classes", min_value=1)
        # validated even when unused (known counts without balance=True): a bad value is a mistake either way
        momentum = None if momentum is None else check_float(momentum, "momentum", low=0.0, high=1.0,
                                                                low_inclusive=False)
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be None or callable (e.g. webdataset.warn_and_continue); got {handler!r}")
        required_keys = [required_keys] if isinstance(required_keys, str) else list(required_keys or [])
        for k in required_keys:
            check_str(k, "required_keys")
        num_replicas, rank = resolve_replicas(num_replicas, rank)
        max_member_bytes, max_ratio = check_limits(max_member_bytes, max_ratio)
        if decoder is None:
            decoder = safe_decode(max_member_bytes=max_member_bytes, max_ratio=max_ratio)
        if not callable(decoder):
            raise TypeError(f"decoder must be callable (sample -> sample); got {decoder!r}")
        stages = _check_stages(stages)

        man = as_manifest(manifest, allow_unsafe_urls=check_bool(allow_unsafe_urls, "allow_unsafe_urls"))
        url_list, infos = _shards(urls, man)
        split = check_choice(split, "split", ("auto", "samples", "shards"))
        if split == "auto":
            split = "samples" if man is not None else "shards"
        if split == "samples" and man is None:
            raise ValueError("split='samples' needs per-shard counts: pass manifest=")
        if split == "shards" and len(url_list) < num_replicas:
            raise ValueError(
                f"urls: {len(url_list)} shard(s) for num_replicas={num_replicas} ranks; split='shards' needs at "
                "least one shard per rank (and per DataLoader worker): pass a manifest (split='samples' splits "
                "within shards) or write smaller shards (write_shards(maxcount=...))"
            )
        shard_counts = None if man is None else tuple(i.count for i in infos if i is not None)
        if indices is not None:
            if shard_counts is None:
                raise ValueError("indices needs per-shard counts to find each index's shard: pass manifest=")
            if split != "samples":
                raise ValueError(f"indices are split over ranks like split='samples'; got split={split!r}")
            indices = check_indices(indices, shard_counts)
        drop_last = check_bool(drop_last, "drop_last")
        if samples_per_rank is not None:
            samples_per_rank = check_int(samples_per_rank, "samples_per_rank", min_value=1)
        elif split == "samples" and shard_counts is not None:
            total = len(indices) if indices is not None else sum(shard_counts)
            try:
                samples_per_rank = rank_length(total, num_replicas, drop_last=drop_last)
            except ValueError as exc:
                raise ValueError(f"manifest: {exc}") from None
        if num_replicas > 1 and samples_per_rank is None:
            warnings.warn(
                "WeightedWebDataset: without a manifest or samples_per_rank, ranks may yield different numbers "
                "of samples and DDP can hang at the end of an epoch; pass manifest= or samples_per_rank=",
                stacklevel=4,
            )
        if counts is None and man is not None and man.label_key == label_key:
            counts = _manifest_counts(infos, num_classes)
        if counts is not None:  # 1-D, finite, non-negative, not all zero (the stage checks num_classes entries)
            counts = tuple(check_vector(counts, "counts", allow_all_zero=False).tolist())
        shuffle = check_bool(shuffle, "shuffle")
        seed = check_int(seed, "seed")
        layout = Layout(num_shards=len(url_list), counts=shard_counts, num_replicas=num_replicas, seed=seed,
                        shuffle=shuffle, split=split, length=samples_per_rank, indices=indices)
        offsets = None if shard_counts is None else tuple(layout.starts()[:-1])
        config = cls(
            urls=tuple(url_list), infos=tuple(infos), manifest=man, label_key=label_key, num_classes=num_classes,
            scheme=scheme, counts=counts, momentum=momentum, weight_key=weight_key,
            balance=check_bool(balance, "balance"), balance_target=balance_target, shuffle=shuffle,
            shuffle_buffer=check_int(shuffle_buffer, "shuffle_buffer", min_value=1), seed=seed, handler=handler,
            required_keys=tuple(dict.fromkeys([*required_keys, label_key])), num_replicas=num_replicas,
            rank=rank, split=split, samples_per_rank=samples_per_rank, drop_last=drop_last, decoder=decoder,
            max_member_bytes=max_member_bytes, max_ratio=max_ratio, stages=stages, indices=indices,
            offsets=offsets, layout=layout,
        )
        config.make_stages()  # checks the weighting and balancing options now, not in a worker
        return config

    def make_stages(self) -> list[Any]:
        """The library's own stages, fresh: class weights, then balancing if asked for."""
        stages: list[Any] = [
            with_class_weights(self.label_key, num_classes=self.num_classes, scheme=self.scheme,
                               counts=self.counts, momentum=None if self.counts is not None else self.momentum,
                               weight_key=self.weight_key)
        ]
        if self.balance:
            # Known class counts are the balancer's prior: its running share estimates start at the true shares
            # instead of at the first few samples.
            prior = self.counts if self.counts is not None and self.momentum is None else None
            stages.append(balance_classes(self.label_key, num_classes=self.num_classes, target=self.balance_target,
                                          momentum=self.momentum, seed=self.seed, prior_counts=prior))
        return stages

    def stages_for_epoch(self, epoch: int) -> list[Any]:
        """A fresh copy of the user stages, then the library's own stages, all set to ``epoch``."""
        stages = [*copy.deepcopy(list(self.stages)), *self.make_stages()]
        for s in stages:
            if callable(getattr(s, "set_epoch", None)):
                s.set_epoch(epoch)
        return stages

    def record(self) -> dict[str, Any]:
        """What the stream's output depends on, as plain values, recorded in its state and compared on load.

        ``shards`` hashes each shard's file name, manifest count and SHA-256 (not its folder: a data set that
        moved still resumes; without a manifest only the names are compared). Not the rank nor the number of
        DataLoader workers: the reader's cursor records those. ``indices`` and ``stages`` (the user stages'
        type names) appear only when given, so that a state saved before they existed still loads.
        """
        cached = self.__dict__.get("_record")
        if cached is None:
            names = "\n".join(f"{os.path.basename(u)}\t{None if i is None else i.count}\t"
                              f"{None if i is None else i.sha256}" for u, i in zip(self.urls, self.infos))
            target = None if self.balance_target is None or not self.balance else self.balance_target
            cached = {
                "type": "WeightedWebDataset",
                "shards": tensor_digest(torch.frombuffer(bytearray(names.encode()), dtype=torch.uint8)),
                "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer if self.shuffle else None, "world_size": self.num_replicas,
                "split": self.split, "samples_per_rank": self.samples_per_rank, "label_key": self.label_key,
                "num_classes": self.num_classes, "scheme": self.scheme,
                "counts": None if self.counts is None else tensor_digest(torch.tensor(self.counts,
                                                                                      dtype=torch.float64)),
                "momentum": self.momentum, "balance": self.balance,
                "balance_target": None if target is None else tensor_digest(torch.as_tensor(target,
                                                                                            dtype=torch.float64)),
            }
            if self.indices is not None:
                cached["indices"] = tensor_digest(torch.from_numpy(self.indices))
            if self.stages:
                cached["stages"] = [type(s).__qualname__ for s in self.stages]
            object.__setattr__(self, "_record", cached)
        return dict(cached)


def _check_stages(stages: Any) -> tuple[Callable[..., Any], ...]:
    if stages is None:
        return ()
    if callable(stages) or isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a list of stages (callables from an iterator of samples to an iterator of "
                        f"samples); got {short_repr(stages)}")
    for i, s in enumerate(stages):
        if not callable(s):
            raise TypeError(f"stages[{i}] must be callable (iterator of samples -> iterator of samples); got "
                            f"{short_repr(s)}")
    return tuple(stages)


def _shards(urls: Any, man: Optional[ShardManifest]) -> tuple[list[str], list[Optional[ShardInfo]]]:
    """The shard urls and their manifest entries (None without a manifest)."""
    if urls is None:
        if man is None:
            raise ValueError("urls is None: pass shard urls (or a brace pattern) or a manifest")
        url_list = man.urls
    else:
        url_list = expand_urls(urls)
    infos: list[Optional[ShardInfo]] = [None] * len(url_list)
    if man is not None:
        for i, u in enumerate(url_list):
            info = man.lookup(u)
            if info is None:
                raise ValueError(f"urls: shard {u!r} is not listed in the manifest {man.path!r}")
            infos[i] = info
    return url_list, infos


def _manifest_counts(infos: Sequence[Optional[ShardInfo]], num_classes: int) -> list[int]:
    """The manifest's class histogram summed over the selected shards."""
    total = [0] * num_classes
    for info in infos:
        if info is None:
            continue
        if len(info.class_counts) > num_classes and any(info.class_counts[num_classes:]):
            raise ValueError(f"num_classes={num_classes} but the manifest's shard {info.url!r} has labels >= "
                             f"{num_classes}")
        for c, n in enumerate(info.class_counts[:num_classes]):
            total[c] += n
    return total
