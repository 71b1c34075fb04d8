"""Input checks: the bottom layer. Every public entry point validates here, up front.

Each helper raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value) with a
message that names the argument, the value received and what is allowed. Never ``assert``: asserts vanish
under ``python -O``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, Union, overload

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

__all__: list[str] = []  # private module

#: The most classes a per-class array indexed by class id (class weights, class counts) may have: 2**24 (128 MiB
#: of int64 counts). Where such an array is sized by the largest label, a label >= MAX_CLASSES is refused with an
#: error naming it (instead of a MemoryError); code that only groups samples by label compacts the labels
#: (:func:`compact_labels`) and takes any non-negative int64 label.
MAX_CLASSES = 1 << 24

_INT64_MAX = (1 << 63) - 1


def short_repr(value: Any) -> str:
    """A short repr for error messages (tensors and arrays are summarised, not dumped)."""
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, np.ndarray):
        return f"ndarray(shape={value.shape}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {short_repr(value)}")
    return value


@overload
def check_str(value: Any, name: str, *, optional: Literal[False] = ...) -> str: ...
@overload
def check_str(value: Any, name: str, *, optional: bool) -> str | None: ...
def check_str(value: Any, name: str, *, optional: bool = False) -> str | None:
    """A non-empty ``str`` (a member name, a key); with ``optional=True`` also ``None``.

    Raises ``TypeError`` naming the argument for anything else, the empty string included (a key ``""`` would
    match no member and fail far from here).
    """
    if optional and value is None:
        return None
    if not isinstance(value, str) or not value:
        what = "None or a non-empty str" if optional else "a non-empty str"
        raise TypeError(f"{name} must be {what}; got {short_repr(value)}")
    return value


def check_int(value: Any, name: str, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """An integer (bools refused) within ``[min_value, max_value]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {short_repr(value)} of type {type(value).__name__}")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}; got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}; got {value}")
    return value


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """A finite real number within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {short_repr(value)} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}; got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high}; got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {short_repr(value)} of type {type(value).__name__}")
    return bool(value)


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A tensor view of a tensor, ndarray, sequence or other array-like (what ``numpy.asarray`` takes: a Hugging
    Face ``datasets`` column, a pandas Series); no copy where torch can share memory."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array; got an object array {short_repr(value)}")
        if not value.flags.writeable:
            # torch.from_numpy warns on read-only arrays (e.g. np.load(mmap_mode="r")); copy instead.
            return torch.tensor(value)
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple, range)):
        try:
            t = torch.as_tensor(value)
            if t.dtype == torch.float32:
                # Python floats are float64: torch's default float32 would turn 1e308 into inf and 1e-320 into 0
                t = torch.as_tensor(value, dtype=torch.float64)
            return t
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a sequence of numbers; got {short_repr(value)}") from exc
    if isinstance(value, (str, bytes, bytearray)) or not (hasattr(value, "__array__") or isinstance(value, Sequence)):
        raise TypeError(
            f"{name} must be a torch.Tensor, numpy.ndarray or sequence (or another array-like that numpy.asarray "
            f"takes); got {type(value).__name__}"
        )
    # Array-likes of other libraries (a Hugging Face datasets column, a pandas Series, a pyarrow array): what
    # numpy.asarray takes. A sequence without __array__ is read with one slice where it has one: numpy alone reads
    # it element by element (measured: 33 s for a 10^6-row datasets column, 0.03 s by one slice).
    if not hasattr(value, "__array__"):
        try:
            whole = value[:]
        except (TypeError, ValueError, KeyError, IndexError):
            whole = None
        if isinstance(whole, (list, tuple, np.ndarray, torch.Tensor)) and len(whole) == len(value):
            return as_tensor(whole, name)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array-like; got {short_repr(value)}") from exc
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"{name} must be a numeric array-like; got {type(value).__name__} of dtype {arr.dtype}")
    return as_tensor(arr, name)


def check_matrix(x: Any, name: str, *, min_cols: int = 2) -> torch.Tensor | np.ndarray:
    """A 2-D float matrix (N >= 1, C >= ``min_cols``). Returned as given (tensor or ndarray, no copy)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must have a floating dtype; got {short_repr(x)}")
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {short_repr(x)}")
    else:
        raise TypeError(f"{name} must be a 2-D torch.Tensor or numpy.ndarray; got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D of shape (N, C); got {x.ndim} dimension(s), shape {tuple(x.shape)}")
    n, c = x.shape
    if n == 0:
        raise ValueError(f"{name} must have at least one row; got shape {tuple(x.shape)}")
    if c < min_cols:
        raise ValueError(f"{name} must have at least {min_cols} columns (classes); got shape {tuple(x.shape)}")
    return x


def first_bad_row(mask: torch.Tensor) -> int:
    """Index of the first True in a 1-D bool mask."""
    return int(torch.nonzero(mask, as_tuple=False)[0, 0])


def check_vector(
    x: Any,
    name: str,
    *,
    allow_negative: bool = False,
    allow_all_zero: bool = True,
    allow_empty: bool = False,
) -> torch.Tensor:
    """A 1-D finite float vector (scores or weights), as a float64 tensor on the CPU (tensors are not copied
    when already float64)."""
    t = as_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers; got {short_repr(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.numel() == 0:
        return t
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = first_bad_row(bad)
        raise ValueError(f"{name} must be finite; got {t[i].item()} at index {i}")
    if not allow_negative:
        neg = t < 0
        if bool(neg.any()):
            i = first_bad_row(neg)
            raise ValueError(f"{name} must be non-negative; got {t[i].item()} at index {i}")
        if not allow_all_zero and not bool((t > 0).any()):
            raise ValueError(f"{name} must have at least one positive entry; all {t.numel()} are zero")
    return t


def check_num_classes(value: Any, name: str = "num_classes") -> int:
    """A number of classes for a per-class array: an int in ``[1, MAX_CLASSES]``."""
    return check_int(value, name, min_value=1, max_value=MAX_CLASSES)


def _check_unsigned_range(t: torch.Tensor, name: str) -> None:
    """Refuse uint64 values above int64's maximum: cast to int64 they would read as negative numbers."""
    if t.dtype == torch.uint64:
        big = t.view(torch.int64) < 0  # the same bits as int64: values >= 2**63 have the sign bit set
        if bool(big.any()):
            i = first_bad_row(big)
            raise ValueError(f"{name} must be <= {_INT64_MAX} (int64); got {int(t[i].item())} at index {i}")


def check_labels(
    labels: Any,
    name: str = "labels",
    *,
    num_classes: int | None = None,
    max_classes: int | None = MAX_CLASSES,
) -> tuple[torch.Tensor, int]:
    """A 1-D int64 label tensor with values ``>= 0``; returns ``(labels, num_classes)``.

    Every entry point that takes labels validates them here: integer dtype, 1-D, not empty, no negative value,
    and no uint64 value above int64's maximum (reported with its actual value, not the negative number a cast
    would give).

    Args:
        labels: tensor, ndarray or sequence of integers.
        name: the argument's name in error messages.
        num_classes: if given, every label must be below it; else it is ``max(labels) + 1``.
        max_classes: the bound on ``num_classes`` (default :data:`MAX_CLASSES`), for callers that size a
            per-class array by it: a larger label (or ``num_classes``) is a ``ValueError`` naming it. ``None``
            for callers that only group samples by label (see :func:`compact_labels`): any int64 label is then
            allowed.

    Raises:
        TypeError: not integers.
        ValueError: empty, not 1-D, a negative label, a uint64 label above int64's maximum, a label not below
            ``num_classes``, or ``num_classes`` above ``max_classes``.
    """
    t = as_tensor(labels, name)
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {short_repr(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    _check_unsigned_range(t, name)
    t = t.detach().to(device="cpu", dtype=torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0:
        i = first_bad_row(t < 0)
        raise ValueError(f"{name} must be >= 0; got {lo} at index {i}")
    if num_classes is None:
        if max_classes is not None and hi >= max_classes:
            i = first_bad_row(t >= max_classes)
            raise ValueError(
                f"{name} must be < {max_classes} when num_classes is not given (per-class arrays are indexed by "
                f"label, so a label is a class id); got {int(t[i])} at index {i}. Relabel the classes as "
                "0..C-1 (e.g. torch.unique(labels, return_inverse=True)[1])"
            )
        num_classes = hi + 1
    else:
        num_classes = check_int(num_classes, "num_classes", min_value=1, max_value=max_classes)
        if hi >= num_classes:
            i = first_bad_row(t >= num_classes)
            raise ValueError(
                f"{name} must be < num_classes={num_classes}; got {int(t[i])} at index {i}"
            )
    return t, num_classes


def compact_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, classes)``: the distinct label values in ascending order (``classes``) and each sample's position
    among them (``ids``, int64 in ``[0, len(classes))``), i.e. ``torch.unique(labels, return_inverse=True)``
    swapped. Classes are the label values present, as in imbalanced-learn; nothing is sized by the largest label.

    Args:
        labels: 1-D non-negative int64 labels, already checked by :func:`check_labels`.

    Example::

        >>> compact_labels(torch.tensor([7, 10**12, 7]))
        (tensor([0, 1, 0]), tensor([            7, 1000000000000]))
    """
    hi = int(labels.max())
    if hi < max(1 << 16, 2 * labels.numel()):
        # small range: a bincount and a gather, no sort (and no copy when every class 0..hi is present)
        classes = torch.nonzero(torch.bincount(labels, minlength=hi + 1)).flatten()
        if classes.numel() == hi + 1:
            return labels, classes
        lut = torch.zeros(hi + 1, dtype=torch.int64)
        lut[classes] = torch.arange(classes.numel())
        return lut[labels], classes
    classes, ids = torch.unique(labels, sorted=True, return_inverse=True)
    return ids, classes
