"""Input checks: the bottom layer. Every public entry point validates here, up front.

Each helper raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value) with a
message that names the argument, the value received and what is allowed. Never ``assert``: asserts vanish
under ``python -O``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

__all__: list[str] = []  # private module


def _short(value: Any) -> str:
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
        raise ValueError(f"{name} must be one of {allowed}; got {_short(value)}")
    return value


def check_int(value: Any, name: str, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """An integer (bools refused) within ``[min_value, max_value]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {_short(value)} of type {type(value).__name__}")
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
        raise TypeError(f"{name} must be a real number; got {_short(value)} of type {type(value).__name__}")
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
        raise TypeError(f"{name} must be a bool; got {_short(value)} of type {type(value).__name__}")
    return bool(value)


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A tensor view of a tensor, ndarray or sequence (no copy where torch can share memory)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array; got an object array {_short(value)}")
        if not value.flags.writeable:
            # torch.from_numpy warns on read-only arrays (e.g. np.load(mmap_mode="r")); copy instead.
            return torch.tensor(value)
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple, range)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a sequence of numbers; got {_short(value)}") from exc
    raise TypeError(
        f"{name} must be a torch.Tensor, numpy.ndarray or sequence; got {type(value).__name__}"
    )


def check_matrix(x: Any, name: str, *, min_cols: int = 2) -> torch.Tensor | np.ndarray:
    """A 2-D float matrix (N >= 1, C >= ``min_cols``). Returned as given (tensor or ndarray, no copy)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must have a floating dtype; got {_short(x)}")
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {_short(x)}")
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
        raise TypeError(f"{name} must be real numbers; got {_short(t)}")
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


def check_labels(labels: Any, name: str = "labels", *, num_classes: int | None = None) -> tuple[torch.Tensor, int]:
    """A 1-D int64 label tensor with values in ``[0, num_classes)``; returns ``(labels, num_classes)``."""
    t = as_tensor(labels, name)
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {_short(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0:
        i = first_bad_row(t < 0)
        raise ValueError(f"{name} must be >= 0; got {lo} at index {i}")
    if num_classes is None:
        num_classes = hi + 1
    else:
        num_classes = check_int(num_classes, "num_classes", min_value=1)
        if hi >= num_classes:
            i = first_bad_row(t >= num_classes)
            raise ValueError(
                f"{name} must be < num_classes={num_classes}; got {int(t[i])} at index {i}"
            )
    return t, num_classes
