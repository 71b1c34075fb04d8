"""The machinery every sampler shares: global plan -> rank split -> resumable position.

A subclass describes one epoch's **global plan** (the indices for all ranks together, a pure function of its
inputs, ``seed`` and ``epoch``) by implementing :meth:`PlanSampler._plan_length` and either
:meth:`PlanSampler._plan` (the whole plan as one tensor) or, for plans too large to materialise up front,
:meth:`PlanSampler._plan_chunks` (consecutive chunks from a given position, each regenerable on its own).

This base class then

- splits the plan across ranks exactly like ``torch.utils.data.DistributedSampler``: rank ``r`` of ``W`` takes
  positions ``r, r + W, r + 2W, ...`` of the plan padded by repeating its start (``drop_last=False``) or
  truncated to a multiple of ``W`` (``drop_last=True``), so every rank has the same length;
- implements the ``Stateful`` protocol of ``torchdata.stateful_dataloader``: ``state_dict()`` is
  ``{"epoch": e, "position": p, "config": {...}}`` (``p`` = indices of this rank's stream already handed out in
  epoch ``e``; ``config`` = what the plan depends on, see :meth:`PlanSampler._config`) and ``load_state_dict``
  makes the next ``iter()`` continue at ``p`` without replaying anything.

**Epoch boundaries.** torchdata's ``StatefulDataLoader.load_state_dict`` only stores the state; the sampler gets
it when the next ``iter(loader)`` starts, i.e. *after* the resumed loop's ``set_epoch(e + 1)``. So a state of
epoch ``e`` that reaches a sampler already set to a later epoch means "epoch ``e`` is finished": the sampler stays
at its own epoch, from the start (as when ``set_epoch`` follows ``load_state_dict``), and nothing is replayed. A
checkpoint taken after an epoch's loop (or right after the next ``set_epoch``) therefore resumes exactly, with 0 or
more workers, whether the last batch was full or dropped. To go back to an earlier epoch on a live sampler, call
``set_epoch`` with the state's epoch (before or after loading).

**A state belongs to its sampler.** ``load_state_dict`` refuses (``ValueError``, naming what differs) a state
whose ``config`` differs from this sampler's: other size, ``seed``, ``shuffle``, ``drop_last``, ``num_replicas``,
or other weights/scores/labels/``exclude`` (compared by hash). ``rank`` is not part of it: in lockstep every rank
has the same position, so a checkpoint saved by rank 0 may be loaded on every rank. A state without ``config``
(saved by an earlier version) is loaded unchecked.

**Epochs: set by the user, or advancing by themselves.** Most samplers behave like ``DistributedSampler``: every
``iter()`` yields the plan of ``self.epoch``, the same until ``set_epoch`` changes it, so every rank of a
distributed job iterates the same epoch whatever extra ``iter()`` calls a framework makes (a sanity check, a
length probe) and a loop that calls ``set_epoch(epoch)`` gets exactly that epoch. A sampler that stands in for
one drawing afresh on every iteration (``WeightedSampler`` for ``WeightedRandomSampler``) sets
``_advances_epoch``: an iteration started after another one of the same epoch began, with no ``set_epoch`` or
``load_state_dict`` in between, runs the next epoch (epoch ``e + 1``, deterministically). ``set_epoch`` still
wins. The state records the epoch as always and resumes as an unbroken run goes on: the next iteration
continues the state's epoch at its position (nothing left if the state was taken at its end) and the one after
runs the next epoch; a state saved after the epoch's loop had ended (``StatefulDataLoader`` then drops the
restored iterator unused and makes a new one) resumes directly at the next epoch. An iterator counts as begun at
its first ``next()``, not at ``iter()``: ``StatefulDataLoader`` makes sampler iterators that it drops unused
(before it loads a state, or when the restored epoch had ended), and those neither advance the epoch nor take a
pending resume position.

**Index subsets.** A sampler given ``indices`` (``ClassBalancedSampler``, ``WeightedSampler``) runs its plan over
positions ``0 .. len(indices) - 1`` and yields ``indices[position]``: a selection feeds a second sampler
without copying data. ``indices`` is part of the state's ``config``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from torch_pretrain_update._checks import check_bool, check_int
from torch_pretrain_update._dist import resolve_replicas
from torch_pretrain_update._state import check_config, tensor_digest

__all__: list[str] = []  # private module

#: indices handed from a materialised plan to the rank split at a time (not part of any plan's definition)
HANDOUT_CHUNK = 1 << 16


def ramp(chunks: Iterator[torch.Tensor], first: int = 1024) -> Iterator[torch.Tensor]:
    """The same indices, with the first ones re-cut into pieces of ``first, 2*first, ...`` up to
    :data:`HANDOUT_CHUNK`.

    The rank split turns each piece into Python ints (``tolist``) before yielding its first index; small first
    pieces make the first index come sooner. The stream is unchanged.
    """
    size = first
    for chunk in chunks:
        a = 0
        while size < HANDOUT_CHUNK and a < chunk.numel():
            yield chunk[a : a + size]
            a += size
            size *= 2
        if a < chunk.numel():
            yield chunk[a:]


def hand_out(plan: torch.Tensor, start: int) -> Iterator[torch.Tensor]:
    """``plan[start:]`` in pieces (ramped, then :data:`HANDOUT_CHUNK` each): the one way a materialised plan
    reaches the rank split."""
    return ramp(plan[a : a + HANDOUT_CHUNK] for a in range(start, plan.numel(), HANDOUT_CHUNK))


class PlanSampler(Sampler[int]):
    """Base class: see the module docstring. Not used directly.

    Args:
        seed: base seed; each epoch's plan uses a fresh generator seeded from ``(seed, epoch)``. Every rank
            must pass the same seed.
        shuffle: shuffle the plan's order each epoch (the *set* of indices is unaffected unless a subclass says
            otherwise).
        num_replicas: number of ranks; defaults to the initialised process group's world size, else 1.
        rank: this rank; defaults to the initialised process group's rank, else 0.
        drop_last: truncate the plan to a multiple of ``num_replicas`` instead of padding it.
    """

    _STATE_EPOCH = "epoch"
    _STATE_POSITION = "position"
    _STATE_CONFIG = "config"
    #: whether an iteration after a begun one runs the next epoch by itself (see "Epochs" above)
    _advances_epoch = False

    def __init__(
        self,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.seed = check_int(seed, "seed")
        self.shuffle = check_bool(shuffle, "shuffle")
        self.drop_last = check_bool(drop_last, "drop_last")
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        self.epoch = 0
        self._position = 0  # indices of this rank's stream handed out in the current epoch
        self._pending_position = 0  # set by load_state_dict, taken by the next iteration
        # Samplers whose epochs advance only: whether an iteration of self.epoch began, the number of iterators
        # made so far, and for the last load_state_dict: (iterators made before it, its position was at the
        # epoch's end, its epoch was older than this sampler's).
        self._epoch_begun = False
        self._iterators = 0
        self._loaded: tuple[int, bool, bool] | None = None
        self._index_map: torch.Tensor | None = None  # ``indices`` of a sampler over an index subset

    # ----- what subclasses provide -------------------------------------------------------------------------
    def _plan_length(self) -> int:
        """Length of the global plan of one epoch."""
        raise NotImplementedError

    def _plan(self, epoch: int) -> torch.Tensor:
        """The whole global plan of ``epoch`` as a 1-D int64 tensor of length ``_plan_length()``."""
        raise NotImplementedError

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of the global plan from position ``start`` to its end.

        The default hands out :meth:`_plan` (cached for the current epoch). Override for chunked generation.
        """
        return hand_out(self._cached_plan(epoch), start)

    def _cached_plan(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_plan_cache", None)
        if cache is None or cache[0] != (epoch, self._plan_version()):
            cache = ((epoch, self._plan_version()), self._plan(epoch))
            self._plan_cache = cache
        return cache[1]

    def _plan_version(self) -> Any:
        """Anything that changes when the plan's inputs change (e.g. after ``update``); invalidates the cache."""
        return None

    def _config(self) -> dict[str, Any]:
        """What the global plan and the rank split depend on, as plain JSON values (large inputs as
        :meth:`_digest`); recorded in the state and compared on load. Subclasses add their inputs. Not ``rank``:
        a lockstep state is valid on every rank."""
        config = {
            "type": type(self).__name__,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
        }
        if self._index_map is not None:  # absent otherwise: states saved before indices existed stay valid
            config["indices"] = self._digest("indices", self._index_map)
        return config

    def _digest(self, name: str, *tensors: torch.Tensor | None) -> str:
        """Hash of ``tensors`` (an input that never changes after construction), computed once per ``name``."""
        cache = self.__dict__.setdefault("_digests", {})
        if name not in cache:
            cache[name] = tensor_digest(*tensors)
        return cache[name]

    # ----- rank split ---------------------------------------------------------------------------------------
    def _rank_length(self) -> int:
        n = self._plan_length()
        if self.drop_last:
            return n // self.num_replicas
        return math.ceil(n / self.num_replicas)

    def __len__(self) -> int:
        return self._rank_length()

    def __iter__(self) -> Iterator[int]:
        self._iterators += 1
        return self._iterate(self._iterators)

    def _iterate(self, ordinal: int) -> Iterator[int]:
        # Runs at the first next(), not at iter(): see "Epochs" in the module docstring.
        loaded = self._loaded
        if loaded is not None and loaded[2] and ordinal == loaded[0] + 1:
            pass  # the iterator StatefulDataLoader restores for a state of an older, finished epoch: not counted
        else:
            if self._advances_epoch and self._next_epoch_due(ordinal):
                self.epoch += 1
                self._pending_position = 0
            self._epoch_begun = True
            self._loaded = None
        start = self._pending_position
        self._pending_position = 0
        yield from self._iter_from(self.epoch, start)

    def _next_epoch_due(self, ordinal: int) -> bool:
        """Whether the iteration made ``ordinal``-th starts the next epoch (samplers whose epochs advance)."""
        if self._epoch_begun:  # another iteration of this epoch began since the last set_epoch / load
            return True
        # After a load: the first iterator made continues the state's epoch. A later one, with none begun in
        # between, means StatefulDataLoader dropped the restored iterator because the epoch had ended.
        loaded = self._loaded
        return loaded is not None and loaded[1] and not loaded[2] and ordinal > loaded[0] + 1

    def _iter_from(self, epoch: int, start: int) -> Iterator[int]:
        length = self._plan_length()
        per_rank = self._rank_length()
        world = self.num_replicas
        total = per_rank * world  # padded (or truncated) plan length
        self._position = min(start, per_rank)
        need = self.rank + self._position * world  # next position wanted in the padded plan
        while need < total:
            pos = need  # padded position of the first chunk (plan position need % length)
            for chunk in self._plan_chunks(epoch, need % length):
                end = min(pos + chunk.numel(), total)
                if need < end:
                    picked = chunk[need - pos : end - pos : world]
                    if self._index_map is not None:  # plan positions -> dataset indices
                        picked = self._index_map[picked]
                    for idx in picked.tolist():
                        self._position += 1
                        yield idx
                    need += world * picked.numel()
                pos += chunk.numel()
                if need >= total:
                    break
            # the plan ended: padding continues from its start

    # ----- epochs and state ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next ``iter()``. A pending resume position survives only for the same epoch."""
        epoch = check_int(epoch, "epoch", min_value=0)
        if epoch != self.epoch:
            self._pending_position = 0
            self._position = 0
        self.epoch = epoch
        # the next iteration runs this epoch, also where epochs advance by themselves
        self._epoch_begun = False
        self._loaded = None

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e, "position": p, "config": {...}}``: plain values, JSON- and
        ``torch.load(weights_only=True)``-safe."""
        return {self._STATE_EPOCH: self.epoch, self._STATE_POSITION: self._position, self._STATE_CONFIG: self._config()}

    def _check_state(self, state: Any) -> None:
        """Type, keys and config of a state (see the module docstring)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        for key in (self._STATE_EPOCH, self._STATE_POSITION):
            if key not in state:
                raise ValueError(f"state is missing key {key!r}; got keys {sorted(state)}")
        check_config(state.get(self._STATE_CONFIG), self._config())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["position"]`` of epoch ``state["epoch"]`` on the next ``iter()``.

        If this sampler is already at a later epoch (the resumed loop's ``set_epoch`` ran first, as it does under
        ``StatefulDataLoader``), the state's epoch counts as finished: the sampler keeps its epoch, from the start.
        Where epochs advance by themselves, see "Epochs" in the module docstring for what follows a state taken
        at an epoch's end.

        Raises:
            ValueError: the state was saved by a sampler built differently (its ``config`` says what differs),
                or its position is past this rank's length.
        """
        self._check_state(state)
        epoch = check_int(state[self._STATE_EPOCH], "state['epoch']", min_value=0)
        # A position past this rank's length comes from a sampler built differently (other N, budget, ranks):
        # resuming there would silently yield nothing.
        position = check_int(
            state[self._STATE_POSITION], "state['position']", min_value=0, max_value=self._rank_length()
        )
        if epoch < self.epoch:
            # torchdata applied the state after the loop's set_epoch(e + 1): epoch e is done, the newer one wins
            self._pending_position = 0
            self._position = 0
            self._epoch_begun = False
            self._loaded = (self._iterators, True, True)
            return
        self.epoch = epoch
        self._pending_position = position
        self._position = self._pending_position
        self._epoch_begun = False
        self._loaded = (self._iterators, position >= self._rank_length(), False)
