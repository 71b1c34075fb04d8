"""One-pass class balancing of a stream (:func:`balance_classes`; see :mod:`torch_pretrain_update.data.stages`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_choice, check_float, check_int, check_str, check_vector
from torch_pretrain_update._rng import KEYED_ACCEPT, KEYED_POISSON, keyed_seed, keyed_uniform
from torch_pretrain_update.data.stages.base import (
    Handler,
    Sample,
    _check_momentum,
    _check_seed,
    _ident,
    _label,
    _RunningCounts,
    _Stage,
)

__all__ = ["balance_classes", "BalanceStage"]

#: a run of one class counts as a sign of sorted input when mixed input would give it with probability below this
_RUN_ALPHA = 1e-6
#: shorter runs are never counted (too little evidence either way)
_MIN_RUN = 8


class _RunWatch:
    """The current run of one class in a stage's input, and whether mixed input would make it improbable."""

    def __init__(self) -> None:
        self.label, self.length, self.flagged = -1, 0, False

    def after(self, y: int, counts: np.ndarray, seen: float) -> tuple[int, int, bool, float]:
        """``(label, length, flagged, share)`` after an input of class ``y``, without applying it; ``flagged``
        turns True at the input that makes the run improbable: ``seen * share ** length < _RUN_ALPHA``, with
        the share estimated from ``counts`` (the run included, plus one per class, so that a class seen alone
        is not certain and a first run is never flagged)."""
        length = self.length + 1 if y == self.label else 1
        if y == self.label and self.flagged:
            return y, length, True, math.nan
        share = (counts[y] + 1.0) / (counts.sum() + len(counts))
        hit = length >= _MIN_RUN and length * math.log(share) + math.log(max(seen, 1.0)) < math.log(_RUN_ALPHA)
        return y, length, hit, share

    def state(self) -> list[int]:
        return [self.label, self.length, int(self.flagged)]

    def load(self, value: Any) -> None:
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"state['run'] must be [label, length, flagged] integers; got {value!r}")
        self.label, self.length, self.flagged = int(value[0]), int(value[1]), bool(value[2])

class BalanceStage(_Stage):
    """Stage: rebalance a stream toward ``target`` class shares in one pass.

    Each input of class ``y`` is emitted ``n`` times with ``E[n] = r_y = target_y / share_y``, where ``share_y``
    is the running estimate of class ``y``'s share of the stream (this sample included), plus an output-feedback
    term (``correction``, below). Frequent classes (``E[n] < 1``) are under-sampled by acceptance sampling (kept
    with probability ``E[n]``); rare classes are repeated: ``repeat="even"`` emits ``floor(E[n])`` or
    ``floor(E[n]) + 1`` copies (minimum variance), ``repeat="poisson"`` a Poisson(``E[n]``) number. The output
    has about as many samples as the input. Repeats after the first are shallow copies of the sample dict.

    Why the feedback: copies decided with early, noisy estimates are never taken back, so pure plug-in rates
    leave the output shares off by the error of those early estimates (for a class with n samples, a relative
    error ~ sqrt(2 / n): +-2 percentage points for the 500-sample class of a 1:10:100 stream of 55,500). With
    ``correction = c``, each input of class ``y`` also pays ``c`` times the difference between what the earlier
    inputs of its class should have produced under the current estimate (``(seen_y - 1) * r_y``) and what they
    did produce, bounded so that ``0 <= E[n] <= 2 r_y``; shares then land within ~0.2 points.
    ``correction=0`` gives the pure plug-in rates.

    **Needs mixed input.** The rates come from running estimates, and copies once emitted are never taken back:
    on a stream sorted or clustered by class (shards written class by class, no shuffle before this stage) the
    estimates lag behind each run, and the output is far from the target (100 samples of class 0, then 100 of
    class 1, come out 50:107 instead of 1:1; the same samples shuffled, 99:100). Shuffle first, e.g.
    ``wds.shuffle(1000)`` in a pipeline. (The stream of this library shuffles the shard order and within each
    shard, which does not mix shards that each hold one class: write shards with mixed classes.) The stage
    watches for it: a run of one class that mixed input would give with probability below 1e-6
    (``seen * share ** length < 1e-6``, the share estimated from the counts so far, the run included) is counted
    in ``stats["long_runs"]``, and the first one warns (``UserWarning``), once per stage.

    Args:
        label_key: key of the integer label.
        num_classes: number of classes C.
        target: C non-negative target proportions (normalised here); uniform by default. A class with target
            0 is dropped (counted in ``stats["rejected"]``).
        momentum: ``None`` for cumulative class counts (stationary stream), or ``m`` in (0, 1] for exponentially
            decayed counts that follow a drifting mix.
        seed: seed of the acceptance/repeat draws.
        repeat: ``"even"`` or ``"poisson"``.
        max_repeats: cap on the copies of one input (bounds bursts; the target is then met only approximately).
        rng: ``"key"`` (default): draws are a pure function of ``(seed, epoch, __key__, __url__)``, so they do
            not depend on how shards are split over workers/ranks; ``"counter"``: of ``(seed, epoch, position)``
            (for samples without ``__key__``).
        correction: output-feedback gain in [0, 1] (see above); 0.1 by default.
        prior_counts: class counts known in advance (e.g. a shard manifest's histogram) that the share
            estimates start from, so the first samples are not balanced from a handful of observations. They
            set ``state_dict()["counts"]`` (the estimates) only; the feedback counts what this stage processed
            (``"seen_counts"``) and emitted (``"out_counts"``).
        handler: webdataset exception handler for bad samples; skipped ones are counted in ``stats["skipped"]``.

    Deterministic for a seed and epoch (given the same input order). ``stats`` counts ``seen``, ``emitted``,
    ``rejected`` (inputs emitted 0 times), ``repeated`` (extra copies) and ``skipped``.

    Example::

        >>> stage = balance_classes(num_classes=3, seed=0)
        >>> ds = wds.WebDataset(urls, shardshuffle=False).map(safe_decode()).compose(stage)
    """

    def __init__(
        self,
        label_key: str = "cls",
        *,
        num_classes: int,
        target: Any = None,
        momentum: Optional[float] = None,
        seed: int = 0,
        repeat: str = "even",
        max_repeats: Optional[int] = None,
        rng: str = "key",
        correction: float = 0.1,
        prior_counts: Any = None,
        handler: Handler = reraise_exception,
    ) -> None:
        super().__init__(handler)
        self.label_key = check_str(label_key, "label_key")
        self.num_classes = check_int(num_classes, "num_classes", min_value=1)
        if target is None:
            t = np.full(self.num_classes, 1.0 / self.num_classes)
        else:
            tv = check_vector(target, "target", allow_all_zero=False)
            if tv.numel() != self.num_classes:
                raise ValueError(f"target must have num_classes={self.num_classes} entries; got {tv.numel()}")
            t = (tv / tv.sum()).numpy()
        self.target = t
        self.momentum = _check_momentum(momentum)
        self.seed = check_int(seed, "seed")
        self.repeat = check_choice(repeat, "repeat", ("even", "poisson"))
        self.max_repeats = None if max_repeats is None else check_int(max_repeats, "max_repeats", min_value=1)
        self.rng = check_choice(rng, "rng", ("key", "counter"))
        self.correction = check_float(correction, "correction", low=0.0, high=1.0)
        # Share estimates (may start from a prior), inputs actually processed, and copies emitted per class;
        # all three decay alike with momentum.
        self._running = _RunningCounts(self.num_classes, self.momentum)
        self._seen = _RunningCounts(self.num_classes, self.momentum)
        self._out = np.zeros(self.num_classes, dtype=np.float64)
        if prior_counts is not None:
            prior = check_vector(prior_counts, "prior_counts", allow_all_zero=True)
            if prior.numel() != self.num_classes:
                raise ValueError(
                    f"prior_counts must have num_classes={self.num_classes} entries; got {prior.numel()}"
                )
            self._running.counts = prior.numpy().copy()
        self._runs = _RunWatch()
        self.stats.update({"rejected": 0, "repeated": 0, "long_runs": 0})

    def expected_copies(self, counts: Any = None) -> np.ndarray:
        """Plug-in copies per input of each class, ``target_c / share_c``, from running (or given) counts
        (before the output-feedback correction)."""
        c = self._running.counts if counts is None else np.asarray(counts, dtype=np.float64)
        total = c.sum()
        if total <= 0:
            return np.ones(self.num_classes)
        share = c / total
        with np.errstate(divide="ignore"):
            return np.where(share > 0, self.target / np.where(share > 0, share, 1.0), np.inf)

    def _decayed_out(self) -> np.ndarray:
        return self._out * self._running.decay if self._running.decay is not None else self._out.copy()

    def _copies(
        self, sample: Any, y: int, new_counts: np.ndarray, seen_before: float, out: np.ndarray
    ) -> int:
        r = self.target[y] * new_counts.sum() / new_counts[y]
        # Output feedback: by the current (best) estimate, the earlier inputs of class y this stage processed
        # should have produced seen_before * r copies; pay `correction` of the difference to what they did
        # produce, at most r either way (no bursts: 0 <= E[n] <= 2 r).
        debt = seen_before * r - out[y]
        e = r + min(r, max(-r, self.correction * debt))
        ident = _ident(sample, self.rng, self.position)
        if e < 1.0:
            return int(keyed_uniform(self.seed, self.epoch, ident, KEYED_ACCEPT) < e)
        if self.repeat == "even":
            whole = math.floor(e)
            n = whole + int(keyed_uniform(self.seed, self.epoch, ident, KEYED_ACCEPT) < e - whole)
        else:
            n = int(np.random.default_rng(keyed_seed(self.seed, self.epoch, ident, KEYED_POISSON)).poisson(e))
        return n if self.max_repeats is None else min(n, self.max_repeats)

    def _run(self, src: Iterator[Sample]) -> Iterator[Sample]:
        # Resuming mid-repeats (partial > 0): the input in progress was already counted in stats["seen"].
        counted = self.partial > 0
        for sample in src:
            if not counted:
                self.stats["seen"] += 1
            counted = False
            try:
                y = _label(sample, self.label_key, self.num_classes)
                new = self._running.updated(y)
                seen = self._seen.updated(y)
                out = self._decayed_out()
                n = self._copies(sample, y, new, seen[y] - 1.0, out)
                run = self._runs.after(y, new, float(seen.sum()))
            except Exception as exn:
                self.partial = 0
                if self._skip(exn):
                    continue
                return
            # Resuming mid-repeats: the first `partial` copies of this input were emitted before the checkpoint.
            for j in range(self.partial, n):
                self.partial = j + 1
                self.stats["emitted"] += 1
                if j > 0:
                    self.stats["repeated"] += 1
                yield sample if j == 0 else dict(sample)
            # Commit only after the last copy, so a checkpoint taken mid-repeats replays this input exactly.
            if n == 0:
                self.stats["rejected"] += 1
            out[y] += n
            self._running.counts = new
            self._seen.counts = seen
            self._out = out
            if run[2] and not self._runs.flagged:
                self._long_run(*run)
            self._runs.label, self._runs.length, self._runs.flagged = run[:3]
            self.position += 1
            self.partial = 0

    def _long_run(self, y: int, length: int, flagged: bool, share: float) -> None:
        self.stats["long_runs"] += 1
        if self.stats["long_runs"] == 1:  # once per stage (and not again after a resume: the count is state)
            warnings.warn(
                f"balance_classes: {length} inputs of class {y} in a row, improbable for mixed input (class {y}'s "
                f"share so far is about {share:.3g}): the input looks sorted or clustered by class, and one-pass "
                "balancing then misses its target. Shuffle before this stage (e.g. wds.shuffle(1000)); such runs "
                "are counted in stats['long_runs'].", UserWarning, stacklevel=3)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "counts": self._running.counts.tolist(),
            "seen_counts": self._seen.counts.tolist(),
            "out_counts": self._out.tolist(),
            "seed": self.seed,
            "run": self._runs.state(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        _check_seed(state, self.seed)
        self._running.load(state["counts"], self.num_classes)
        self._seen.load(state["seen_counts"], self.num_classes, "seen_counts")
        self._out = _RunningCounts.checked(state["out_counts"], self.num_classes, "out_counts")
        if "run" in state:  # absent from a state saved before runs were watched
            self._runs.load(state["run"])

    _optional_state = ("run",)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_classes": self.num_classes,
                "target": self._digest("target", np.asarray(self.target, dtype=np.float64)),
                "momentum": self.momentum, "seed": self.seed, "repeat": self.repeat,
                "max_repeats": self.max_repeats, "rng": self.rng, "correction": self.correction}


#: The public name (webdataset style: called with options, it returns the stage); ``BalanceStage`` is the same
#: object, the type of what it returns.
balance_classes = BalanceStage
