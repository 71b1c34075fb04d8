"""``WeightedWebDataset``: a resumable, rank- and worker-split WebDataset stream with weights and no silent loss.

Pipeline of one reader (a DataLoader worker of one rank)::

    shards (epoch order) -> split -> strict tar reading (shards.iter_shard_samples) -> count check vs manifest
      -> per-shard buffer shuffle -> take this reader's positions -> required keys -> safe decode -> label check
      -> class weights (stages.with_class_weights) -> [stages.balance_classes] -> fixed length per rank

**Splitting.** Every epoch the shard order is ``torch.randperm`` from a fresh generator seeded from
``(seed, epoch)`` (identity with ``shuffle=False``); each shard's samples are shuffled by a buffer shuffle whose
generator is seeded from ``(seed, epoch, shard index)``, so a shard's internal order is a pure function of those
and of its contents. Two split modes:

- ``split="samples"`` (the default when a manifest gives the per-shard counts): the epoch's samples, in that
  order, are numbered ``0..N-1`` and split like ``DistributedSampler`` splits indices: rank ``r`` takes the
  contiguous positions ``[r L, (r + 1) L)`` with ``L = samples_per_rank`` (default ``ceil(N / W)``, padding by
  wrapping around to the start of the epoch; ``drop_last=True``: ``floor(N / W)``, truncating), and the rank's
  range is cut into ``num_workers`` contiguous pieces of ``L // nw`` or ``L // nw + 1`` samples. Every sample is
  yielded exactly once per epoch except the ``W L - N`` (at most ``W - 1`` by default) padding repeats, and every
  rank yields exactly ``L`` samples, so DDP never hangs at the end of an epoch. An explicit ``samples_per_rank``
  larger than ``N / W`` wraps around more (more repeats); a smaller one leaves positions ``>= W L`` of the epoch
  order out (truncation). A shard cut between two readers is opened by both; the second re-reads (without
  decoding) the first one's part to reach its start.
- ``split="shards"`` (the default without a manifest): rank ``r`` takes shards ``r, r + W, ...`` of the epoch
  order and worker ``w`` every ``nw``-th of those. The number of samples per rank is then whatever its shards
  hold, unless ``samples_per_rank`` fixes it (like webdataset's ``with_epoch``): a reader that runs out repeats
  its own stream from the start (counted in ``stats["padded_samples"]``), one with more stops early.

Both modes raise ``ValueError`` when there are fewer shards than ranks x workers.

**Determinism.** For a given ``(seed, epoch, W, rank)`` and without ``balance``, what does *not* depend on the
number of DataLoader workers: the multiset of samples of each rank, each shard's internal order, and the
sequence of samples of the rank in position order (``split="samples"``). What does: which worker yields which
piece, hence the order of the batches the DataLoader interleaves round-robin from its workers. With
``balance=True`` (and with online weights, ``counts`` unknown) the running class estimates are per reader, so
the output also depends on the worker split (it stays deterministic for a given ``num_workers``).

**Resume.** ``state_dict()`` (plain JSON values) records the epoch, the reader's cursor (pass, segment = a range
of one shard, number of outputs of that segment already delivered) and a snapshot of the stateful stages and
``stats`` taken when the segment started. ``load_state_dict`` + ``iter`` re-open the segment's shard, replay it
(reading and decoding, up to one shard's worth) from the snapshot and skip the outputs already delivered, so the
resumed stream equals the unbroken one exactly (no sample lost or duplicated) with ``StatefulDataLoader`` at any
``num_workers`` (which must be the same as when the state was saved). A state of epoch ``e`` that reaches a
dataset already set to a later epoch (``StatefulDataLoader`` hands it over at the next ``iter(loader)``, after the
resumed loop's ``set_epoch(e + 1)``) means "epoch ``e`` is finished", so a checkpoint taken after an epoch's loop
resumes with the next epoch, nothing replayed. The state records what the stream depends on (shards, seed,
shuffle settings, world size, weights and balancing options) and a differently built dataset refuses it.

**No silent loss.** By default (``handler=None``) these raise, naming the shard (and the sample's key and the
member): a shard that cannot be opened, is empty, is truncated (inside a member or at a header boundary), has a
corrupt header (``shards.iter_shard_files`` checks the end-of-archive block, which ``tarfile`` does not), holds
fewer or more samples than its manifest count, or (read to its end) labels whose class histogram differs from its
manifest entry (the known class counts, hence the weights, come from the manifest: a wrong histogram is detected,
but the weights already given are not corrected); a sample missing a ``required_keys`` member or the label, a
label that is not an integer in ``[0, num_classes)``, a member the decoder refuses (pickles) or cannot decode, a
member over the size caps (``max_member_bytes``, ``max_ratio``: refused before its bytes are held; a tar member
ends its shard, a decoded one its sample), a sample whose member names repeat (``a.cls`` and ``a.CLS``), take the
metadata names (``a.__url__``) or are not UTF-8 (that sample only).
With a skipping handler (webdataset's ``warn_and_continue``/``ignore_and_continue``, or any callable returning
True), each is counted in :attr:`WeightedWebDataset.stats` and logged at the end of the reader's epoch (a handler
returning False, like ``ignore_and_stop``, also skips the rest of the current shard range, counting every sample
of it); with ``samples_per_rank`` set or ``split="samples"``, the missing samples are replaced by repeats of the
reader's own stream so that every rank still yields the same number (``stats["padded_samples"]``). Damage met
again while padding is not counted twice; a shard split between two readers that both meet its damage is counted
in ``shard_errors`` by each, while ``missing_samples`` (positions of a reader's own ranges never read) adds up
exactly over readers.

Without a manifest, what cannot be detected: a shard that is a well-formed archive but has lost whole samples
(rewritten short), a shard missing from ``urls``, and changed contents (the manifest's SHA-256 is checked by
:func:`~torch_pretrain_update.data.shards.inspect_shards`, not by the stream). Truncation, corrupt headers, empty or
unreadable files and bad samples are detected with or without one.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Any, Callable, Optional

import torch
from torch.utils.data import IterableDataset
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_bool, check_choice, check_float, check_int, check_vector, short_repr
from torch_pretrain_update._dist import resolve_replicas, worker_split
from torch_pretrain_update._rng import epoch_generator
from torch_pretrain_update._state import check_config, tensor_digest
from torch_pretrain_update.data.decode import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_RATIO,
    SizeLimitError,
    check_limits,
    safe_decode,
)
from torch_pretrain_update.data.shards import (
    DamagedShardError,
    MalformedSampleError,
    ShardInfo,
    ShardManifest,
    _as_manifest,
    _samples,
    expand_urls,
    parse_label,
)
from torch_pretrain_update.data.stages import BadSampleError, balance_classes, with_class_weights

__all__ = ["WeightedWebDataset", "stream_stats"]

logger = logging.getLogger(__name__)

_STATE_FORMAT = "WeightedWebDataset/1"
_MAX_EVENTS = 50
_STAT_KEYS = ("samples", "skipped_samples", "missing_samples", "shard_errors", "padded_samples", "oversized")


@dataclass(frozen=True)
class _Segment:
    """Positions ``[start, stop)`` of one shard's (shuffled) sample order; ``stop=None``: to the shard's end."""

    shard: int
    start: int
    stop: Optional[int]


def _fresh_stats() -> dict[str, Any]:
    stats: dict[str, Any] = {k: 0 for k in _STAT_KEYS}
    stats["events"] = []
    return stats


def _copy_stats(stats: dict[str, Any]) -> dict[str, Any]:
    out = {**_fresh_stats(), **stats}  # a key added since the state was saved starts at 0
    out["events"] = list(stats["events"])
    return out


def _buffer_shuffle(src: Iterator[dict], size: int, gen: torch.Generator) -> Iterator[dict]:
    """Buffer shuffle driven by a torch generator.

    Hand-written because webdataset's ``shuffle`` stage draws from a ``random.Random`` and starts yielding
    before its buffer is full; here the order must be a pure function of the generator and the input so that a
    shard can be replayed exactly on resume. Uniforms are drawn in blocks (one torch call per 1024 samples).
    """
    buf: list[dict] = []
    block: list[float] = []
    pos = 0
    for item in src:
        if len(buf) < size:
            buf.append(item)
            continue
        if pos == len(block):
            block = torch.rand(1024, generator=gen, dtype=torch.float64).tolist()
            pos = 0
        j = int(block[pos] * size)
        pos += 1
        out, buf[j] = buf[j], item
        yield out
    for j in torch.randperm(len(buf), generator=gen).tolist():
        yield buf[j]


class WeightedWebDataset(IterableDataset):
    """WebDataset shards as a weighted, deterministic, resumable ``IterableDataset`` (see the module docstring).

    Args:
        urls: shard urls, a brace pattern (``"train-{000000..000099}.tar"``) or ``None`` for all shards of
            ``manifest``.
        label_key: member holding the integer class label (always required).
        num_classes: number of classes C; labels must be in ``[0, C)``.
        scheme: class-weight scheme (:func:`~torch_pretrain_update.scoring.weights.class_weights`).
        counts: known class counts for the weights (and the balancing prior); default: the manifest's histogram
            summed over the selected shards, so the weights equal ``class_weights`` of all their labels; without
            either, running counts of the stream (``momentum`` as in ``with_class_weights``).
        momentum: decay in (0, 1] of the running counts when ``counts`` are unknown (and of ``balance``'s
            running shares); checked even when unused.
        weight_key: where the weight goes (a 0-d float32 tensor; the default collate batches it).
        balance: rebalance the stream with ``stages.balance_classes`` toward ``balance_target``.
        balance_target: target class shares (uniform by default).
        shuffle: shuffle the shard order and the samples within shards.
        shuffle_buffer: size of the per-shard shuffle buffer (>= the shard size: a full in-shard permutation).
            Memory: ``shuffle_buffer`` undecoded samples per worker.
        seed: base seed; every rank must pass the same one.
        handler: ``None`` (raise; default) or a webdataset-style handler ``exc -> bool`` for damaged shards and
            bad samples: True skips and counts, False also stops reading the current shard.
        required_keys: members every sample must have (the label key is always required).
        manifest: path of a manifest from :func:`~torch_pretrain_update.data.shards.write_shards` (or a
            :class:`~torch_pretrain_update.data.shards.ShardManifest`): enables count checks, known class counts and
            ``split="samples"``. Each shard read to its end is checked against its manifest entry: the sample
            count and (when the manifest's ``label_key`` is ``label_key``) the class histogram.
        rank, world_size: this rank and the number of ranks; default from the initialised process group, else
            0 and 1.
        split: ``"auto"`` (``"samples"`` with a manifest, else ``"shards"``), ``"samples"`` or ``"shards"``.
        samples_per_rank: samples each rank yields per epoch (see the module docstring); default ``ceil(N / W)``
            with ``split="samples"``, unlimited with ``split="shards"``.
        drop_last: with ``split="samples"`` and no ``samples_per_rank``: ``floor(N / W)`` instead of padding.
        decoder: sample -> decoded sample; default ``decode.safe_decode()`` (refuses pickles).
        allow_unsafe_urls: read a ``manifest`` path with ``read_manifest(..., allow_unsafe_urls=True)``: its urls
            may then be ``pipe:`` commands, remote urls or paths outside its folder. Only for a manifest you
            trust; by default such a manifest is refused (``ValueError``).
        max_member_bytes: the largest tar member read and the largest decoded member (default 256 MiB; the
            default decoder's cap too); None: no cap. A tar member over it ends its shard (a shard error), a
            decoded one (a ``.gz`` member, an image) skips its sample; both are refused before the memory is
            spent and counted in ``stats["oversized"]``.
        max_ratio: the most a compressed shard or member may inflate per compressed byte past 16 MiB (default
            1000: a decompression bomb); None: no cap.

    Attributes:
        stats: this reader's counts for the current epoch: ``samples`` (yielded), ``skipped_samples``,
            ``missing_samples`` (positions of this reader's ranges never read because a shard ended early),
            ``shard_errors``, ``padded_samples``, ``oversized`` (of the shard errors and skipped samples: those
            refused for a size cap) and ``events`` (the first 50 messages, naming shards and keys).
            With DataLoader workers each worker has its own copy; :func:`stream_stats` sums them from a
            ``StatefulDataLoader.state_dict()``, and each worker logs its counts at the end of its epoch.

    Example::

        >>> manifest = write_shards(samples, "/data/train-%06d.tar", maxcount=1000)
        >>> ds = WeightedWebDataset(None, manifest=manifest, num_classes=10, seed=0)
        >>> loader = StatefulDataLoader(ds, batch_size=64, num_workers=2)
        >>> for epoch in range(3):
        ...     ds.set_epoch(epoch)
        ...     for batch in loader:
        ...         loss = (F.cross_entropy(model(batch["npy"]), batch["cls"], reduction="none")
        ...                 * batch["weight"]).mean()
    """

    def __init__(
        self,
        urls: str | Sequence[str] | None = None,
        *,
        label_key: str = "cls",
        num_classes: int,
        scheme: str = "inverse",
        counts: Any = None,
        momentum: Optional[float] = None,
        weight_key: str = "weight",
        balance: bool = False,
        balance_target: Any = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        handler: Optional[Callable[[BaseException], Any]] = None,
        required_keys: Optional[Sequence[str]] = None,
        manifest: str | os.PathLike | ShardManifest | None = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        split: str = "auto",
        samples_per_rank: Optional[int] = None,
        drop_last: bool = False,
        decoder: Optional[Callable[[dict], dict]] = None,
        allow_unsafe_urls: bool = False,
        max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
        max_ratio: Optional[float] = DEFAULT_MAX_RATIO,
    ) -> None:
        super().__init__()
        if not isinstance(label_key, str) or not label_key:
            raise TypeError(f"label_key must be a non-empty str; got {label_key!r}")
        self.label_key = label_key
        self.num_classes = check_int(num_classes, "num_classes", min_value=1)
        self.scheme = scheme
        # validated even when unused (known counts without balance=True): a bad value is a mistake either way
        self.momentum = (None if momentum is None
                         else check_float(momentum, "momentum", low=0.0, high=1.0, low_inclusive=False))
        self.weight_key = weight_key
        self.balance = check_bool(balance, "balance")
        self.balance_target = balance_target
        self.shuffle = check_bool(shuffle, "shuffle")
        self.shuffle_buffer = check_int(shuffle_buffer, "shuffle_buffer", min_value=1)
        self.seed = check_int(seed, "seed")
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be None or callable (e.g. webdataset.warn_and_continue); got {handler!r}")
        self.handler = handler
        if isinstance(required_keys, str):
            required_keys = [required_keys]
        req = list(required_keys or [])
        for k in req:
            if not isinstance(k, str) or not k:
                raise TypeError(f"required_keys must be non-empty strings; got {k!r}")
        self.required_keys = tuple(dict.fromkeys([*req, label_key]))
        self.world_size, self.rank = resolve_replicas(world_size, rank)
        self.drop_last = check_bool(drop_last, "drop_last")
        self.max_member_bytes, self.max_ratio = check_limits(max_member_bytes, max_ratio)
        self.decoder = (decoder if decoder is not None
                        else safe_decode(max_member_bytes=self.max_member_bytes, max_ratio=self.max_ratio))
        if not callable(self.decoder):
            raise TypeError(f"decoder must be callable (sample -> sample); got {decoder!r}")

        self.manifest = _as_manifest(manifest, allow_unsafe_urls=check_bool(allow_unsafe_urls, "allow_unsafe_urls"))
        if urls is None:
            if self.manifest is None:
                raise ValueError("urls is None: pass shard urls (or a brace pattern) or a manifest")
            self.urls = self.manifest.urls
        else:
            self.urls = expand_urls(urls)
        self.infos: list[Optional[ShardInfo]] = [None] * len(self.urls)
        if self.manifest is not None:
            for i, u in enumerate(self.urls):
                info = self.manifest.lookup(u)
                if info is None:
                    raise ValueError(f"urls: shard {u!r} is not listed in the manifest {self.manifest.path!r}")
                self.infos[i] = info
        if len(self.urls) < self.world_size:
            raise ValueError(
                f"urls: {len(self.urls)} shard(s) for world_size={self.world_size} ranks; need at least one shard "
                "per rank (and per DataLoader worker): write smaller shards (write_shards(maxcount=...))"
            )

        split = check_choice(split, "split", ("auto", "samples", "shards"))
        if split == "auto":
            split = "samples" if self.manifest is not None else "shards"
        if split == "samples" and self.manifest is None:
            raise ValueError("split='samples' needs per-shard counts: pass manifest=")
        self.split = split
        self.total = sum(i.count for i in self.infos) if self.manifest is not None else None
        if samples_per_rank is not None:
            samples_per_rank = check_int(samples_per_rank, "samples_per_rank", min_value=1)
        elif split == "samples":
            assert self.total is not None
            samples_per_rank = self.total // self.world_size if drop_last else -(-self.total // self.world_size)
            if samples_per_rank == 0:
                raise ValueError(
                    f"manifest: {self.total} samples cannot give each of world_size={self.world_size} ranks one "
                    "sample with drop_last=True"
                )
        self.samples_per_rank = samples_per_rank
        if self.world_size > 1 and samples_per_rank is None:
            warnings.warn(
                "WeightedWebDataset: without a manifest or samples_per_rank, ranks may yield different numbers "
                "of samples and DDP can hang at the end of an epoch; pass manifest= or samples_per_rank=",
                stacklevel=2,
            )

        if counts is None and self.manifest is not None and self.manifest.label_key == label_key:
            total = [0] * self.num_classes
            for info in self.infos:
                if len(info.class_counts) > self.num_classes and any(info.class_counts[self.num_classes:]):
                    raise ValueError(
                        f"num_classes={self.num_classes} but the manifest's shard {info.url!r} has labels >= "
                        f"{self.num_classes}"
                    )
                for c, n in enumerate(info.class_counts[: self.num_classes]):
                    total[c] += n
            counts = total
        if counts is not None:  # 1-D, finite, non-negative, not all zero (the stage checks num_classes entries)
            counts = check_vector(counts, "counts", allow_all_zero=False).tolist()
        self.counts = counts
        # Validate the stage options now (errors at construction, not in a worker).
        self._make_stages()

        # The epoch lives in shared memory so that set_epoch() in the main process reaches DataLoader workers
        # that persist across epochs (persistent_workers=True); a plain attribute would be frozen in their copies.
        self._epoch = multiprocessing.RawValue("q", 0)
        self.stats: dict[str, Any] = _fresh_stats()
        self._cursor: Optional[dict[str, Any]] = None
        self._offset = 0
        self._pending: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------------------------------------------------
    # public API

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = check_int(value, "epoch", min_value=0)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: the shard order and shuffles of epoch ``e`` come from ``(seed, e)``. Reaches
        DataLoader workers too, also persistent ones (the value is in shared memory)."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # pickled or copied outside of starting a worker: a plain int
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_epoch"], int):
            state["_epoch"] = multiprocessing.RawValue("q", state["_epoch"])
        self.__dict__.update(state)

    def batches_per_rank(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> Optional[int]:
        """Number of batches a ``DataLoader(batch_size, num_workers)`` yields per rank and epoch (each worker
        batches its own samples), or None when the length is not fixed."""
        batch_size = check_int(batch_size, "batch_size", min_value=1)
        nw = max(1, check_int(num_workers, "num_workers", min_value=0))
        if self.samples_per_rank is None:
            return None
        total = 0
        for w in range(nw):
            n = self._worker_quota(nw, w)
            total += n // batch_size if drop_last else -(-n // batch_size)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state: epoch, this reader's cursor and the snapshot needed to replay, and
        ``config`` (what the stream depends on, checked by :meth:`load_state_dict`)."""
        if self._pending is not None:
            return _json_copy(self._pending)
        return {
            "format": _STATE_FORMAT,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_shards": len(self.urls),
            "config": self._config(),
            "cursor": self._cursor_state(),
        }

    def _config(self) -> dict[str, Any]:
        """What the stream depends on, as plain values; recorded in the state and compared on load.

        ``shards`` hashes each shard's file name, manifest count and SHA-256 (not its folder: a data set that
        moved still resumes; without a manifest only the names are compared). Not ``rank`` nor the number of
        DataLoader workers: the reader's cursor records those and :meth:`__iter__` refuses a mismatch.
        """
        if getattr(self, "_config_digests", None) is None:
            names = "\n".join(
                f"{os.path.basename(u)}\t{None if i is None else i.count}\t{None if i is None else i.sha256}"
                for u, i in zip(self.urls, self.infos)
            )
            counts = None if self.counts is None else torch.tensor(self.counts, dtype=torch.float64)
            target = (None if self.balance_target is None
                      else torch.as_tensor(self.balance_target, dtype=torch.float64))
            self._config_digests = (
                tensor_digest(torch.frombuffer(bytearray(names.encode()), dtype=torch.uint8)),
                None if counts is None else tensor_digest(counts),
                None if target is None else tensor_digest(target),
            )
        shards, counts, target = self._config_digests
        return {
            "type": type(self).__name__, "shards": shards, "seed": self.seed, "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer if self.shuffle else None, "world_size": self.world_size,
            "split": self.split, "samples_per_rank": self.samples_per_rank, "label_key": self.label_key,
            "num_classes": self.num_classes, "scheme": self.scheme, "counts": counts, "momentum": self.momentum,
            "balance": self.balance, "balance_target": target if self.balance else None,
        }

    def _cursor_state(self) -> Optional[dict[str, Any]]:
        cur = self._cursor
        if cur is None or cur["epoch"] != self.epoch:
            return None
        out = {k: v for k, v in cur.items() if k not in ("seg_yielded", "seg_pass_outputs")}
        k = self._offset
        out.update(offset=k, yielded=cur["seg_yielded"] + k, pass_outputs=cur["seg_pass_outputs"] + k)
        if not cur["done"]:
            out["stats"] = _copy_stats(self.stats)  # live counts, for stream_stats() (a resume recounts them)
        return _json_copy(out)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next ``iter()`` in the same epoch continues after the
        last sample delivered before the state was taken.

        If this dataset is already at a later epoch (the resumed loop's ``set_epoch(e + 1)`` ran first, as it
        does under ``StatefulDataLoader``, which hands the state to the dataset only at the next
        ``iter(loader)``), the state's epoch counts as finished: the dataset keeps its epoch, from the start.

        Raises:
            ValueError: the state was saved by a stream built differently (other shards, seed, shuffle
                settings, world size, ...: the message names them). A state without ``config`` (saved by an
                earlier version) is checked only for its seed and number of shards.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state must be a dict from WeightedWebDataset.state_dict(); got {short_repr(state)}")
        check_config(state.get("config"), self._config())
        if state.get("seed") != self.seed or state.get("num_shards") != len(self.urls):
            raise ValueError(
                f"state was saved with seed={state.get('seed')} over {state.get('num_shards')} shards; this "
                f"dataset has seed={self.seed} and {len(self.urls)} shards"
            )
        epoch = check_int(state.get("epoch"), "state['epoch']", min_value=0)
        cursor = state.get("cursor")
        if cursor is not None and not isinstance(cursor, dict):
            raise ValueError(f"state['cursor'] must be a dict or None; got {short_repr(cursor)}")
        if epoch < self.epoch:  # epoch e is done; the newer epoch (shared with workers) is left as it is
            self._pending = None
            self._cursor = None
            return
        self.epoch = epoch
        self._pending = _json_copy(state) if cursor is not None else None
        self._cursor = None

    def __iter__(self) -> Iterator[dict]:
        self._cursor = None  # a new pass over the epoch; a loaded state (if any) is applied when it starts
        return self._iterate()

    def __repr__(self) -> str:
        return (
            f"WeightedWebDataset({len(self.urls)} shards, split={self.split!r}, rank={self.rank}/{self.world_size}, "
            f"samples_per_rank={self.samples_per_rank}, shuffle={self.shuffle}, seed={self.seed}, "
            f"balance={self.balance})"
        )

    # ------------------------------------------------------------------------------------------------------------
    # plan

    def _worker_quota(self, nw: int, w: int) -> int:
        assert self.samples_per_rank is not None
        L = self.samples_per_rank
        return L // nw + (1 if w < L % nw else 0)

    def _shard_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.urls)))
        return torch.randperm(len(self.urls), generator=epoch_generator(self.seed, epoch, 0)).tolist()

    def _plan(self, epoch: int, nw: int, w: int) -> tuple[list[_Segment], Optional[int]]:
        """This reader's segments (in reading order) and its quota (None: no fixed length)."""
        order = self._shard_order(epoch)
        W, r = self.world_size, self.rank
        if len(self.urls) < W * nw:
            raise ValueError(
                f"urls: {len(self.urls)} shard(s) for {W} rank(s) x {nw} DataLoader worker(s); need at least "
                f"{W * nw} (one per worker): write smaller shards or use fewer workers"
            )
        if self.split == "shards":
            mine = order[r::W][w::nw]
            quota = None if self.samples_per_rank is None else self._worker_quota(nw, w)
            return [_Segment(s, 0, None) for s in mine], quota
        counts = [self.infos[s].count for s in order]
        N = sum(counts)
        if N == 0:
            raise ValueError("manifest: the selected shards hold no samples")
        L = self.samples_per_rank
        quota = self._worker_quota(nw, w)
        begin = r * L + w * (L // nw) + min(w, L % nw)
        # Map global positions [begin, begin + quota) (mod N: padding wraps to the start) onto shard ranges.
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        segments: list[_Segment] = []
        pos, left = begin % N, quota
        k = _bisect_right(starts, pos) - 1
        while left > 0:
            while pos >= starts[k + 1]:  # also steps over empty shards
                k += 1
            a = pos - starts[k]
            take = min(counts[k] - a, left)
            segments.append(_Segment(order[k], a, a + take))
            left -= take
            pos += take
            if pos >= N:
                pos, k = 0, 0
        return segments, quota

    # ------------------------------------------------------------------------------------------------------------
    # stages

    def _make_stages(self) -> list[Any]:
        stages: list[Any] = [
            with_class_weights(self.label_key, num_classes=self.num_classes, scheme=self.scheme,
                               counts=self.counts, momentum=None if self.counts is not None else self.momentum,
                               weight_key=self.weight_key)
        ]
        if self.balance:
            # Known class counts are the balancer's prior: its running share estimates start at the true shares
            # instead of at the first few samples.
            prior = self.counts if self.counts is not None and self.momentum is None else None
            b = balance_classes(self.label_key, num_classes=self.num_classes, target=self.balance_target,
                                momentum=self.momentum, seed=self.seed, prior_counts=prior)
            stages.append(b)
        return stages

    def _stages_for_epoch(self, epoch: int) -> list[Any]:
        stages = self._make_stages()
        for s in stages:
            s.set_epoch(epoch)
        return stages

    # ------------------------------------------------------------------------------------------------------------
    # reading

    def _event(self, stats: dict[str, Any], message: str) -> None:
        if len(stats["events"]) < _MAX_EVENTS:
            stats["events"].append(message)

    def _handle(self, exc: BaseException) -> bool:
        """Run the handler on ``exc``: raises (default), or returns True (skip) / False (skip, stop the shard)."""
        handler = self.handler if self.handler is not None else reraise_exception
        return bool(handler(exc))

    def _shard_samples(self, seg: _Segment, stats: dict[str, Any]) -> Iterator[dict]:
        """Raw samples of the segment's shard, checked against the manifest count and, when read to its end,
        the manifest's class histogram (the class weights come from it); damage -> handler."""
        url = self.urls[seg.shard]
        info = self.infos[seg.shard]
        try:
            samples = _samples(url, expected=None if info is None else info.count,
                               max_member_bytes=self.max_member_bytes, max_ratio=self.max_ratio)
            want = None
            if info is not None and info.class_counts and self.manifest.label_key == self.label_key:
                want = {c: n for c, n in enumerate(info.class_counts) if n}
            if want is None:
                yield from samples
                return
            got: dict[int, int] = {}
            readable = True  # False after a missing, unparsable or out-of-range label (the sample checks report it)
            nc = self.num_classes
            for raw in samples:
                if isinstance(raw, MalformedSampleError):  # refused in _checked; its label is unknown
                    readable = False
                    yield raw
                    continue
                label = raw.get(self.label_key)
                try:
                    # ASCII digits (what write_shards stores) cost one int(); anything else goes to parse_label
                    c = int(label) if type(label) is bytes and label.isdigit() else parse_label(label)
                except ValueError:
                    c = nc
                if c < nc:
                    got[c] = got.get(c, 0) + 1
                else:
                    readable = False
                yield raw
            if readable and got != want:
                raise DamagedShardError(
                    url, f"class histogram {dict(sorted(got.items()))} of the labels read differs from the "
                         f"manifest's {want}: the manifest's class counts (which give the class weights) are wrong")
        except DamagedShardError as error:
            self._handle(error)  # raises by default
            stats["shard_errors"] += 1
            stats["oversized"] += isinstance(error, SizeLimitError)
            self._event(stats, str(error))

    def _segment_raw(self, seg: _Segment, epoch: int, stats: dict[str, Any]) -> Iterator[dict]:
        """The segment's raw samples: the shard's (shuffled) order, positions ``[start, stop)``."""
        src: Iterator[dict] = self._shard_samples(seg, stats)
        if self.shuffle:
            src = _buffer_shuffle(src, self.shuffle_buffer, epoch_generator(self.seed, epoch, 1, seg.shard))
        pos = 0
        taken = 0
        for sample in src:
            if pos >= seg.start:
                if seg.stop is not None and pos >= seg.stop:
                    break
                taken += 1
                yield sample
            pos += 1
        if seg.stop is not None and taken < seg.stop - seg.start:
            stats["missing_samples"] += seg.stop - seg.start - taken
        elif seg.stop is None and self.infos[seg.shard] is not None:
            stats["missing_samples"] += max(0, self.infos[seg.shard].count - taken)

    def _checked(self, src: Iterator[dict], url: str, stats: dict[str, Any]) -> Iterator[dict]:
        """Required keys, decoding and label checks; bad samples -> handler."""
        label_key, nc, decoder, required = self.label_key, self.num_classes, self.decoder, self.required_keys
        for raw in src:
            try:
                if isinstance(raw, MalformedSampleError):  # member names that cannot form a sample
                    raise raw
                for k in required:
                    if k not in raw:
                        break
                else:
                    k = None
                if k is not None:
                    missing = [k for k in required if k not in raw]
                    present = sorted(k for k in raw if not k.startswith("__"))
                    raise BadSampleError(
                        f"shard {url!r}, sample __key__={raw.get('__key__')!r}: missing member(s) {missing} "
                        f"(has {present})", sample_key=raw.get("__key__"), url=url, field=missing[0])
                sample = decoder(raw)
                label = sample[label_key]
                try:
                    if type(label) is not int or label < 0:  # fast path: safe_decode gives ints
                        label = parse_label(label)
                except ValueError as exc:
                    raise BadSampleError(f"shard {url!r}, sample __key__={raw.get('__key__')!r}, member "
                                         f"{label_key!r}: {exc}", sample_key=raw.get("__key__"), url=url,
                                         field=label_key) from None
                if label >= nc:
                    raise BadSampleError(
                        f"shard {url!r}, sample __key__={raw.get('__key__')!r}, member {label_key!r}: label "
                        f"{label} out of range [0, num_classes={nc})", sample_key=raw.get("__key__"), url=url,
                        field=label_key)
                sample[label_key] = label
            except Exception as exc:
                keep_going = self._handle(exc)
                stats["skipped_samples"] += 1
                stats["oversized"] += isinstance(exc, SizeLimitError)
                msg = str(exc)
                if url not in msg:
                    key = raw.get("__key__") if isinstance(raw, dict) else getattr(raw, "key", None)
                    msg = f"shard {url!r}, sample __key__={key!r}: {msg}"
                self._event(stats, msg)
                if not keep_going:  # "stop": the rest of this shard range is skipped, and counted
                    rest = sum(1 for _ in src)
                    stats["skipped_samples"] += rest
                    self._event(stats, f"shard {url!r}: the handler stopped the shard; {rest} more sample(s) skipped")
                    return
                continue
            yield sample

    def _segment_pipeline(self, seg: _Segment, epoch: int, stages: list[Any], stats: dict[str, Any]) -> Iterator[dict]:
        it: Iterator[dict] = self._checked(self._segment_raw(seg, epoch, stats), self.urls[seg.shard], stats)
        for stage in stages:
            it = stage(it)
        return it

    def _iterate(self) -> Iterator[dict]:
        nw, w = worker_split()
        epoch = self.epoch
        segments, quota = self._plan(epoch, nw, w)
        stages = self._stages_for_epoch(epoch)
        pending, self._pending = self._pending, None
        p, i, skip, yielded, pass_outputs = 0, 0, 0, 0, 0
        stats = _fresh_stats()
        snap: Optional[dict[str, Any]] = None
        if pending is not None and pending["epoch"] == epoch:
            cur = pending["cursor"]
            if (cur.get("num_workers"), cur.get("worker_id"), cur.get("world_size"), cur.get("rank")) != (
                nw, w, self.world_size, self.rank):
                raise ValueError(
                    f"state was saved by worker {cur.get('worker_id')} of {cur.get('num_workers')} on rank "
                    f"{cur.get('rank')} of {cur.get('world_size')}; resuming as worker {w} of {nw} on rank "
                    f"{self.rank} of {self.world_size} is not supported (use the same num_workers and ranks)"
                )
            p, i, skip = int(cur["pass"]), int(cur["segment"]), int(cur["offset"])
            yielded, pass_outputs = int(cur["yielded"]), int(cur["pass_outputs"])
            snap = cur["snapshot"]
            if cur.get("done"):
                self.stats = _copy_stats(cur["stats"])
                self._cursor = {k: v for k, v in cur.items() if k not in ("offset", "yielded", "pass_outputs")}
                self._cursor.update(seg_yielded=yielded, seg_pass_outputs=pass_outputs)
                self._offset = 0
                return
        self.stats = stats
        base = {"epoch": epoch, "num_workers": nw, "worker_id": w, "world_size": self.world_size, "rank": self.rank}
        done = quota is not None and yielded >= quota
        while not done:
            while i < len(segments):
                seg = segments[i]
                if snap is not None:  # resuming into this segment: restore its start
                    for stage, st in zip(stages, snap["stages"]):
                        stage.load_state_dict(st)
                    stats = _copy_stats(snap["stats"])
                    self.stats = stats
                    seg_pass_outputs = snap["pass_outputs"]
                    seg_yielded = snap["yielded"]
                else:
                    seg_pass_outputs, seg_yielded = pass_outputs, yielded
                snap = {"stages": [s.state_dict() for s in stages], "stats": _copy_stats(stats),
                        "pass_outputs": seg_pass_outputs, "yielded": seg_yielded}
                k = 0
                limit = quota - seg_yielded if quota is not None else math.inf
                padding = p > 0
                # Damage met again while padding (pass > 0) was counted in pass 0: count it once.
                seg_stats = _fresh_stats() if padding else stats
                # The cursor of a sample = this segment's dict + its offset k (state_dict() combines them).
                self._cursor = {**base, "pass": p, "segment": i, "seg_yielded": seg_yielded,
                                "seg_pass_outputs": seg_pass_outputs, "done": False, "snapshot": snap}
                for sample in self._segment_pipeline(seg, epoch, stages, seg_stats):
                    if k >= limit:
                        break
                    k += 1
                    stats["samples"] += 1
                    if padding:
                        stats["padded_samples"] += 1
                    if k <= skip:
                        continue
                    self._offset = k
                    yield sample
                skip = 0
                snap = None
                yielded = seg_yielded + k
                pass_outputs = seg_pass_outputs + k
                i += 1
                if quota is not None and yielded >= quota:
                    break
            if quota is None or yielded >= quota:
                done = True
            elif pass_outputs == 0:
                raise ValueError(
                    f"rank {self.rank}, worker {w}: a full pass over its {len(segments)} shard range(s) yielded no "
                    f"sample, so samples_per_rank={self.samples_per_rank} cannot be filled (see stats: "
                    f"{ {k: stats[k] for k in _STAT_KEYS} })"
                )
            else:
                p, i, pass_outputs = p + 1, 0, 0
        self._cursor = {**base, "pass": p, "segment": i, "seg_yielded": yielded, "seg_pass_outputs": pass_outputs,
                        "done": True, "snapshot": None, "stats": _copy_stats(stats)}
        self._offset = 0
        self._log_epoch_end(epoch, w, stats)

    def _log_epoch_end(self, epoch: int, w: int, stats: dict[str, Any]) -> None:
        counts = {k: stats[k] for k in _STAT_KEYS}
        lossy = any(stats[k] for k in ("skipped_samples", "missing_samples", "shard_errors"))
        level = logging.WARNING if lossy else logging.INFO
        logger.log(level, "WeightedWebDataset epoch %d rank %d worker %d: %s%s", epoch, self.rank, w, counts,
                   f"; first events: {stats['events'][:3]}" if lossy else "")


def _bisect_right(a: list[int], x: int) -> int:
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _json_copy(value: Any) -> Any:
    """A deep copy made of plain JSON types (dicts, lists, str, int, float, bool, None)."""
    if isinstance(value, dict):
        return {str(k): _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"state contains a non-finite float {value}")
    return value


def stream_stats(state: dict[str, Any]) -> dict[str, Any]:
    """Sum the ``stats`` of every :class:`WeightedWebDataset` reader found in a ``StatefulDataLoader.state_dict()``
    (one per DataLoader worker, or the single-process dataset's), as of that state.

    Example::

        >>> stream_stats(loader.state_dict())
        {'samples': 4000, 'skipped_samples': 2, 'missing_samples': 7, 'shard_errors': 1, 'padded_samples': 9,
         'events': [...], 'readers': 2}
    """
    total = _fresh_stats()
    total["readers"] = 0

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("format") == _STATE_FORMAT:
                cur = node.get("cursor")
                st = None
                if isinstance(cur, dict):
                    st = cur.get("stats")
                if st is not None:
                    total["readers"] += 1
                    for k in _STAT_KEYS:
                        total[k] += int(st.get(k, 0))
                    total["events"] += list(st.get("events", []))
                return
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(state)
    return total
