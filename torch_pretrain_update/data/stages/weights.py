"""Weight stages: a class weight (:func:`with_class_weights`) or an uncertainty weight (:func:`with_entropy_weights`)
written into each sample of a stream (see :mod:`torch_pretrain_update.data.stages`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import (
    check_choice,
    check_float,
    check_int,
    check_num_classes,
    check_str,
    check_vector,
)
from torch_pretrain_update.data.stages.base import (
    BadSampleError,
    Handler,
    Sample,
    _bad,
    _check_momentum,
    _label,
    _real_number,
    _RunningCounts,
    _score_of,
    _Stage,
)
from torch_pretrain_update.scoring.scores import SCORE_NAMES
from torch_pretrain_update.scoring.weights import WEIGHT_SCHEMES, class_weights_from_counts

__all__ = ["with_class_weights", "with_entropy_weights", "ClassWeightStage", "EntropyWeightStage"]

def _weight_of(counts: np.ndarray, y: int, scheme: str, beta: float, alpha: float) -> float:
    """``class_weights_from_counts(counts, scheme=...)[y]`` (float32-rounded) in float64 numpy.

    A per-sample hot path: the torch version costs ~60 us per call with its checks, this one a few us. Same
    formulas (``w_y = raw_y * sum(c) / sum_c c * raw_c`` over present classes), with the normaliser in closed
    form where there is one; tested equal to ``class_weights_from_counts``.
    """
    c_y = counts[y]
    total = counts.sum()
    if scheme == "uniform":
        return 1.0
    if scheme == "inverse":  # sum_c c * (1 / c) = number of present classes
        return float(np.float32(total / (c_y * np.count_nonzero(counts))))
    if scheme == "sqrt_inverse":  # sum_c c / sqrt(c) = sum_c sqrt(c)
        return float(np.float32(total / (math.sqrt(c_y) * np.sqrt(counts).sum())))
    # The normaliser sum_c n_c * raw_c is summed as masses in closed form, not as n_c * raw_c: a decayed running
    # count passes through subnormal values on its way to 0, where raw_c overflows (0 * inf, or a weight of 0).
    # c_y >= 1 here (the sample's own class was just counted), so raw_y itself is finite.
    present = counts > 0
    if scheme == "power":  # raw = n**(alpha - 1), mass = n**alpha
        mass = np.where(present, np.where(present, counts, 1.0) ** alpha, 0.0)
        return float(np.float32(c_y ** (alpha - 1.0) * (total / mass.sum())))
    if beta == 0.0:  # effective_number with beta = 0: raw = 1
        return 1.0
    # effective_number: raw = (1 - beta) / (1 - beta**n); mass = (1 - beta) / k * x / (1 - e**-x), x = k n
    k = -math.log(beta)
    x = np.where(present, counts, 1.0) * k
    ratio = np.where(x < 1e-200, 1.0, x / -np.expm1(-np.maximum(x, 1e-200)))
    mass = np.where(present, (1.0 - beta) / k * ratio, 0.0)
    raw_y = (1.0 - beta) / -math.expm1(-c_y * k)
    return float(np.float32(raw_y * (total / mass.sum())))



class ClassWeightStage(_Stage):
    """Stage: set ``sample[weight_key]`` to the class weight of ``sample[label_key]`` (0-d float32 tensor).

    Args:
        label_key: key of the integer label (decoded int, or undecoded ``.cls`` bytes).
        num_classes: number of classes C.
        scheme: weighting scheme of :func:`torch_pretrain_update.class_weights` (``"inverse"``, ...).
        counts: known class counts (e.g. a shard manifest's histogram): weights are then exactly
            ``class_weights_from_counts(counts, scheme=...)``. ``None``: running counts of the stream, and each
            sample is weighted from what was seen so far, itself included.
        momentum: with running counts, ``None`` keeps cumulative counts; a float ``m`` in (0, 1] keeps
            exponentially decayed counts ``c <- (1 - m) c + onehot(y)`` (effective memory ~``1/m`` samples), so
            the weights follow a drifting class mix.
        weight_key: key the weight is written to.
        combine: ``"replace"`` or ``"multiply"`` (multiply into an existing weight, e.g. an entropy weight). The
            stored weight must be a finite real number ``>= 0`` (a number, a one-element array or tensor, or a
            decimal string) and the product must fit in float32; otherwise the sample is bad.
        beta, alpha: parameters of the ``effective_number`` and ``power`` schemes.
        handler: webdataset exception handler for bad samples (missing/non-integer/out-of-range label, a bad
            stored weight with ``combine="multiply"``); skipped samples are counted in ``stage.stats["skipped"]``
            and change no running count.

    Example::

        >>> stage = with_class_weights(num_classes=2)
        >>> [float(s["weight"]) for s in stage([{"cls": 0}, {"cls": 1}, {"cls": 1}])]
        [1.0, 1.0, 0.75]
    """

    def __init__(
        self,
        label_key: str = "cls",
        *,
        num_classes: int,
        scheme: str = "inverse",
        counts: Any = None,
        momentum: Optional[float] = None,
        weight_key: str = "weight",
        combine: str = "replace",
        beta: float = 0.999,
        alpha: float = 0.5,
        handler: Handler = reraise_exception,
    ) -> None:
        super().__init__(handler)
        self.label_key = check_str(label_key, "label_key")
        self.weight_key = check_str(weight_key, "weight_key")
        self.num_classes = check_num_classes(num_classes)  # sizes the class counts: at most MAX_CLASSES
        self.scheme = check_choice(scheme, "scheme", WEIGHT_SCHEMES)
        self.combine = check_choice(combine, "combine", ("replace", "multiply"))
        self.beta = check_float(beta, "beta", low=0.0, high=1.0, high_inclusive=False)
        self.alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
        self.momentum = _check_momentum(momentum)
        self.table: Optional[torch.Tensor] = None
        if counts is not None:
            if momentum is not None:
                raise ValueError(
                    f"momentum applies to running counts only (counts=None); got momentum={momentum}"
                )
            c = check_vector(counts, "counts", allow_all_zero=False)
            if c.numel() != self.num_classes:
                raise ValueError(f"counts must have num_classes={self.num_classes} entries; got {c.numel()}")
            self.known_counts = c.tolist()
            self.table = class_weights_from_counts(c, scheme=scheme, beta=beta, alpha=alpha)
        self._running = _RunningCounts(self.num_classes, self.momentum)

    @property
    def running_counts(self) -> list[float]:
        """The running (possibly decayed) class counts after the last sample."""
        return self._running.counts.tolist()

    def current_weights(self) -> torch.Tensor:
        """Class weights the stage would use now: the fixed table, or from the running counts.

        With ``momentum`` a class not seen for long has a decayed count on its way to 0; while that count is
        over ~1e38 times smaller than the total, its weight is beyond float32's range and this raises
        ``ValueError`` (the per-sample weights are unaffected: a sample's own class was just counted)."""
        if self.table is not None:
            return self.table.clone()
        return class_weights_from_counts(
            self._running.counts, scheme=self.scheme, beta=self.beta, alpha=self.alpha
        )

    def _run(self, src: Iterator[Sample]) -> Iterator[Sample]:
        table = None if self.table is None else self.table.tolist()

        def weigh(sample: Sample) -> None:
            y = _label(sample, self.label_key, self.num_classes)
            stored = _stored_weight(sample, self.weight_key, self.combine)
            new = None
            if table is not None:
                w = table[y]
                if w == 0.0:
                    raise _bad(sample, self.label_key, f"label {y} has count 0 in the given counts")
            else:
                new = self._running.updated(y)
                w = _weight_of(new, y, self.scheme, self.beta, self.alpha)
            _attach(sample, self.weight_key, w, stored)
            if new is not None:  # only a sample that passed every check counts
                self._running.counts = new

        return self._each(src, weigh)

    def _extra_state(self) -> dict[str, Any]:
        return {"counts": self._running.counts.tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._running.load(state["counts"], self.num_classes)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_classes": self.num_classes, "scheme": self.scheme, "beta": self.beta,
                "alpha": self.alpha, "momentum": self.momentum, "combine": self.combine,
                "counts": self._digest("counts", getattr(self, "known_counts", None))}



#: The public name (webdataset style: called with options, it returns the stage); ``ClassWeightStage`` is the
#: same object, the type of what it returns.
with_class_weights = ClassWeightStage


_F32_MAX = float(np.finfo(np.float32).max)


def _stored_weight(sample: dict, key: str, combine: str) -> Optional[float]:
    """The weight already stored under ``key`` that ``combine="multiply"`` multiplies into (None if there is
    none, or ``combine="replace"``): a real number (int, float, numpy/tensor scalar or one-element array, or a
    decimal string such as a decoded ``.txt``), finite and ``>= 0``; anything else is a bad sample."""
    if combine != "multiply" or key not in sample:
        return None
    value = _real_number(sample, key, sample[key], "a stored weight")
    if not (math.isfinite(value) and value >= 0.0):
        raise _bad(sample, key, f"a stored weight must be finite and >= 0; got {value}")
    return value


def _attach(sample: dict, key: str, w: float, stored: Optional[float]) -> None:
    if stored is not None:
        product = stored * w
        if product > _F32_MAX:  # would be inf as the float32 weight tensor
            raise _bad(
                sample, key, f"stored weight {stored} x weight {w} = {product} is beyond float32's range"
            )
        w = product
    # scalar_tensor: a 0-d float32 tensor (batched to shape (B,) by default_collate and wds.batched), ~3x
    # cheaper than torch.tensor(w)
    sample[key] = torch.scalar_tensor(w, dtype=torch.float32)



class EntropyWeightStage(_Stage):
    """Stage: weight each sample by the uncertainty of its stored teacher output, mean 1 over a running window.

    ``w_i = s_i / mean(s_j for the last `window` samples, i included)`` where ``s`` is the entropy (or ``score``)
    of ``sample[probs_key]`` computed by :func:`torch_pretrain_update.compute_scores`. If the window mean is 0
    (every sample in it is certain) the weight is 1.

    Args:
        probs_key: key of a 1-D probability vector of C classes (a decoded ``.npy``; a (1, C) row is accepted).
        from_logits: the stored vector is logits.
        weight_key: key the weight (0-d float32 tensor) is written to.
        window: number of recent samples the normalising mean runs over.
        score: ``"entropy"`` (default), ``"margin"`` or ``"least_confidence"``.
        combine: ``"replace"`` or ``"multiply"`` (into an existing weight, e.g. a class weight). The stored
            weight must be a finite real number ``>= 0`` and the product must fit in float32, as in
            :func:`with_class_weights`.
        handler: webdataset exception handler for bad samples (missing key, wrong shape, non-finite values,
            rows not summing to 1, a bad stored weight); skipped samples are counted in ``stage.stats["skipped"]``
            and leave the running window unchanged.

    Example::

        >>> stage = with_entropy_weights("probs.npy")
        >>> out = list(stage([{"probs.npy": np.array([0.5, 0.5])}, {"probs.npy": np.array([0.9, 0.1])}]))
    """

    def __init__(
        self,
        probs_key: str,
        *,
        from_logits: bool = False,
        weight_key: str = "weight",
        window: int = 1024,
        score: str = "entropy",
        combine: str = "replace",
        handler: Handler = reraise_exception,
    ) -> None:
        super().__init__(handler)
        self.probs_key = check_str(probs_key, "probs_key")
        self.weight_key = check_str(weight_key, "weight_key")
        if not isinstance(from_logits, (bool, np.bool_)):
            raise TypeError(f"from_logits must be a bool; got {from_logits!r}")
        self.from_logits = bool(from_logits)
        self.window = check_int(window, "window", min_value=1)
        self.score = check_choice(score, "score", SCORE_NAMES)
        self.combine = check_choice(combine, "combine", ("replace", "multiply"))
        self._values: deque[float] = deque()
        self._sum = 0.0
        self._since_resum = 0
        self._undo: tuple[float, int, Optional[float]] = (0.0, 0, None)  # what _unpush restores

    def _push(self, h: float) -> float:
        """Add a score to the window and return the window mean (the score itself included); :meth:`_unpush`
        undoes it exactly."""
        self._undo = (self._sum, self._since_resum, None)
        self._values.append(h)
        self._sum += h
        if len(self._values) > self.window:
            dropped = self._values.popleft()
            self._sum -= dropped
            self._undo = (*self._undo[:2], dropped)
        self._since_resum += 1
        if (
            self._since_resum >= self.window
        ):  # bound rounding drift of the running sum: exact re-sum, amortised O(1)
            self._sum = math.fsum(self._values)
            self._since_resum = 0
        return max(self._sum, 0.0) / len(self._values)

    def _unpush(self) -> None:
        """Undo the last :meth:`_push` (a sample refused after its score entered the window)."""
        self._sum, self._since_resum, dropped = self._undo
        self._values.pop()
        if dropped is not None:
            self._values.appendleft(dropped)

    def _run(self, src: Iterator[Sample]) -> Iterator[Sample]:
        return self._each(src, self._weigh)

    def _weigh(self, sample: Sample) -> None:
        h = _score_of(sample, self.probs_key, self.score, self.from_logits)
        stored = _stored_weight(sample, self.weight_key, self.combine)
        mean = self._push(h)
        w = h / mean if mean > 0.0 else 1.0  # a window of all-certain samples: all weighted equally
        try:
            _attach(sample, self.weight_key, w, stored)
        except BadSampleError:
            self._unpush()  # a refused sample leaves no trace in the window
            raise

    def _extra_state(self) -> dict[str, Any]:
        return {
            "window_values": list(self._values),
            "window_sum": self._sum,
            "since_resum": self._since_resum,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        values = [float(v) for v in state["window_values"]]
        if len(values) > self.window or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(
                f"state['window_values'] must be <= {self.window} finite scores >= 0; got {values[:8]}..."
            )
        window_sum = check_float(state["window_sum"], "state['window_sum']")
        since_resum = check_int(state["since_resum"], "state['since_resum']", min_value=0, max_value=self.window)
        self._values = deque(values)
        self._sum = window_sum
        self._since_resum = since_resum

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "window": self.window, "score": self.score, "from_logits": self.from_logits,
                "combine": self.combine}



#: The public name; ``EntropyWeightStage`` is the same object, the type of what it returns.
with_entropy_weights = EntropyWeightStage
