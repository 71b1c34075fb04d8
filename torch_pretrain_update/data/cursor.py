"""Where a stream reader is: its :class:`Cursor` (saved in the stream's state) and the :class:`EpochClock` shared
by the main process and the DataLoader workers.

The cursor of a reader (one DataLoader worker of one rank) is a segment of its :class:`~.partition.ReaderPlan`
(in a pass over its segments: a reader that must fill a quota goes round again), how many outputs of that
segment were delivered, and a :class:`Snapshot` of the stateful stages and the reader's ``stats`` taken when the
segment started: replaying the segment from the snapshot and skipping the delivered outputs resumes the stream
exactly. ``to_json`` gives plain JSON values; ``from_json`` reads them back (states saved before the cursor was a
class have the same layout and load too) and refuses anything else with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from multiprocessing.context import get_spawning_popen
from typing import Any, Optional

from torch_pretrain_update._checks import check_int, short_repr

__all__ = ["Cursor", "EpochClock", "Snapshot"]

#: DataLoader workers an EpochClock keeps a slot for (torch starts far fewer)
MAX_WORKERS = 1024


def _int(d: dict[str, Any], key: str, where: str) -> int:
    if key not in d:
        raise ValueError(f"{where} lacks {key!r} (got keys {sorted(d)}): not a state from "
                         "WeightedWebDataset.state_dict()")
    return check_int(d[key], f"{where}[{key!r}]", min_value=0)


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a dict; got {short_repr(value)}")
    return value


@dataclass
class Snapshot:
    """A segment's start: the stages' states (None for a stage without ``state_dict``), the reader's ``stats``,
    and the pass outputs and outputs of the epoch delivered before the segment."""

    stages: list[Optional[dict[str, Any]]]
    stats: dict[str, Any]
    pass_outputs: int
    yielded: int

    def to_json(self) -> dict[str, Any]:
        return {"stages": self.stages, "stats": self.stats, "pass_outputs": self.pass_outputs,
                "yielded": self.yielded}

    @classmethod
    def from_json(cls, d: Any) -> Snapshot:
        where = "state['cursor']['snapshot']"
        d = _dict(d, where)
        stages = d.get("stages")
        if not isinstance(stages, list):
            raise ValueError(f"{where}['stages'] must be a list; got {short_repr(stages)}")
        return cls(stages, _dict(d.get("stats"), f"{where}['stats']"), _int(d, "pass_outputs", where),
                   _int(d, "yielded", where))


@dataclass
class Cursor:
    """A reader's position in an epoch.

    ``readers`` and ``worker_id`` are the reader's place in the split (the main process is reader 0 of 1);
    ``num_workers`` is the DataLoader's ``num_workers`` (0 in the main process; None in a state saved before it
    was recorded). ``segment`` indexes the reader's segments in pass ``pass_``; ``seg_yielded`` and
    ``seg_pass_outputs`` count the outputs of the epoch and of the pass delivered before the segment, ``offset``
    those of the segment. ``done``: the reader's part of the epoch is over (``stats`` then holds its final
    counts).
    """

    epoch: int
    readers: int
    worker_id: int
    num_replicas: int
    rank: int
    num_workers: Optional[int] = None
    pass_: int = 0
    segment: int = 0
    seg_yielded: int = 0
    seg_pass_outputs: int = 0
    offset: int = 0
    done: bool = False
    snapshot: Optional[Snapshot] = None
    stats: Optional[dict[str, Any]] = field(default=None)

    @property
    def yielded(self) -> int:
        """Outputs of the epoch delivered so far."""
        return self.seg_yielded + self.offset

    @property
    def pass_outputs(self) -> int:
        """Outputs of the current pass delivered so far."""
        return self.seg_pass_outputs + self.offset

    def to_json(self, live_stats: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Plain JSON values (the keys of the stream's state format 1). ``live_stats``: the reader's counts so far,
        recorded for :func:`~torch_pretrain_update.data.stream.stream_stats` (a resume recounts them from the
        snapshot)."""
        out: dict[str, Any] = {
            "epoch": self.epoch, "num_workers": self.readers, "worker_id": self.worker_id,
            "world_size": self.num_replicas, "rank": self.rank, "loader_workers": self.num_workers,
            "pass": self.pass_, "segment": self.segment, "offset": self.offset, "yielded": self.yielded,
            "pass_outputs": self.pass_outputs, "done": self.done,
            "snapshot": None if self.snapshot is None else self.snapshot.to_json(),
        }
        stats = self.stats if self.done else live_stats
        if stats is not None:
            out["stats"] = stats
        return out

    @classmethod
    def from_json(cls, d: Any) -> Cursor:
        """A cursor from :meth:`to_json` (through JSON); ``ValueError`` naming the field for anything else."""
        where = "state['cursor']"
        d = _dict(d, where)
        done = d.get("done")
        if not isinstance(done, bool):
            raise ValueError(f"{where}['done'] must be a bool; got {short_repr(done)}")
        offset, yielded, pass_outputs = _int(d, "offset", where), _int(d, "yielded", where), _int(d, "pass_outputs",
                                                                                                   where)
        if offset > min(yielded, pass_outputs):
            raise ValueError(f"{where}: offset={offset} exceeds yielded={yielded} or pass_outputs={pass_outputs}")
        workers = d.get("loader_workers")
        snap = d.get("snapshot")
        if snap is None and not done:
            raise ValueError(f"{where}['snapshot'] is missing for a reader in the middle of its epoch")
        stats = d.get("stats")
        return cls(
            epoch=_int(d, "epoch", where), readers=_int(d, "num_workers", where), worker_id=_int(d, "worker_id", where),
            num_replicas=_int(d, "world_size", where), rank=_int(d, "rank", where),
            num_workers=None if workers is None else check_int(workers, f"{where}['loader_workers']", min_value=0),
            pass_=_int(d, "pass", where), segment=_int(d, "segment", where), seg_yielded=yielded - offset,
            seg_pass_outputs=pass_outputs - offset, offset=offset, done=done,
            snapshot=None if snap is None else Snapshot.from_json(snap),
            stats=None if stats is None else _dict(stats, f"{where}['stats']"),
        )


class EpochClock:
    """The epoch each reader of a stream starts, shared by the main process and its DataLoader workers.

    ``set(e)`` (the user's ``set_epoch``): every reader's next start is epoch ``e``. Otherwise a reader that
    starts again after starting epoch ``e`` starts ``e + 1``: epochs advance by themselves, each reader keeping
    count of its own starts (reader slot 0 is the main process, slot ``1 + w`` DataLoader worker ``w``), so the
    workers of one loader, started once per ``iter(loader)``, agree without talking to each other. The values
    live in shared memory (``multiprocessing`` raw values inherited by forked workers and passed to spawned ones
    while they start), so the main process's ``set`` reaches persistent workers and the workers' starts are
    counted in the main process for the workers of the next ``iter(loader)``. ``generation`` counts the ``set``
    calls. Pickled or copied anywhere else, the clock travels as plain numbers.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._epoch = multiprocessing.RawValue("q", epoch)  # the latest epoch set or started
        self._generation = multiprocessing.RawValue("q", 0)
        self._started = multiprocessing.RawArray("q", [-1] * (MAX_WORKERS + 1))  # per slot; -1: none since set

    @property
    def epoch(self) -> int:
        """The latest epoch set or started."""
        return int(self._epoch.value)

    @property
    def generation(self) -> int:
        """How many times :meth:`set` was called."""
        return int(self._generation.value)

    def set(self, epoch: int) -> None:
        """Every reader's next start is ``epoch``."""
        self._epoch.value = epoch
        self._generation.value += 1
        self._started[:] = [-1] * len(self._started)

    def next_epoch(self, slot: int) -> int:
        """The epoch reader ``slot``'s next start would begin."""
        epoch, started = int(self._epoch.value), int(self._started[slot])
        return started + 1 if started >= epoch else epoch

    def start(self, slot: int, *, record: bool = True) -> int:
        """The epoch reader ``slot`` starts now, recorded (its next start is the one after) unless ``record`` is
        False (a start that may be thrown away: it leaves the clock as it was)."""
        epoch = self.next_epoch(slot)
        if record:
            self.mark(slot, epoch, started=True)
        return epoch

    def mark(self, slot: int, epoch: int, *, started: bool) -> None:
        """Set the clock to ``epoch`` (a loaded state's) with reader ``slot`` having started it (its next start is
        ``epoch + 1``) or not (its next start is ``epoch``)."""
        if epoch > self._epoch.value:
            self._epoch.value = epoch
        self._started[slot] = epoch if started else -1

    @staticmethod
    def slot(num_workers: int, worker_id: int) -> int:
        """Reader slot of DataLoader worker ``worker_id`` (``num_workers=0``: the main process)."""
        if num_workers == 0:
            return 0
        if worker_id >= MAX_WORKERS:
            raise ValueError(f"DataLoader worker {worker_id}: a stream supports at most {MAX_WORKERS} workers")
        return 1 + worker_id

    def __getstate__(self) -> dict[str, Any]:
        if get_spawning_popen() is not None:  # starting a worker: share the memory
            return dict(self.__dict__)
        return {"_epoch": self.epoch, "_generation": self.generation, "_started": list(self._started)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_epoch"], int):
            state = {"_epoch": multiprocessing.RawValue("q", state["_epoch"]),
                     "_generation": multiprocessing.RawValue("q", state["_generation"]),
                     "_started": multiprocessing.RawArray("q", state["_started"])}
        self.__dict__.update(state)


def check_reader(saved_workers: Optional[int], cursor: Optional[Cursor], *, num_workers: int, worker_id: int,
                 num_replicas: int, rank: int) -> None:
    """Refuse (``ValueError``) a state saved by another reader: another DataLoader ``num_workers`` (the state of a
    stream is kept per worker; torchdata itself would stop at a bare ``AssertionError``), worker or rank.

    ``saved_workers``: the ``num_workers`` the state records (None in states saved before it was recorded; the
    cursor's split is compared then, which tells 0 and 1 worker apart from more but not from each other).
    """
    if saved_workers is None and cursor is not None:
        saved_workers = cursor.num_workers
    if saved_workers is not None:
        same = saved_workers == num_workers
    else:
        same = cursor is None or cursor.readers == max(1, num_workers)
    if not same:
        readers = cursor.readers if cursor is not None else 1
        saved = saved_workers if saved_workers is not None else readers if readers > 1 else "0 or 1"
        raise ValueError(
            f"state was saved by a DataLoader with num_workers={saved}; this one has num_workers={num_workers}. A "
            f"stream keeps its position per DataLoader worker, so its state resumes only with the same number: "
            f"build the loader with num_workers={saved}, or start without the loader's state (the interrupted "
            "epoch is then read again from its start)"
        )
    if cursor is None:
        return
    if cursor.worker_id != worker_id or (cursor.num_replicas, cursor.rank) != (num_replicas, rank):
        raise ValueError(
            f"state was saved by worker {cursor.worker_id} of rank {cursor.rank} (of {cursor.num_replicas}); this "
            f"is worker {worker_id} of rank {rank} (of {num_replicas}): a stream's position is per rank and worker, "
            "so each rank loads the state it saved, into a loader with the same num_workers"
        )
