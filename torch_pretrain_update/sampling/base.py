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
  ``{"epoch": e, "position": p}`` (indices of this rank's stream already handed out in epoch ``e``) and
  ``load_state_dict`` makes the next ``iter()`` continue at ``p`` without replaying anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from torch_pretrain_update._checks import check_bool, check_int
from torch_pretrain_update._dist import resolve_replicas

__all__: list[str] = []  # private module


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
        self._pending_position = 0  # set by load_state_dict, consumed by the next __iter__

    # ----- what subclasses provide -------------------------------------------------------------------------
    def _plan_length(self) -> int:
        """Length of the global plan of one epoch."""
        raise NotImplementedError

    def _plan(self, epoch: int) -> torch.Tensor:
        """The whole global plan of ``epoch`` as a 1-D int64 tensor of length ``_plan_length()``."""
        raise NotImplementedError

    def _plan_chunks(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of the global plan from position ``start`` to its end.

        The default slices :meth:`_plan` (cached for the current epoch). Override for chunked generation.
        """
        plan = self._cached_plan(epoch)
        yield plan[start:]

    def _cached_plan(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_plan_cache", None)
        if cache is None or cache[0] != (epoch, self._plan_version()):
            cache = ((epoch, self._plan_version()), self._plan(epoch))
            self._plan_cache = cache
        return cache[1]

    def _plan_version(self) -> Any:
        """Anything that changes when the plan's inputs change (e.g. after ``update``); invalidates the cache."""
        return None

    # ----- rank split ---------------------------------------------------------------------------------------
    def _rank_length(self) -> int:
        n = self._plan_length()
        if self.drop_last:
            return n // self.num_replicas
        return math.ceil(n / self.num_replicas)

    def __len__(self) -> int:
        return self._rank_length()

    def __iter__(self) -> Iterator[int]:
        start = self._pending_position
        self._pending_position = 0
        return self._iter_from(self.epoch, start)

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

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e, "position": p}``: plain ints, JSON-serialisable."""
        return {self._STATE_EPOCH: self.epoch, self._STATE_POSITION: self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["position"]`` of epoch ``state["epoch"]`` on the next ``iter()``."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict; got {type(state).__name__}")
        for key in (self._STATE_EPOCH, self._STATE_POSITION):
            if key not in state:
                raise ValueError(f"state is missing key {key!r}; got keys {sorted(state)}")
        epoch = check_int(state[self._STATE_EPOCH], "state['epoch']", min_value=0)
        # A position past this rank's length comes from a sampler built differently (other N, budget, ranks):
        # resuming there would silently yield nothing.
        position = check_int(
            state[self._STATE_POSITION], "state['position']", min_value=0, max_value=self._rank_length()
        )
        self.epoch = epoch
        self._pending_position = position
        self._position = self._pending_position
