"""Input checks of the plan functions and samplers (private to this package): weights, scores, index subsets and
exclusions, plan lengths.

Each raises ``TypeError``/``ValueError`` whose message names the argument and the first bad value (its index),
and returns the input in the one form the plans use (a CPU tensor of a fixed dtype). Large inputs are scanned in
chunks of :data:`SCAN` elements, so that checking 10^8 weights makes no full-size temporary.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, Optional

import torch

from torch_pretrain_update._checks import as_tensor, check_int, short_repr

__all__: list[str] = []  # private module

#: elements per chunk for validation passes (no full-size temporaries on N = 1e8).
SCAN = 1 << 22


def first_index(t: torch.Tensor, pred: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """First index where ``pred(chunk)`` is True, scanning in chunks (no full-size mask); -1 if none."""
    for s in range(0, t.numel(), SCAN):
        hit = torch.nonzero(pred(t[s : s + SCAN]))
        if hit.numel():
            return s + int(hit[0, 0])
    return -1


def count_positive(t: torch.Tensor) -> int:
    """Number of entries ``> 0``, counted in chunks."""
    return sum(int(torch.count_nonzero(t[s : s + SCAN] > 0)) for s in range(0, t.numel(), SCAN))


def _real_vector(values: Any, name: str) -> torch.Tensor:
    """A 1-D, non-empty, finite CPU float tensor (float16/bfloat16 -> float32, integers -> float64)."""
    t = as_tensor(values, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers; got {short_repr(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    return t


def check_weights(weights: Any, name: str = "weights") -> torch.Tensor:
    """A 1-D, finite, non-negative weight vector with a positive entry, as a CPU float tensor.

    float32/float64 tensors are returned without a copy (a float16/bfloat16 or integer input is converted to
    float32/float64). Validation is one ``aminmax`` pass; the first bad index is searched for only on failure.

    Raises:
        TypeError: not a tensor/array/sequence of real numbers.
        ValueError: not 1-D, empty, NaN/inf, a negative entry, or all zeros; the message names the index.
    """
    t = _real_vector(weights, name)
    lo, hi = (float(x) for x in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        i = first_index(t, lambda c: ~torch.isfinite(c))
        raise ValueError(f"{name} must be finite; got {t[i].item()} at index {i}")
    if lo < 0:
        i = first_index(t, lambda c: c < 0)
        raise ValueError(f"{name} must be non-negative; got {t[i].item()} at index {i}")
    if hi <= 0:
        raise ValueError(f"{name} must have at least one positive entry; all {t.numel()} are zero")
    return t


def check_scores(scores: Any, name: str = "scores", *, non_negative: bool) -> torch.Tensor:
    """1-D finite scores as a CPU float tensor; with ``non_negative`` (power sampling) no negative entry."""
    t = _real_vector(scores, name)
    lo, hi = (float(x) for x in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        i = first_index(t, lambda c: ~torch.isfinite(c))
        raise ValueError(f"{name} must be finite; got {t[i].item()} at index {i}")
    if non_negative and lo < 0:
        i = first_index(t, lambda c: c < 0)
        raise ValueError(f"{name} must be non-negative for mode='proportional'; got {t[i].item()} at index {i}")
    return t


def _indices_or_mask(value: Any, n: int, name: str) -> torch.Tensor:
    """1-D integer indices in ``[0, n)`` (as int64) or a bool mask of length ``n``, checked."""
    t = as_tensor(value, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (indices or a bool mask); got shape {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        if t.numel() != n:
            raise ValueError(
                f"{name} as a bool mask must have length {n}; got length {t.numel()} (one entry per sample)"
            )
        return t
    if t.numel() == 0:  # e.g. [] (as_tensor makes it float): no index
        return t.to(torch.int64)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be integer indices or a bool mask; got {short_repr(t)}")
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= n)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        what = name if name.endswith("indices") else f"{name} indices"
        raise ValueError(f"{what} must be in [0, {n}); got {int(t[i])} at position {i}")
    return t


def exclude_mask(exclude: Any, n: int, name: str = "exclude") -> Optional[torch.Tensor]:
    """A bool mask of shape ``(n,)`` (True = never select) from ``None``, a bool mask or integer indices
    (duplicates allowed); ``None`` for ``None``.

    Raises:
        TypeError: floating-point values, or not a tensor/array/sequence.
        ValueError: a mask of the wrong length, or an index outside ``[0, n)``.
    """
    if exclude is None:
        return None
    t = _indices_or_mask(exclude, n, name)
    if t.dtype == torch.bool:
        return t.clone()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[t] = True
    return mask


def exclude_pool(exclude: Any, n: int, noun: str = "samples") -> Optional[torch.Tensor]:
    """The ascending indices ``exclude`` leaves selectable, or ``None`` when it excludes nothing.

    Raises ``ValueError`` when nothing is left ("exclude removes all ``n`` ``noun``").
    """
    mask = exclude_mask(exclude, n)
    if mask is None or not bool(mask.any()):
        return None
    pool = torch.nonzero(~mask).flatten()
    if pool.numel() == 0:
        raise ValueError(f"exclude removes all {n} {noun}: nothing is left to select from")
    return pool


def check_indices(indices: Any, n: int, name: str = "indices") -> torch.Tensor:
    """A non-empty index subset: 1-D integer indices in ``[0, n)`` (order kept, duplicates allowed) or a bool
    mask of length ``n``, as an int64 tensor of indices."""
    t = _indices_or_mask(indices, n, name)
    if t.dtype == torch.bool:
        t = torch.nonzero(t).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} must select at least one of the {n} samples; got none")
    return t


def check_num_samples(num_samples: Any, available: int | None = None, what: str = "", detail: str = "") -> int:
    """``num_samples`` as an int in ``[1, 2**63 - 1]`` (plan positions are int64 and ``len(sampler)`` must fit
    a ``Py_ssize_t``); with ``available``, at most that many (a draw without replacement), the message saying
    ``what`` they are (``detail`` in place of the bare count, e.g. ``"170 of 200 after exclude"``)."""
    num_samples = check_int(num_samples, "num_samples", min_value=1, max_value=sys.maxsize)
    if available is not None and num_samples > available:
        raise ValueError(
            f"num_samples must be <= {what} ({detail or available}) without replacement; got {num_samples}"
        )
    return num_samples


def check_subset_size(
    num_samples: Any, pool: torch.Tensor | None, n: int, *, replacement: bool = False
) -> int:
    """``num_samples`` of a selection from ``range(n)``, or from ``pool`` (what ``exclude`` leaves): at most
    that many without replacement."""
    if replacement:
        return check_num_samples(num_samples)
    if pool is None:
        return check_num_samples(num_samples, n, "the number of samples")
    return check_num_samples(num_samples, pool.numel(), "the number of samples left after exclude")


def check_seed_epoch(seed: Any, epoch: Any) -> tuple[int, int]:
    return check_int(seed, "seed"), check_int(epoch, "epoch", min_value=0)


def index_dtype(n: int) -> torch.dtype:
    """int32 for indices below ``2**31`` (half the memory of a selection), else int64."""
    return torch.int32 if n < 2**31 else torch.int64


def num_items(data_source: Any) -> int:
    """``N`` of a sized dataset or an int."""
    if isinstance(data_source, numbers.Integral) and not isinstance(data_source, bool):
        return check_int(data_source, "data_source", min_value=1)
    if hasattr(data_source, "__len__"):
        try:
            n = len(data_source)
        except TypeError as exc:  # e.g. an IterableDataset that defines __len__ but raises
            raise TypeError(f"data_source must be a sized dataset or an int; len() failed: {exc}") from exc
        if n < 1:
            raise ValueError(f"data_source must not be empty; got len(data_source) = {n}")
        return int(n)
    raise TypeError(f"data_source must be a sized dataset or an int; got {type(data_source).__name__}")


def check_counts(class_counts: Any, name: str) -> torch.Tensor:
    """1-D non-negative integer counts per class, as int64."""
    t = as_tensor(class_counts, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {short_repr(t)}")
    t = t.detach().to(device="cpu", dtype=torch.int64)
    neg = t < 0
    if bool(neg.any()):
        i = int(torch.nonzero(neg)[0, 0])
        raise ValueError(f"{name} must be non-negative; got {int(t[i])} at index {i}")
    return t
