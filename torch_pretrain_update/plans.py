"""Pure plan functions: ``(inputs, seed, epoch) -> LongTensor`` of indices, no DataLoader, no global RNG.

Every random draw comes from :func:`torch_pretrain_update._rng.epoch_generator` seeded by ``(seed, epoch, ...)``,
so a plan is a pure function of its arguments: the samplers in :mod:`torch_pretrain_update.samplers` only split
it across ranks and remember a position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torch_pretrain_update._checks import _short, as_tensor, check_int

__all__ = ["stratified_quotas"]


def _check_counts(class_counts: Any, name: str) -> torch.Tensor:
    t = as_tensor(class_counts, name)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {_short(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    t = t.detach().to(device="cpu", dtype=torch.int64)
    neg = t < 0
    if bool(neg.any()):
        i = int(torch.nonzero(neg)[0, 0])
        raise ValueError(f"{name} must be non-negative; got {int(t[i])} at index {i}")
    return t


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` proportionally to ``counts`` (a 1-D array, sum > 0) by largest-remainder rounding.

    Exact integer arithmetic: class ``c`` gets ``floor(total * n_c / N)`` plus one if its remainder
    ``total * n_c mod N`` is among the ``total - sum(floors)`` largest; equal remainders go to the lower index
    (a stable sort). ``counts`` may be an object array of Python ints when ``total * max(n)`` overflows int64.
    """
    n_total = int(counts.sum())
    prod = counts * total
    floors = prod // n_total
    rems = prod % n_total
    left = total - int(floors.sum())
    order = np.argsort(-rems, kind="stable")  # descending remainder, ties by lower class index
    out = floors.copy()
    out[order[:left]] += 1
    return out


def stratified_quotas(class_counts: torch.Tensor, num_samples: int, *, min_per_class: int = 1) -> torch.Tensor:
    """Per-class quotas for class-stratified selection without replacement.

    The quotas are proportional to the class sizes with largest-remainder (Hamilton) rounding: class ``c`` of
    ``n_c`` (out of ``N``) gets ``floor(num_samples * n_c / N)``, and the ``num_samples - sum(floors)`` classes
    with the largest remainders get one more; **equal remainders are broken in favour of the lower class
    index**. Then every class that has at least ``min_per_class`` samples is raised to ``min_per_class``: such a
    class is fixed at that minimum and the rest of the budget is re-apportioned over the other classes the same
    way, repeating until no class falls below its minimum (at most ``C`` rounds). A class with fewer than
    ``min_per_class`` samples is not guaranteed anything beyond its proportional share. The result never
    exceeds a class's size and sums exactly to ``num_samples``.

    Computed in exact integer arithmetic (no floating-point rounding of the shares).

    Args:
        class_counts: 1-D non-negative integer counts per class (``torch.Tensor``, ndarray or sequence).
        num_samples: total to select, in ``[1, sum(class_counts)]``.
        min_per_class: the minimum for every class that has at least that many samples (``>= 0``).

    Returns:
        int64 tensor of shape ``(C,)``.

    Raises:
        TypeError: non-integer counts or arguments.
        ValueError: negative or empty counts, ``num_samples`` out of range, or minimums that need more than
            ``num_samples`` in total.

    Example::

        >>> stratified_quotas(torch.tensor([50, 30, 15, 5]), 10)
        tensor([5, 3, 1, 1])
        >>> stratified_quotas(torch.tensor([97, 2, 1]), 10, min_per_class=2)
        tensor([8, 2, 0])
    """
    counts_t = _check_counts(class_counts, "class_counts")
    total = int(counts_t.sum())
    num_samples = check_int(num_samples, "num_samples", min_value=1)
    min_per_class = check_int(min_per_class, "min_per_class", min_value=0)
    if num_samples > total:
        raise ValueError(
            f"num_samples must be <= the number of samples available (sum of class_counts = {total}); "
            f"got {num_samples}"
        )
    counts = counts_t.numpy()
    guaranteed = np.where(counts >= min_per_class, min_per_class, 0)
    need = int(guaranteed.sum())
    if need > num_samples:
        eligible = int((counts >= min_per_class).sum()) if min_per_class > 0 else 0
        raise ValueError(
            f"min_per_class={min_per_class} for the {eligible} classes that have that many samples needs "
            f"{need} samples, more than num_samples={num_samples}"
        )
    # Exact integers: int64 when num_samples * max(count) fits, Python ints (object array) otherwise.
    if int(counts.max()) * num_samples >= 2**62:
        counts = counts.astype(object)
        guaranteed = guaranteed.astype(object)
    fixed = np.zeros(len(counts), dtype=bool)
    while True:
        free = ~fixed
        budget = num_samples - int(guaranteed[fixed].sum())
        quotas = guaranteed.copy()
        if budget > 0:
            # Classes are fixed only when their proportional share is below their minimum (hence below their
            # size), so the free classes always hold at least ``budget`` samples: see the tests.
            quotas[free] = _largest_remainder(counts[free], budget)
        else:
            quotas[free] = 0
        short = free & (quotas < guaranteed)
        if not short.any():
            break
        fixed |= short
    return torch.as_tensor(quotas.astype(np.int64), dtype=torch.int64)
