"""What every stage of :mod:`torch_pretrain_update.data.stages` shares: the resume protocol, bad-sample errors
and reading labels and scores out of samples.

A stage is a callable from an iterator of dict samples to an iterator of dict samples (webdataset's convention),
that also carries its running state (class frequencies, entropy window, sample position) with torchdata-style
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

import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional

import numpy as np
import torch

from torch_pretrain_update._checks import check_float, check_int
from torch_pretrain_update._state import check_config, tensor_digest
from torch_pretrain_update.data.errors import sample_location
from torch_pretrain_update.data.labels import parse_label
from torch_pretrain_update.scoring.scores import compute_scores

__all__ = ["BadSampleError"]

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
    return sample_location(sample.get("__key__"), sample.get("__url__"))


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
    try:
        return parse_label(value, num_classes)
    except ValueError as exc:
        raise _bad(sample, field, str(exc)) from None


def _check_handler(handler: Any) -> Handler:
    if not callable(handler):
        raise TypeError(f"handler must be callable (e.g. webdataset.warn_and_continue); got {handler!r}")
    return handler


class _Stage:
    """Shared machinery: handler, stats, epoch/position bookkeeping, state_dict."""

    #: keys of ``state_dict()`` added after states were first saved: a state without them still loads
    _optional_state: tuple[str, ...] = ()

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

    def _each(self, src: Iterator[Sample], apply: Callable[[Sample], None]) -> Iterator[Sample]:
        """The pass of a one-to-one stage: ``apply`` writes into each sample (raising for a bad one, which goes to
        the handler), and the sample is counted and yielded; committed before it is yielded."""
        for sample in src:
            self.stats["seen"] += 1
            try:
                apply(sample)
            except Exception as exn:
                if self._skip(exn):
                    continue
                return
            self.position += 1
            self.stats["emitted"] += 1
            yield sample

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
        # a state saved before configs (or an optional key) were recorded still loads
        expected = set(self.state_dict()) - {"config", *self._optional_state}
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
        # a count added since the state was saved starts at 0
        stats = {**dict.fromkeys(self.stats, 0),
                 **{str(k): check_int(v, f"state['stats'][{k!r}]", min_value=0) for k, v in stats.items()}}
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

    def load(self, values: Any, num_classes: int, name: str = "counts") -> None:
        self.counts = self.checked(values, num_classes, name)

    @staticmethod
    def checked(values: Any, num_classes: int, name: str) -> np.ndarray:
        """``state[name]`` as ``num_classes`` finite non-negative float64 counts, else ``ValueError``."""
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.empty(0)
        if arr.shape != (num_classes,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"state[{name!r}] must be {num_classes} finite non-negative numbers; got {values!r}")
        return arr



def _check_seed(state: dict[str, Any], seed: int) -> None:
    if int(state["seed"]) != seed:
        raise ValueError(f"state['seed']={state['seed']} does not match this stage's seed={seed}")


def _ident(sample: Any, rng: str, position: int) -> bytes:
    if rng == "counter":
        return position.to_bytes(8, "little")
    key = _get(sample, "__key__")
    url = sample.get("__url__")
    return f"{key}\x00{url}".encode() if url is not None else str(key).encode()



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


def _real_number(sample: Any, field: str, value: Any, what: str) -> float:
    """``value`` (a real number, a one-element real array or tensor, or a decimal string such as a decoded
    ``.txt``) as a float; anything else is a bad sample naming ``what``. Finiteness is the caller's check."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(value, torch.Tensor):
            size, real = value.numel(), not (value.is_complex() or value.dtype == torch.bool)
        else:
            size, real = value.size, value.dtype.kind in "iuf"
        if size != 1 or not real:
            raise _bad(sample, field, f"{what} must be a scalar; got shape {tuple(value.shape)}, dtype {value.dtype}")
        value = value.reshape(()).item()
    elif isinstance(value, (bytes, bytearray, str)):
        try:
            value = float(value)
        except ValueError:
            raise _bad(sample, field, f"{what} must be a number; got {value[:20]!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(sample, field, f"{what} must be a real number; got {value!r} of type {type(value).__name__}")
    return float(value)


def _float_score(sample: Any, field: str) -> float:
    value = _real_number(sample, field, _get(sample, field), "a score")
    if not math.isfinite(value):
        raise _bad(sample, field, f"score must be finite; got {value}")
    return value
