"""``WeightedWebDataset``: a resumable, rank- and worker-split WebDataset stream with weights and no silent loss.

Pipeline of one reader (a DataLoader worker of one rank)::

    shards (epoch order) -> split (partition.py) -> strict tar reading -> count and histogram checks vs manifest
      -> per-shard buffer shuffle -> this reader's positions -> required keys -> safe decode -> label check
      -> [user stages] -> class weights (stages.with_class_weights) -> [stages.balance_classes] -> fixed length

The modules around it: ``stream_config`` (the options, checked once), ``partition`` (which samples each reader
reads: a pure function), ``reader`` (reading and checking a segment, the epoch loop) and ``cursor`` (the
reader's position in its state, and the epoch shared with the workers).

**Splitting.** Every epoch the shard order is ``torch.randperm`` from a fresh generator seeded from
``(seed, epoch)`` (identity with ``shuffle=False``); each shard's samples are shuffled by a buffer shuffle whose
generator is seeded from ``(seed, epoch, shard index)``, so a shard's internal order is a pure function of those
and of its contents. Three modes (:mod:`~torch_pretrain_update.data.partition` has the exact rules):

- ``split="samples"`` (the default when a manifest gives the per-shard counts): the epoch's samples, in that
  order, are numbered ``0..N-1``; rank ``r`` takes the contiguous positions ``[r L, (r + 1) L)`` with
  ``L = samples_per_rank`` (default ``ceil(N / W)``, padding by wrapping around to the start of the epoch;
  ``drop_last=True``: ``floor(N / W)``, truncating), cut into ``num_workers`` contiguous pieces of ``L // nw``
  or ``L // nw + 1`` samples. Every sample is yielded exactly once per epoch except the ``W L - N`` (at most
  ``W - 1`` by default) padding repeats, and every rank yields exactly ``L`` samples, so DDP never hangs at the
  end of an epoch. An explicit ``samples_per_rank`` larger than ``N / W`` wraps around more (more repeats); a
  smaller one leaves positions ``>= W L`` of the epoch order out. Pieces start and end inside shards, so any
  number of ranks x workers share any number of shards: a shard cut between readers is opened by each, and
  each re-reads (without decoding) the part before its own. For full speed write at least ranks x workers
  shards.
- ``split="shards"`` (the default without a manifest): rank ``r`` takes shards ``r, r + W, ...`` of the epoch
  order and worker ``w`` every ``nw``-th of those; there must be at least ranks x workers shards (checked for the
  ranks at construction; for the workers, whose number only the DataLoader knows, in each worker). The number of
  samples per rank is whatever its shards hold, unless ``samples_per_rank`` fixes it (like webdataset's
  ``with_epoch``): a reader that runs out repeats its own stream (counted in ``stats["padded_samples"]``), one
  with more stops early.
- ``indices=`` (a plan of global sample indices, with a manifest): the plan's positions are split like
  ``split="samples"`` and each reader streams its piece in the plan's order, reading sequentially: a run of
  indices in one shard, in non-decreasing order, is one pass over that shard's range (sort a plan for speed;
  each backward jump opens the shard again). ``shuffle`` does not apply: the plan is the order.

Each sample carries ``"__index__"`` when a manifest gives the counts: its global index, the number of samples in
the shards before its own (in the order of ``urls``, or of the manifest) plus its position in its shard as
written. That is ``ShardDataset``'s index of the same sample, and what ``score_dataset`` reads from an iterable
of samples, and what ``indices`` lists.

**Epochs.** ``set_epoch(e)`` chooses the epoch of the next ``iter()`` (the shard order and shuffles of epoch
``e`` come from ``(seed, e)``); without it, each new ``iter()`` starts the epoch after the one before (0, 1,
2, ...), as webdataset's epochs do: Lightning and ``torchdata.nodes.IterableWrapper`` never call ``set_epoch``,
and a stream that repeated one order every epoch would train on the same sequence again and again. Each reader
counts its own starts in shared memory, so the DataLoader workers of every ``iter(loader)`` (persistent or not)
agree on the epoch; the epoch of each reader is in its state, so a resumed run continues the same sequence of
epochs. A loop that calls ``set_epoch`` gets exactly the epochs it sets, like ``DistributedSampler``.

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
``num_workers`` (which must be the same as when the state was saved: another number is refused with an error
that names both). A state of epoch ``e`` that reaches a dataset already set to a later epoch
(``StatefulDataLoader`` hands it over at the next ``iter(loader)``, after the resumed loop's
``set_epoch(e + 1)``) means "epoch ``e`` is finished", so a checkpoint taken after an epoch's loop resumes with
the next epoch, nothing replayed; so does a state saved at the end of an epoch by a loop that never calls
``set_epoch``. The state records what the stream depends on (shards, seed, shuffle settings, number of ranks,
weights and balancing options, the ``indices`` plan and the user stages' types) and a differently built dataset
refuses it.

**No silent loss.** By default (``handler=None``) these raise, naming the shard (and the sample's key and the
member): a shard that cannot be opened, is empty, is truncated (inside a member or at a header boundary), has a
corrupt header (the strict tar reader checks the end-of-archive block, which ``tarfile`` does not), holds fewer
or more samples than its manifest count, or (read to its end) labels whose class histogram differs from its
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
``inspect_shards``, not by the stream). Truncation, corrupt headers, empty or unreadable files and bad samples
are detected with or without one.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

from torch.utils.data import IterableDataset, get_worker_info

from torch_pretrain_update._checks import check_int, short_repr
from torch_pretrain_update._dist import replicas_alias
from torch_pretrain_update._state import check_config
from torch_pretrain_update.data.cursor import Cursor, EpochClock, check_reader
from torch_pretrain_update.data.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_RATIO
from torch_pretrain_update.data.manifest import ShardManifest
from torch_pretrain_update.data.partition import partition, worker_quota
from torch_pretrain_update.data.reader import STAT_KEYS, ShardReader, copy_stats, fresh_stats, read_epoch
from torch_pretrain_update.data.stream_config import StreamConfig

__all__ = ["WeightedWebDataset", "stream_stats"]

_STATE_FORMAT = "WeightedWebDataset/1"


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
        manifest: path of a manifest from :func:`~torch_pretrain_update.data.write.write_shards` (or a
            :class:`~torch_pretrain_update.data.manifest.ShardManifest`): enables count checks, known class
            counts, ``split="samples"``, ``"__index__"`` and ``indices``. Each shard read to its end is checked
            against its manifest entry: the sample count and (when the manifest's ``label_key`` is
            ``label_key``) the class histogram.
        rank, num_replicas: this rank and the number of ranks (as in ``DistributedSampler``); default from the
            initialised process group, else 0 and 1.
        split: ``"auto"`` (``"samples"`` with a manifest, else ``"shards"``), ``"samples"`` or ``"shards"``.
        samples_per_rank: samples each rank yields per epoch (see the module docstring); default ``ceil(N / W)``
            with ``split="samples"`` (N: the plan's length with ``indices``), unlimited with ``split="shards"``.
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
        stages: user stages, webdataset style (each a callable from an iterator of sample dicts to an iterator of
            sample dicts, e.g. ``wds.map(f)``, ``wds.select(pred)``, or this library's stages), applied in order
            after decoding and the label check, before the class weights (so weights and balancing see what
            they emit: a stage may filter, transform or relabel). Each epoch starts from a copy of each stage as
            given (``copy.deepcopy``) and calls its ``set_epoch(epoch)`` if it has one; a stage is applied to one
            segment (shard range) at a time. For exact resume a stage must be a pure function of its input, or
            keep its state in ``state_dict()``/``load_state_dict()`` (plain JSON values; saved at every segment
            start like the library's stages).
        indices: a plan of global sample indices (a 1-D integer sequence, array or tensor; repeats allowed) to
            stream instead of all the data, in the plan's order (see the module docstring); needs a manifest. The
            class weights still come from the counts of all the shards' samples: pass ``counts`` for the plan's.
        world_size: deprecated alias of ``num_replicas`` (a ``DeprecationWarning``).

    Attributes:
        stats: this reader's counts for the current epoch: ``samples`` (yielded), ``skipped_samples``,
            ``missing_samples`` (positions of this reader's ranges never read because a shard ended early),
            ``shard_errors``, ``padded_samples``, ``oversized`` (of the shard errors and skipped samples: those
            refused for a size cap) and ``events`` (the first 50 messages, naming shards and keys).
            With DataLoader workers each worker has its own copy; :func:`stream_stats` sums them from a
            ``StatefulDataLoader.state_dict()``, and each worker logs its counts at the end of its epoch.
        config: the checked options (:class:`~torch_pretrain_update.data.stream_config.StreamConfig`).

    Example::

        >>> manifest = write_shards(samples, "/data/train-%06d.tar", maxcount=1000)
        >>> ds = WeightedWebDataset(None, manifest=manifest, num_classes=10, seed=0)
        >>> loader = StatefulDataLoader(ds, batch_size=64, num_workers=2)
        >>> for epoch in range(3):
        ...     ds.set_epoch(epoch)  # optional: without it each iter() starts the next epoch
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
        num_replicas: Optional[int] = None,
        split: str = "auto",
        samples_per_rank: Optional[int] = None,
        drop_last: bool = False,
        decoder: Optional[Callable[[dict], dict]] = None,
        allow_unsafe_urls: bool = False,
        max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
        max_ratio: Optional[float] = DEFAULT_MAX_RATIO,
        stages: Optional[Sequence[Callable[..., Any]]] = None,
        indices: Any = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        num_replicas = replicas_alias(num_replicas, world_size, "WeightedWebDataset")
        self.config = StreamConfig.build(
            urls, label_key=label_key, num_classes=num_classes, scheme=scheme, counts=counts, momentum=momentum,
            weight_key=weight_key, balance=balance, balance_target=balance_target, shuffle=shuffle,
            shuffle_buffer=shuffle_buffer, seed=seed, handler=handler, required_keys=required_keys,
            manifest=manifest, rank=rank, num_replicas=num_replicas, split=split, samples_per_rank=samples_per_rank,
            drop_last=drop_last, decoder=decoder, allow_unsafe_urls=allow_unsafe_urls,
            max_member_bytes=max_member_bytes, max_ratio=max_ratio, stages=stages, indices=indices)
        self._reader = ShardReader(self.config)
        self._clock = EpochClock()
        self.stats: dict[str, Any] = fresh_stats()
        self._live: Optional[Cursor] = None  # this reader's cursor in its latest epoch
        self._live_generation = -1  # the clock's generation when it started (a set_epoch since makes it stale)
        self._provisional = False  # the next start may be thrown away (see load_state_dict)
        self._pending: Optional[dict[str, Any]] = None  # a loaded state, until an iteration starts
        self._claimed = False  # an iterator took the loaded state (it resumes it when it starts)

    # ------------------------------------------------------------------------------------------------ attributes
    urls = property(lambda self: list(self.config.urls), doc="The shard urls, in the order of their global indices.")
    rank = property(lambda self: self.config.rank, doc="This rank.")
    num_replicas = property(lambda self: self.config.num_replicas, doc="The number of ranks.")
    samples_per_rank = property(lambda self: self.config.samples_per_rank,
                                doc="Samples per rank and epoch (None: whatever the rank's shards hold).")
    split = property(lambda self: self.config.split, doc='"samples" or "shards".')
    seed = property(lambda self: self.config.seed, doc="The base seed.")

    @property
    def world_size(self) -> int:
        """Deprecated alias of :attr:`num_replicas` (a ``DeprecationWarning``)."""
        warnings.warn("WeightedWebDataset.world_size is deprecated; use num_replicas", DeprecationWarning,
                      stacklevel=2)
        return self.config.num_replicas

    @property
    def epoch(self) -> int:
        """The latest epoch set with :meth:`set_epoch` or started by a reader."""
        return self._clock.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make epoch ``epoch`` the next one every reader starts (the shard order and shuffles of epoch ``e`` come
        from ``(seed, e)``). Reaches DataLoader workers too, also persistent ones (shared memory). A loaded state of
        the same epoch stays pending; a state of another epoch is discarded."""
        self._clock.set(check_int(epoch, "epoch", min_value=0))

    def batches_per_rank(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> Optional[int]:
        """Number of batches a ``DataLoader(batch_size, num_workers)`` yields per rank and epoch (each worker
        batches its own samples), or None when the length is not fixed."""
        batch_size = check_int(batch_size, "batch_size", min_value=1)
        nw = max(1, check_int(num_workers, "num_workers", min_value=0))
        if self.config.samples_per_rank is None:
            return None
        quotas = [worker_quota(self.config.samples_per_rank, nw, w) for w in range(nw)]
        return sum(n // batch_size if drop_last else -(-n // batch_size) for n in quotas)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state: the epoch, this reader's cursor and the snapshot needed to replay,
        ``loader_workers`` (the DataLoader's ``num_workers`` of the process saving it) and ``config`` (what the
        stream depends on, checked by :meth:`load_state_dict`)."""
        if self._pending is not None:
            return _json_copy(self._pending)
        num_workers, worker_id = _loader_worker()
        slot = EpochClock.slot(num_workers, worker_id)
        cur = self._live if self._live_generation == self._clock.generation else None
        return _json_copy({
            "format": _STATE_FORMAT,
            "epoch": cur.epoch if cur is not None else self._clock.next_epoch(slot),
            "seed": self.config.seed,
            "num_shards": len(self.config.urls),
            "loader_workers": num_workers,
            "config": self.config.record(),
            "cursor": None if cur is None else cur.to_json(self.stats),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next ``iter()`` continues after the last sample delivered
        before the state was taken (in the state's epoch; then epochs go on from there).

        If this dataset is already at a later epoch (the resumed loop's ``set_epoch(e + 1)`` ran first, as it
        does under ``StatefulDataLoader``, which hands the state to the dataset only at the next
        ``iter(loader)``), the state's epoch counts as finished: the dataset keeps its epoch, from the start.

        Raises:
            ValueError: the state was saved by a stream built differently (other shards, seed, shuffle
                settings, number of ranks, ...: the message names them; a state without ``config``, saved by an
                earlier version, is checked only for its seed and number of shards), or by another reader: a
                DataLoader with another ``num_workers`` (the message names both), another worker or rank.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state must be a dict from WeightedWebDataset.state_dict(); got {short_repr(state)}")
        check_config(state.get("config"), self.config.record())
        if state.get("seed") != self.config.seed or state.get("num_shards") != len(self.config.urls):
            raise ValueError(
                f"state was saved with seed={state.get('seed')} over {state.get('num_shards')} shards; this "
                f"dataset has seed={self.config.seed} and {len(self.config.urls)} shards"
            )
        epoch = check_int(state.get("epoch"), "state['epoch']", min_value=0)
        raw = state.get("cursor")
        cursor = None if raw is None else Cursor.from_json(raw)
        num_workers, worker_id = _loader_worker()
        check_reader(state.get("loader_workers"), cursor, num_workers=num_workers, worker_id=worker_id,
                     num_replicas=self.config.num_replicas, rank=self.config.rank)
        self._live, self._pending, self._claimed, self._provisional = None, None, False, False
        if epoch < self._clock.epoch:  # epoch e is done; the newer epoch (shared with workers) is left as it is
            # With workers this is how torchdata resumes a loader state whose epoch had ended: these workers are
            # thrown away after a prefetch and fresh ones start the epoch again, so this start must not count.
            self._provisional = num_workers > 0
            return
        # A finished reader has started its epoch (its next iter() starts the next one); one in the middle has not.
        self._clock.mark(EpochClock.slot(num_workers, worker_id), epoch, started=cursor is not None and cursor.done)
        if cursor is not None:
            self._pending = _json_copy(state)

    # ------------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        # A loaded state goes to the first iterator made after loading. torchdata makes a second one without
        # running the first when the loaded state had finished its epoch: that one starts the next epoch.
        state = None if self._claimed else self._pending
        self._claimed = self._pending is not None
        return self._iterate(state)

    def _iterate(self, state: Optional[dict[str, Any]]) -> Iterator[dict]:
        self._pending, self._claimed = None, False
        num_workers, worker_id = _loader_worker()
        slot = EpochClock.slot(num_workers, worker_id)
        cur = None if state is None else Cursor.from_json(state["cursor"])
        if cur is not None and cur.epoch == self._clock.epoch:  # not discarded by a set_epoch since the load
            self._clock.mark(slot, cur.epoch, started=True)
        else:
            epoch = self._clock.start(slot, record=not self._provisional)
            cur = Cursor(epoch, max(1, num_workers), worker_id, self.config.num_replicas, self.config.rank,
                         num_workers=num_workers)
        self._provisional = False
        self._live, self._live_generation = cur, self._clock.generation
        if cur.done:
            self.stats = copy_stats(cur.stats or fresh_stats())
            return
        plan = partition(self.config.layout, rank=self.config.rank, num_workers=cur.readers, worker_id=worker_id,
                         epoch=cur.epoch)
        yield from read_epoch(self._reader, plan, self.config.stages_for_epoch(cur.epoch), cur,
                              lambda stats: setattr(self, "stats", stats))

    def __repr__(self) -> str:
        c = self.config
        return (f"WeightedWebDataset({len(c.urls)} shards, split={c.split!r}, rank={c.rank}/{c.num_replicas}, "
                f"samples_per_rank={c.samples_per_rank}, shuffle={c.shuffle}, seed={c.seed}, balance={c.balance})")


def _loader_worker() -> tuple[int, int]:
    """``(num_workers, worker_id)`` of the DataLoader worker running this; ``(0, 0)`` in the main process."""
    info = get_worker_info()
    return (0, 0) if info is None else (info.num_workers, info.id)


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
         'oversized': 0, 'events': [...], 'readers': 2}
    """
    total = fresh_stats()
    total["readers"] = 0

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("format") == _STATE_FORMAT:
                cur = node.get("cursor")
                st = cur.get("stats") if isinstance(cur, dict) else None
                if st is not None:
                    total["readers"] += 1
                    for k in STAT_KEYS:
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
