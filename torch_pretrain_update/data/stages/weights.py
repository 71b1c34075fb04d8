"""WebDataset stages: weights, one-pass balancing and selection over streams of dict samples.

Each public function is curried like webdataset's own filters (``webdataset.filters.pipelinefilter``): called
with its options it returns a stage, a callable from an iterator of samples to an iterator of samples, so all of
these work::

    ds = wds.WebDataset(urls, shardshuffle=False).map(safe_decode()).compose(with_class_weights(num_classes=10))
    ds = wds.DataPipeline(wds.SimpleShardList(urls), strict_tarfile_to_samples(), safe_decode(),
                          balance_classes(num_classes=10, seed=0), wds.batched(64))
    for sample in with_class_weights(num_classes=10)(iter(samples)): ...

:func:`~torch_pretrain_update.data.shards.strict_tarfile_to_samples` is the library's drop-in for
``wds.tarfile_to_samples`` (which ``wds.WebDataset`` uses): webdataset's reader silently loses the rest of a shard
at a corrupt header or a truncation at a header boundary; the strict one raises naming the shard, or counts it.

Unlike ``pipelinefilter``'s ``FilterFunction``, the returned stage is a small object that also carries the
stage's running state (class frequencies, entropy window, sample position) with torchdata-style
``state_dict()`` / ``load_state_dict()`` (JSON-serialisable plain values, named keys), ``set_epoch(epoch)`` and a
``stats`` dict.

Bad samples (missing label, label out of range or not an integer, non-finite or malformed stored
probabilities/scores) raise :class:`BadSampleError` (a ``ValueError`` naming ``__key__``, ``__url__`` and the
key) through the ``handler`` (webdataset's convention: ``reraise_exception`` by default; a handler returning
True skips the sample, False stops the stream). Every skipped sample is counted in ``stage.stats["skipped"]``.

Resume protocol (for a stream factory): each call ``stage(data)`` is a pass (an epoch). ``state_dict()``
records ``position``, the number of inputs of the current pass the stage has fully consumed, and ``partial``,
how many outputs of the input in progress were already emitted (``balance_classes`` repeats, or the chosen
samples of ``select_by_entropy``; 0 for the one-to-one stages, which commit before they yield). After
``load_state_dict(state)`` (and ``set_epoch`` with the same epoch, in either order) the next pass must be fed the
pass's inputs from number ``position`` on (``select_by_entropy``: from the start); the stage skips the
``partial`` outputs already emitted. A state of epoch ``e`` loaded into a stage already set to a later epoch
(``set_epoch(e + 1)`` first, as a ``StatefulDataLoader`` that applies a loaded state at the next ``iter`` does)
counts as a finished pass: the running estimates and ``stats`` are restored, the next pass starts at position 0.
The state's ``config`` records the stage's options; a stage built with other options refuses it (``ValueError``
naming them); a state without it (an earlier version) is loaded unchecked. Randomness is a pure function of
``(seed, epoch, position or __key__)`` (never a global or long-lived generator), so the resumed stream is exactly
the unbroken one.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import numbers
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_choice, check_float, check_int, check_num_classes, check_vector
from torch_pretrain_update._state import check_config, tensor_digest
from torch_pretrain_update.scoring.scores import SCORE_NAMES, compute_scores
from torch_pretrain_update.scoring.weights import WEIGHT_SCHEMES, class_weights_from_counts

__all__ = [
    "with_class_weights",
    "with_entropy_weights",
    "balance_classes",
    "select_by_entropy",
    "ClassWeightStage",
    "EntropyWeightStage",
    "BalanceStage",
    "SelectStage",
    "BadSampleError",
]

Handler = Callable[[BaseException], Any]
Sample = dict


class BadSampleError(ValueError):
    """A sample a stage cannot process; the message names ``__key__``, ``__url__`` and the offending key."""

    def __init__(self, message: str, *, sample_key: Any = None, url: Any = None, field: Optional[str] = None):
        super().__init__(message)
        self.sample_key, self.url, self.field = sample_key, url, field


def _where(sample: Any) -> str:
    if not isinstance(sample, dict):
        return f"sample of type {type(sample).__name__}"
    text = f"sample __key__={sample.get('__key__')!r}"
    if sample.get("__url__") is not None:
        text += f" (__url__={sample.get('__url__')!r})"
    return text


def _bad(sample: Any, field: Optional[str], message: str) -> BadSampleError:
    key = sample.get("__key__") if isinstance(sample, dict) else None
    url = sample.get("__url__") if isinstance(sample, dict) else None
    what = f"{_where(sample)}, key {field!r}" if field is not None else _where(sample)
    return BadSampleError(f"{what}: {message}", sample_key=key, url=url, field=field)


def _get(sample: Any, field: str) -> Any:
    if not isinstance(sample, dict):
        raise _bad(
            sample, None, "samples must be dicts (webdataset convention); use these stages before to_tuple"
        )
    if field not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise _bad(sample, field, f"missing; the sample has keys {present}")
    return sample[field]


def _label(sample: Any, field: str, num_classes: int) -> int:
    """An int class label from an int, numpy/0-d tensor integer, or undecoded ``.cls`` bytes/str."""
    if type(sample) is dict and type(sample.get(field)) is int:  # fast path: a decoded .cls
        value = sample[field]
        if 0 <= value < num_classes:
            return value
        raise _bad(sample, field, f"label {value} out of range [0, num_classes={num_classes})")
    value = _get(sample, field)
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = int(value)
        except ValueError:
            raise _bad(sample, field, f"not an integer label: {value[:20]!r}") from None
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0 and tuple(value.shape) != (1,):
            raise _bad(sample, field, f"a label must be a scalar; got shape {tuple(value.shape)}")
        is_int = (
            (not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool)
            if isinstance(value, torch.Tensor)
            else value.dtype.kind in "iu"
        )
        if not is_int:
            raise _bad(sample, field, f"a label must have an integer dtype; got {value.dtype}")
        value = int(value.reshape(()).item())
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(sample, field, f"a label must be an integer; got {value!r} of type {type(value).__name__}")
    value = int(value)
    if not 0 <= value < num_classes:
        raise _bad(sample, field, f"label {value} out of range [0, num_classes={num_classes})")
    return value


def _check_handler(handler: Any) -> Handler:
    if not callable(handler):
        raise TypeError(f"handler must be callable (e.g. webdataset.warn_and_continue); got {handler!r}")
    return handler


def _uniform(seed: int, epoch: int, ident: bytes, draw: int = 0) -> float:
    """A uniform in (0, 1) that is a pure function of (seed, epoch, ident, draw).

    Hand-written counter-based hashing (BLAKE2b): it makes per-sample randomness a pure function of the sample's
    position or ``__key__``, so a stream resumes at any position with no generator state. torch and numpy have
    no cheap per-element counter-based API (a seeded generator per sample costs ~20 us; BLAKE2b ~1 us).
    """
    h = hashlib.blake2b(ident, digest_size=8, key=f"{seed}:{epoch}:{draw}".encode()).digest()
    return ((int.from_bytes(h, "little") >> 11) + 0.5) * (1.0 / 9007199254740992.0)


def _seed64(seed: int, epoch: int, ident: bytes, draw: int) -> int:
    h = hashlib.blake2b(ident, digest_size=8, key=f"{seed}:{epoch}:{draw}".encode()).digest()
    return int.from_bytes(h, "little")


class _Stage:
    """Shared machinery: handler, stats, epoch/position bookkeeping, state_dict."""

    def __init__(self, handler: Handler) -> None:
        self.handler = _check_handler(handler)
        self.epoch = 0
        self.position = 0  # inputs fully consumed since the last set_epoch
        self.partial = 0  # outputs of the input in progress already emitted
        self.stats: dict[str, int] = {"seen": 0, "emitted": 0, "skipped": 0}
        self._pending = False  # a loaded state not yet resumed by a pass

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch mixed into the randomness (like ``DistributedSampler.set_epoch``).

        A state loaded by :meth:`load_state_dict` for the same epoch stays pending (the next pass resumes it);
        a different epoch discards it.
        """
        epoch = check_int(epoch, "epoch", min_value=0)
        if epoch != self.epoch:
            self._pending = False
        self.epoch = epoch

    def _skip(self, exn: BaseException) -> bool:
        """Run the handler; True to continue with the next sample, False to stop. Counts the skipped sample."""
        keep_going = self.handler(exn)  # reraise_exception raises here
        self.stats["skipped"] += 1
        self.position += 1
        return bool(keep_going)

    def __call__(self, data: Iterable[Sample]) -> Iterator[Sample]:
        """Start a pass over ``data``: from position 0, or from a state loaded with :meth:`load_state_dict`.

        Running estimates (class counts, entropy window) and ``stats`` carry over from pass to pass.
        """
        if not self._pending:
            self.position = 0
            self.partial = 0
        self._pending = False
        return self._run(iter(data))

    def _run(self, src: Iterator[Sample]) -> Iterator[Sample]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _config(self) -> dict[str, Any]:
        """The options the stage's output depends on (plain values); recorded in the state, compared on load."""
        return {"type": type(self).__name__}

    def _digest(self, name: str, values: Any) -> Optional[str]:
        """Hash of a fixed per-class vector (None stays None), computed once: state_dict() runs per shard."""
        cache = self.__dict__.setdefault("_digests", {})
        if name not in cache:
            cache[name] = None if values is None else tensor_digest(torch.as_tensor(values, dtype=torch.float64))
        return cache[name]

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state: ``epoch``, ``position``, ``partial``, ``stats``, stage estimates and
        ``config``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "partial": self.partial,
            "stats": dict(self.stats),
            **self._extra_state(),
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (after ``json.loads`` too); see the module docstring for a
        state of an earlier epoch than the stage's. Raises ``ValueError`` for a state of a stage built with other
        options (the message names them)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        expected = set(self.state_dict()) - {"config"}  # a state saved before configs were recorded still loads
        missing = expected - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)} (expected {sorted(expected)})")
        check_config(state.get("config"), self._config())
        epoch = check_int(state["epoch"], "state['epoch']", min_value=0)
        position = check_int(state["position"], "state['position']", min_value=0)
        partial = check_int(state["partial"], "state['partial']", min_value=0)
        stats = state["stats"]
        if not isinstance(stats, dict):
            raise TypeError(f"state['stats'] must be a dict of counts; got {stats!r}")
        stats = {str(k): check_int(v, f"state['stats'][{k!r}]", min_value=0) for k, v in stats.items()}
        self._load_extra_state(state)
        self.stats = stats
        if epoch < self.epoch:  # loaded after set_epoch(e + 1): pass e is finished, the newer epoch starts over
            self.position = self.partial = 0
            self._pending = False
            return
        self.epoch, self.position, self.partial = epoch, position, partial
        self._pending = True


def _check_momentum(momentum: Any) -> Optional[float]:
    if momentum is None:
        return None
    return check_float(momentum, "momentum", low=0.0, high=1.0, low_inclusive=False)


class _RunningCounts:
    """Class counts, cumulative (``momentum=None``) or exponentially decayed: ``c <- (1 - m) c + onehot(y)``.

    The decayed counts are self-normalising (``sum c = (1 - (1 - m)^t) / m``), so ``c / sum(c)`` is a
    bias-corrected EMA of the class shares from the first sample on.
    """

    def __init__(self, num_classes: int, momentum: Optional[float]) -> None:
        self.decay = None if momentum is None else 1.0 - momentum
        self.counts = np.zeros(num_classes, dtype=np.float64)

    def updated(self, y: int) -> np.ndarray:
        new = self.counts * self.decay if self.decay is not None else self.counts.copy()
        new[y] += 1.0
        return new

    def load(self, values: Any, num_classes: int) -> None:
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (num_classes,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(
                f"state['counts'] must be {num_classes} finite non-negative numbers; got {values!r}"
            )
        self.counts = arr


# ---------------------------------------------------------------------------------------------------------
# class weights
# ---------------------------------------------------------------------------------------------------------


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
    """Attach a class weight to each sample (see :func:`with_class_weights`)."""

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
        self.label_key = _check_key(label_key, "label_key")
        self.weight_key = _check_key(weight_key, "weight_key")
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
        for sample in src:
            self.stats["seen"] += 1
            try:
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
            except Exception as exn:
                if self._skip(exn):
                    continue
                return
            self.position += 1
            self.stats["emitted"] += 1
            yield sample

    def _extra_state(self) -> dict[str, Any]:
        return {"counts": self._running.counts.tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._running.load(state["counts"], self.num_classes)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_classes": self.num_classes, "scheme": self.scheme, "beta": self.beta,
                "alpha": self.alpha, "momentum": self.momentum, "combine": self.combine,
                "counts": self._digest("counts", getattr(self, "known_counts", None))}


def _check_key(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str; got {value!r}")
    return value


_F32_MAX = float(np.finfo(np.float32).max)


def _stored_weight(sample: dict, key: str, combine: str) -> Optional[float]:
    """The weight already stored under ``key`` that ``combine="multiply"`` multiplies into (None if there is
    none, or ``combine="replace"``): a real number (int, float, numpy/tensor scalar or one-element array, or a
    decimal string such as a decoded ``.txt``), finite and ``>= 0``; anything else is a bad sample."""
    if combine != "multiply" or key not in sample:
        return None
    value = sample[key]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(value, torch.Tensor):
            size, real = value.numel(), not (value.is_complex() or value.dtype == torch.bool)
        else:
            size, real = value.size, value.dtype.kind in "iuf"
        if size != 1 or not real:
            raise _bad(
                sample, key,
                f"a stored weight must be one real number; got shape {tuple(value.shape)}, dtype {value.dtype}",
            )
        value = value.reshape(()).item()
    elif isinstance(value, (bytes, bytearray, str)):
        try:
            value = float(value)
        except ValueError:
            raise _bad(sample, key, f"a stored weight must be a number; got {value[:20]!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(
            sample, key, f"a stored weight must be a real number; got {value!r} of type {type(value).__name__}"
        )
    value = float(value)
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


def with_class_weights(
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
) -> ClassWeightStage:
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
    return ClassWeightStage(
        label_key,
        num_classes=num_classes,
        scheme=scheme,
        counts=counts,
        momentum=momentum,
        weight_key=weight_key,
        combine=combine,
        beta=beta,
        alpha=alpha,
        handler=handler,
    )


# ---------------------------------------------------------------------------------------------------------
# entropy weights
# ---------------------------------------------------------------------------------------------------------


def _score_of(sample: Any, field: str, score: str, from_logits: bool) -> float:
    value = _get(sample, field)
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exn:
            raise _bad(sample, field, f"expected a vector of numbers; got {value[:8]!r} ({exn})") from None
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise _bad(
            sample,
            field,
            f"expected a probability/logit vector (array or tensor); got {type(value).__name__}",
        )
    if isinstance(value, np.ndarray) and value.dtype.kind not in "f":
        if value.dtype.kind in "iu":
            value = value.astype(np.float64)
        else:
            raise _bad(sample, field, f"expected a floating array; got dtype {value.dtype}")
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        raise _bad(sample, field, f"expected a floating tensor; got dtype {value.dtype}")
    if value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1:
        shape = tuple(value.shape)
        raise _bad(sample, field, f"expected a 1-D vector of C class probabilities/logits; got shape {shape}")
    try:
        return float(
            compute_scores(value[None, :], score, from_logits=from_logits, name=f"sample[{field!r}]")[0]
        )
    except (ValueError, TypeError) as exn:
        raise _bad(sample, field, str(exn)) from None


class EntropyWeightStage(_Stage):
    """Attach an uncertainty weight, normalised to mean 1 over a running window (see :func:`with_entropy_weights`)."""

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
        self.probs_key = _check_key(probs_key, "probs_key")
        self.weight_key = _check_key(weight_key, "weight_key")
        if not isinstance(from_logits, (bool, np.bool_)):
            raise TypeError(f"from_logits must be a bool; got {from_logits!r}")
        self.from_logits = bool(from_logits)
        self.window = check_int(window, "window", min_value=1)
        self.score = check_choice(score, "score", SCORE_NAMES)
        self.combine = check_choice(combine, "combine", ("replace", "multiply"))
        self._values: deque[float] = deque()
        self._sum = 0.0
        self._since_resum = 0

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
        for sample in src:
            self.stats["seen"] += 1
            try:
                h = _score_of(sample, self.probs_key, self.score, self.from_logits)
                stored = _stored_weight(sample, self.weight_key, self.combine)
                mean = self._push(h)
                w = h / mean if mean > 0.0 else 1.0  # a window of all-certain samples: all weighted equally
                try:
                    _attach(sample, self.weight_key, w, stored)
                except BadSampleError:
                    self._unpush()  # a refused sample leaves no trace in the window
                    raise
            except Exception as exn:
                if self._skip(exn):
                    continue
                return
            self.position += 1
            self.stats["emitted"] += 1
            yield sample

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


def with_entropy_weights(
    probs_key: str,
    *,
    from_logits: bool = False,
    weight_key: str = "weight",
    window: int = 1024,
    score: str = "entropy",
    combine: str = "replace",
    handler: Handler = reraise_exception,
) -> EntropyWeightStage:
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
    return EntropyWeightStage(
        probs_key,
        from_logits=from_logits,
        weight_key=weight_key,
        window=window,
        score=score,
        combine=combine,
        handler=handler,
    )


# ---------------------------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------------------------


def _ident(sample: Any, rng: str, position: int) -> bytes:
    if rng == "counter":
        return position.to_bytes(8, "little")
    key = _get(sample, "__key__")
    url = sample.get("__url__")
    return f"{key}\x00{url}".encode() if url is not None else str(key).encode()


class BalanceStage(_Stage):
    """One-pass rebalancing toward target class shares (see :func:`balance_classes`)."""

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
        self.label_key = _check_key(label_key, "label_key")
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
        self.stats.update({"rejected": 0, "repeated": 0})

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
            return int(_uniform(self.seed, self.epoch, ident) < e)
        if self.repeat == "even":
            whole = math.floor(e)
            n = whole + int(_uniform(self.seed, self.epoch, ident) < e - whole)
        else:
            n = int(np.random.default_rng(_seed64(self.seed, self.epoch, ident, 1)).poisson(e))
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
            self.position += 1
            self.partial = 0

    def _extra_state(self) -> dict[str, Any]:
        return {
            "counts": self._running.counts.tolist(),
            "seen_counts": self._seen.counts.tolist(),
            "out_counts": self._out.tolist(),
            "seed": self.seed,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state['seed']={state['seed']} does not match this stage's seed={self.seed}")
        self._running.load(state["counts"], self.num_classes)
        self._seen.load(state["seen_counts"], self.num_classes)
        out = np.asarray(state["out_counts"], dtype=np.float64)
        if out.shape != (self.num_classes,) or not np.all(np.isfinite(out)) or np.any(out < 0):
            raise ValueError(
                f"state['out_counts'] must be {self.num_classes} finite non-negative numbers; "
                f"got {state['out_counts']!r}"
            )
        self._out = out

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_classes": self.num_classes,
                "target": self._digest("target", np.asarray(self.target, dtype=np.float64)),
                "momentum": self.momentum, "seed": self.seed, "repeat": self.repeat,
                "max_repeats": self.max_repeats, "rng": self.rng, "correction": self.correction}


def balance_classes(
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
) -> BalanceStage:
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
    return BalanceStage(
        label_key,
        num_classes=num_classes,
        target=target,
        momentum=momentum,
        seed=seed,
        repeat=repeat,
        max_repeats=max_repeats,
        rng=rng,
        correction=correction,
        prior_counts=prior_counts,
        handler=handler,
    )


# ---------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------


def _float_score(sample: Any, field: str) -> float:
    value = _get(sample, field)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size != 1:
            raise _bad(sample, field, f"a score must be a scalar; got shape {tuple(value.shape)}")
        value = value.reshape(()).item()
    elif isinstance(value, (bytes, bytearray, str)):
        try:
            value = float(value)
        except ValueError:
            raise _bad(sample, field, f"not a number: {value[:20]!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(sample, field, f"a score must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise _bad(sample, field, f"score must be finite; got {value}")
    return value


class SelectStage(_Stage):
    """One-pass O(k)-memory selection of k samples (see :func:`select_by_entropy`)."""

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
        self.probs_key = None if probs_key is None else _check_key(probs_key, "probs_key")
        self.score_key = None if score_key is None else _check_key(score_key, "score_key")
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
            s = _float_score(sample, self.score_key)
        else:
            s = _score_of(sample, self.probs_key, self.score, self.from_logits)
        if self.mode == "topk":
            return s
        if s < 0:
            raise _bad(sample, self.score_key or self.probs_key, f"reservoir weights must be >= 0; got {s}")
        if s == 0.0:
            return None  # inclusion probability 0
        u = _uniform(self.seed, self.epoch, _ident(sample, self.rng, self.position))
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
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state['seed']={state['seed']} does not match this stage's seed={self.seed}")

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k": self.k, "probs_key": self.probs_key, "score_key": self.score_key,
                "mode": self.mode, "seed": self.seed, "from_logits": self.from_logits, "score": self.score,
                "order": self.order, "rng": self.rng}


def select_by_entropy(
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
) -> SelectStage:
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
    return SelectStage(
        k,
        probs_key=probs_key,
        score_key=score_key,
        mode=mode,
        seed=seed,
        from_logits=from_logits,
        score=score,
        order=order,
        rng=rng,
        handler=handler,
    )
