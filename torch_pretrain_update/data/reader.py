"""Reading one segment of a stream: strict tar reading, count and histogram checks against the manifest, the
per-shard buffer shuffle, the segment's positions, required keys, decoding and label checks, with every problem
routed through the stream's handler and counted in the reader's ``stats``."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
from webdataset.handlers import reraise_exception

from torch_pretrain_update._rng import STREAM_SHARD_SHUFFLE, epoch_generator
from torch_pretrain_update.data.cursor import Cursor, Snapshot
from torch_pretrain_update.data.errors import DamagedShardError, MalformedSampleError, SizeLimitError, sample_location
from torch_pretrain_update.data.labels import parse_label
from torch_pretrain_update.data.partition import ReaderPlan, Segment
from torch_pretrain_update.data.stages import BadSampleError
from torch_pretrain_update.data.stream_config import StreamConfig
from torch_pretrain_update.data.tar_reader import shard_samples

__all__ = ["STAT_KEYS", "ShardReader", "copy_stats", "fresh_stats", "read_epoch"]

logger = logging.getLogger("torch_pretrain_update.data.stream")

#: the counts of a reader's ``stats`` (besides ``events``)
STAT_KEYS = ("samples", "skipped_samples", "missing_samples", "shard_errors", "padded_samples", "oversized")
#: messages kept in ``stats["events"]``
MAX_EVENTS = 50


def fresh_stats() -> dict[str, Any]:
    stats: dict[str, Any] = dict.fromkeys(STAT_KEYS, 0)
    stats["events"] = []
    return stats


def copy_stats(stats: dict[str, Any]) -> dict[str, Any]:
    out = {**fresh_stats(), **stats}  # a key added since the state was saved starts at 0
    out["events"] = list(stats["events"])
    return out


def buffer_shuffle(src: Iterator[Any], size: int, gen: torch.Generator) -> Iterator[Any]:
    """Buffer shuffle driven by a torch generator.

    Hand-written because webdataset's ``shuffle`` stage draws from a ``random.Random`` and starts yielding
    before its buffer is full; here the order must be a pure function of the generator and the input so that a
    shard can be replayed exactly on resume. Uniforms are drawn in blocks (one torch call per 1024 samples).
    """
    buf: list[Any] = []
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


class ShardReader:
    """Reads segments of a stream's shards for one reader; see :meth:`segment`."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config

    def event(self, stats: dict[str, Any], message: str) -> None:
        if len(stats["events"]) < MAX_EVENTS:
            stats["events"].append(message)

    def handle(self, exc: BaseException) -> bool:
        """Run the handler on ``exc``: raises (default), or returns True (skip) / False (skip, stop the shard)."""
        handler = self.config.handler if self.config.handler is not None else reraise_exception
        return bool(handler(exc))

    def segment(self, seg: Segment, epoch: int, stats: dict[str, Any]) -> Iterator[dict]:
        """The decoded, checked samples of one segment (each with ``"__index__"`` when the shard offsets are
        known); damage and bad samples go to the handler and are counted in ``stats``."""
        return self._checked(self._positions(seg, epoch, stats), self.config.urls[seg.shard], stats)

    def _raw(self, shard: int, stats: dict[str, Any]) -> Iterator[Any]:
        """Raw samples of a shard in written order, checked against the manifest count and, when read to its end,
        the manifest's class histogram (the class weights come from it); damage -> handler."""
        cfg = self.config
        url, info = cfg.urls[shard], cfg.infos[shard]
        offset = None if cfg.offsets is None else cfg.offsets[shard]
        try:
            samples = shard_samples(url, expected=None if info is None else info.count,
                                    max_member_bytes=cfg.max_member_bytes, max_ratio=cfg.max_ratio)
            want = None
            if info is not None and info.class_counts and cfg.manifest is not None \
                    and cfg.manifest.label_key == cfg.label_key:
                want = {c: n for c, n in enumerate(info.class_counts) if n}
            got: dict[int, int] = {}
            readable = True  # False after a missing, unparsable or out-of-range label (the sample checks report it)
            for pos, raw in enumerate(samples):
                if isinstance(raw, MalformedSampleError):  # refused in _checked; its label is unknown
                    readable = False
                    yield raw
                    continue
                if offset is not None:
                    raw["__index__"] = offset + pos
                if want is not None:
                    c = self._histogram_label(raw.get(cfg.label_key))
                    if c < cfg.num_classes:
                        got[c] = got.get(c, 0) + 1
                    else:
                        readable = False
                yield raw
            if want is not None and readable and got != want:
                raise DamagedShardError(
                    url, f"class histogram {dict(sorted(got.items()))} of the labels read differs from the "
                         f"manifest's {want}: the manifest's class counts (which give the class weights) are wrong")
        except DamagedShardError as error:
            self.handle(error)  # raises by default
            stats["shard_errors"] += 1
            stats["oversized"] += isinstance(error, SizeLimitError)
            self.event(stats, str(error))

    def _histogram_label(self, label: Any) -> int:
        """The class of an undecoded label for the histogram check; ``num_classes`` when it is not one."""
        try:
            # ASCII digits (what write_shards stores) cost one int(); anything else goes to parse_label
            return int(label) if type(label) is bytes and label.isdigit() else parse_label(label)
        except ValueError:
            return self.config.num_classes

    def _positions(self, seg: Segment, epoch: int, stats: dict[str, Any]) -> Iterator[Any]:
        """The segment's raw samples: positions ``[start, stop)`` of the shard's (shuffled) order, or the
        ``picks`` of an indices plan (the written order; a position picked twice comes twice, the second time
        as a copy)."""
        cfg = self.config
        src: Iterator[Any] = self._raw(seg.shard, stats)
        if cfg.shuffle and seg.picks is None:
            src = buffer_shuffle(src, cfg.shuffle_buffer, epoch_generator(cfg.seed, epoch, STREAM_SHARD_SHUFFLE,
                                                                          seg.shard))
        picks = seg.picks
        want = seg.stop - seg.start if seg.stop is not None else None
        taken = j = 0
        for pos, sample in enumerate(src):
            if seg.stop is not None and pos >= seg.stop:
                break
            if pos < seg.start:
                continue
            if picks is None:
                taken += 1
                yield sample
                continue
            first = True
            while j < len(picks) and picks[j] == pos:
                j += 1
                yield sample if first or not isinstance(sample, dict) else dict(sample)
                first = False
            if j == len(picks):
                break
        info = cfg.infos[seg.shard]
        if picks is not None:
            stats["missing_samples"] += len(picks) - j
        elif want is not None:
            stats["missing_samples"] += max(0, want - taken)
        elif info is not None:
            stats["missing_samples"] += max(0, info.count - taken)

    def _checked(self, src: Iterator[Any], url: str, stats: dict[str, Any]) -> Iterator[dict]:
        """Required keys, decoding and label checks; bad samples -> handler."""
        cfg = self.config
        label_key, nc, decoder, required = cfg.label_key, cfg.num_classes, cfg.decoder, cfg.required_keys
        for raw in src:
            try:
                if isinstance(raw, MalformedSampleError):  # member names that cannot form a sample
                    raise raw
                missing = [k for k in required if k not in raw]
                if missing:
                    present = sorted(k for k in raw if not k.startswith("__"))
                    raise BadSampleError(
                        f"{sample_location(raw.get('__key__'), url)}: missing member(s) {missing} (has {present})",
                        sample_key=raw.get("__key__"), url=url, field=missing[0])
                sample = decoder(raw)
                try:
                    sample[label_key] = parse_label(sample[label_key], nc)
                except ValueError as exc:
                    raise BadSampleError(f"{sample_location(raw.get('__key__'), url, label_key)}: {exc}",
                                         sample_key=raw.get("__key__"), url=url, field=label_key) from None
                if "__index__" in raw:  # a custom decoder may leave it out
                    sample["__index__"] = raw["__index__"]
            except Exception as exc:
                keep_going = self.handle(exc)
                stats["skipped_samples"] += 1
                stats["oversized"] += isinstance(exc, SizeLimitError)
                msg = str(exc)
                if url not in msg:
                    key = raw.get("__key__") if isinstance(raw, dict) else getattr(raw, "key", None)
                    msg = f"{sample_location(key, url)}: {msg}"
                self.event(stats, msg)
                if not keep_going:  # "stop": the rest of this shard range is skipped, and counted
                    rest = sum(1 for _ in src)
                    stats["skipped_samples"] += rest
                    self.event(stats, f"shard {url!r}: the handler stopped the shard; {rest} more sample(s) skipped")
                    return
                continue
            yield sample

    def log_epoch_end(self, epoch: int, worker_id: int, stats: dict[str, Any]) -> None:
        counts = {k: stats[k] for k in STAT_KEYS}
        lossy = any(stats[k] for k in ("skipped_samples", "missing_samples", "shard_errors"))
        level = logging.WARNING if lossy else logging.INFO
        logger.log(level, "WeightedWebDataset epoch %d rank %d worker %d: %s%s", epoch, self.config.rank, worker_id,
                   counts, f"; first events: {stats['events'][:3]}" if lossy else "")


def _state_of(stage: Any) -> Any:
    return stage.state_dict() if callable(getattr(stage, "state_dict", None)) else None


def read_epoch(reader: ShardReader, plan: ReaderPlan, stages: list[Any], cur: Cursor,
               publish: Callable[[dict[str, Any]], None]) -> Iterator[dict]:
    """A reader's samples of epoch ``cur.epoch`` from the cursor ``cur`` on (a fresh one: from the start),
    through ``stages`` (applied per segment), ``plan.quota`` of them (going round its segments again as padding
    when they run short; None: one pass). ``cur`` is kept current as samples are delivered (the stream's state
    reads it), and ``publish`` receives the live ``stats`` dict whenever it is replaced.

    Resuming replays the cursor's segment from its snapshot (stages' states and stats at the segment's start),
    skipping the ``cur.offset`` outputs already delivered, so the stream and the stats equal the unbroken run's.
    """
    quota, segments = plan.quota, plan.segments
    stats = fresh_stats()
    publish(stats)
    skip, snap = cur.offset, cur.snapshot
    yielded, pass_outputs = cur.seg_yielded, cur.seg_pass_outputs
    while quota is None or yielded < quota:
        while cur.segment < len(segments):
            if snap is not None:  # resuming into this segment: restore its start
                for stage, st in zip(stages, snap.stages):
                    if st is not None:
                        stage.load_state_dict(st)
                stats = copy_stats(snap.stats)
                publish(stats)
                yielded, pass_outputs = snap.yielded, snap.pass_outputs
            cur.snapshot = Snapshot([_state_of(s) for s in stages], copy_stats(stats), pass_outputs, yielded)
            cur.seg_yielded, cur.seg_pass_outputs, cur.offset = yielded, pass_outputs, 0
            limit = quota - yielded if quota is not None else math.inf
            padding = cur.pass_ > 0
            # Damage met again while padding (pass > 0) was counted in pass 0: count it once.
            seg_stats = fresh_stats() if padding else stats
            it = reader.segment(segments[cur.segment], cur.epoch, seg_stats)
            for stage in stages:
                it = stage(it)
            k = 0
            for sample in it:
                if k >= limit:
                    break
                k += 1
                stats["samples"] += 1
                stats["padded_samples"] += padding
                if k <= skip:
                    continue
                cur.offset = k
                yield sample
            skip, snap = 0, None
            yielded, pass_outputs = yielded + k, pass_outputs + k
            cur.segment += 1
            if quota is not None and yielded >= quota:
                break
        if quota is None or yielded >= quota:
            break
        if pass_outputs == 0:
            raise ValueError(
                f"rank {reader.config.rank}, worker {cur.worker_id}: a full pass over its {len(segments)} shard "
                f"range(s) yielded no sample, so samples_per_rank={reader.config.samples_per_rank} cannot be filled "
                f"(see stats: { {k: stats[k] for k in STAT_KEYS} })"
            )
        cur.pass_, cur.segment, pass_outputs = cur.pass_ + 1, 0, 0
    cur.seg_yielded, cur.seg_pass_outputs, cur.offset = yielded, pass_outputs, 0
    cur.done, cur.snapshot, cur.stats = True, None, copy_stats(stats)
    reader.log_epoch_end(cur.epoch, cur.worker_id, stats)
