"""One-pass selection of ``k`` samples of a finite stream by score (:func:`select_by_entropy`; see
:mod:`torch_pretrain_update.data.stages`)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_choice, check_int, check_str
from torch_pretrain_update._rng import KEYED_ACCEPT, keyed_uniform
from torch_pretrain_update.data.stages.base import (
    Handler,
    Sample,
    _bad,
    _check_seed,
    _float_score,
    _ident,
    _score_of,
    _Stage,
)
from torch_pretrain_update.scoring.scores import SCORE_NAMES

__all__ = ["select_by_entropy", "SelectStage"]


class SelectStage(_Stage):
    """Stage: choose ``k`` samples of a finite stream in one pass with O(k) memory; emit them at its end.

    Args:
        k: number of samples to keep (fewer are emitted if the stream is shorter, or, for ``"reservoir"``,
            has fewer than ``k`` samples of positive weight).
        probs_key: key of stored probabilities/logits; the score is their entropy (or ``score``).
        score_key: key of a precomputed scalar score (exactly one of ``probs_key``/``score_key``).
        mode: ``"topk"``: the ``k`` highest scores exactly; ties are broken by stream position, the earlier
            sample wins. ``"reservoir"``: weighted sampling without replacement with weight = score
            (Efraimidis-Spirakis A-Res: key ``u ** (1 / w)``, kept in log form ``log(u) / w``; the ``k``
            largest keys win). Weight 0 is never chosen; a negative weight is a bad sample.
        seed: seed of the reservoir's uniforms (a pure function of ``(seed, epoch, position)``, or of
            ``__key__``/``__url__`` with ``rng="key"``).
        from_logits: stored vectors are logits.
        score: ``"entropy"``, ``"margin"`` or ``"least_confidence"`` (with ``probs_key``).
        order: emit the chosen samples in ``"stream"`` order (default) or by descending ``"score"``/key.
        rng: ``"counter"`` (default) or ``"key"``.
        handler: webdataset exception handler for bad samples; skipped ones are counted in ``stats["skipped"]``.

    A checkpoint taken while the chosen samples are being emitted records how many were emitted
    (``state_dict()["partial"]``); the resumed stage must be fed the same stream again from its start and
    skips them.

    Example::

        >>> stage = select_by_entropy(2, score_key="s")
        >>> [s["__key__"] for s in stage([{"__key__": i, "s": v} for i, v in enumerate([3, 1, 3, 2])])]
        [0, 2]
    """

    def __init__(
        self,
        k: int,
        *,
        probs_key: Optional[str] = None,
        score_key: Optional[str] = None,
        mode: str = "topk",
        seed: int = 0,
        from_logits: bool = False,
        score: str = "entropy",
        order: str = "stream",
        rng: str = "counter",
        handler: Handler = reraise_exception,
    ) -> None:
        super().__init__(handler)
        self.k = check_int(k, "k", min_value=1)
        if (probs_key is None) == (score_key is None):
            raise ValueError(
                f"pass exactly one of probs_key and score_key; got probs_key={probs_key!r}, score_key={score_key!r}"
            )
        self.probs_key = check_str(probs_key, "probs_key", optional=True)
        self.score_key = check_str(score_key, "score_key", optional=True)
        self._field: str = self.score_key or self.probs_key or ""  # the one given
        self.mode = check_choice(mode, "mode", ("topk", "reservoir"))
        self.seed = check_int(seed, "seed")
        if not isinstance(from_logits, (bool, np.bool_)):
            raise TypeError(f"from_logits must be a bool; got {from_logits!r}")
        self.from_logits = bool(from_logits)
        self.score = check_choice(score, "score", SCORE_NAMES)
        self.order = check_choice(order, "order", ("stream", "score"))
        self.rng = check_choice(rng, "rng", ("counter", "key"))
        self.stats.update({"zero_weight": 0})

    def _priority(self, sample: Any) -> Optional[float]:
        if self.score_key is not None:
            s = _float_score(sample, self._field)
        else:
            s = _score_of(sample, self._field, self.score, self.from_logits)
        if self.mode == "topk":
            return s
        if s < 0:
            raise _bad(sample, self._field, f"reservoir weights must be >= 0; got {s}")
        if s == 0.0:
            return None  # inclusion probability 0
        u = keyed_uniform(self.seed, self.epoch, _ident(sample, self.rng, self.position), KEYED_ACCEPT)
        # A-Res key u^(1/w), compared in log space: log(u) / w (same order, no underflow for small w).
        return math.log(u) / s

    def _run(self, src: Iterator[Sample]) -> Iterator[Sample]:
        # Hand-written heap selection: torch.topk needs all N scores in memory; a size-k heap keeps O(k).
        # Heap entries (priority, -position, sample): the root is the worst kept entry; among equal priorities
        # the later position is worse, so ties keep the earlier sample. Positions are unique, so the sample
        # itself is never compared.
        heap: list[tuple[float, int, Sample]] = []
        skip = self.partial
        # A resumed pass re-reads the whole stream (positions from 0) and skips the samples already emitted;
        # the loaded stats already counted the scan, so they are restored after it.
        saved_stats = dict(self.stats) if skip else None
        self.position = 0
        for sample in src:
            self.stats["seen"] += 1
            try:
                p = self._priority(sample)
            except Exception as exn:
                if self._skip(exn):
                    continue
                return
            if p is None:
                self.stats["zero_weight"] += 1
            else:
                entry = (p, -self.position, sample)
                if len(heap) < self.k:
                    heapq.heappush(heap, entry)
                elif entry[:2] > heap[0][:2]:
                    heapq.heapreplace(heap, entry)
            self.position += 1
        if saved_stats is not None:
            self.stats = saved_stats
        if self.order == "stream":
            chosen = sorted(heap, key=lambda e: -e[1])
        else:
            chosen = sorted(heap, key=lambda e: (-e[0], -e[1]))
        for j, (_, _, sample) in enumerate(chosen):
            if j < skip:
                continue
            self.partial = j + 1
            self.stats["emitted"] += 1
            yield sample
        self.partial = 0

    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        _check_seed(state, self.seed)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k": self.k, "probs_key": self.probs_key, "score_key": self.score_key,
                "mode": self.mode, "seed": self.seed, "from_logits": self.from_logits, "score": self.score,
                "order": self.order, "rng": self.rng}



#: The public name (webdataset style: called with options, it returns the stage); ``SelectStage`` is the same
#: object, the type of what it returns.
select_by_entropy = SelectStage
