"""Per-class and per-sample weights from class frequencies.

Schemes (``n_c`` = number of samples of class ``c``):

- ``"inverse"``: ``w_c ∝ 1 / n_c``
- ``"sqrt_inverse"``: ``w_c ∝ 1 / sqrt(n_c)``
- ``"effective_number"``: ``w_c ∝ (1 - beta) / (1 - beta ** n_c)`` (Cui et al., CVPR 2019)
- ``"power"``: sampling probability of a class ``∝ n_c ** alpha``, i.e. ``w_c ∝ n_c ** (alpha - 1)``
  (the XLM language-sampling exponent; ``alpha=1`` is the natural mix, ``alpha=0`` uniform over classes)
- ``"uniform"``: ``w_c = 1``

Weights are normalised so that the mean weight over the samples is 1 (``sum_c n_c w_c = N``). A class with no
samples gets weight 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torch_pretrain_update._checks import (
    check_choice,
    check_float,
    check_labels,
    check_vector,
    compact_labels,
    first_bad_row,
)

__all__ = ["class_weights", "sample_weights", "class_weights_from_counts", "WEIGHT_SCHEMES"]

WEIGHT_SCHEMES = ("inverse", "sqrt_inverse", "effective_number", "power", "uniform")


def check_scheme_args(scheme: str, beta: float, alpha: float) -> tuple[str, float, float]:
    """Validate a weighting scheme and its parameters (so callers can refuse them before reading any data)."""
    check_choice(scheme, "scheme", WEIGHT_SCHEMES)
    beta = check_float(beta, "beta", low=0.0, high=1.0, high_inclusive=False)
    alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
    return scheme, beta, alpha


def class_weights_from_counts(
    counts: Any,
    *,
    scheme: str = "inverse",
    beta: float = 0.999,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Class weights from class counts (which may be fractional, e.g. running averages).

    Args:
        counts: 1-D non-negative counts per class (at least one positive).
        scheme: one of ``"inverse"``, ``"sqrt_inverse"``, ``"effective_number"``, ``"power"``, ``"uniform"``.
        beta: ``effective_number`` parameter in ``[0, 1)``.
        alpha: ``power`` exponent in ``[0, 1]``.

    Returns:
        float32 tensor of shape (C,) with ``sum_c counts_c * w_c = sum_c counts_c``; 0 for empty classes.
        Scale-free (except ``effective_number``): counts near the ends of float64 (a sum that overflows,
        subnormal counts) give the weights of the same counts scaled by a power of two.

    Raises:
        ValueError: counts that are not finite, negative or all zero, or that give a class a weight beyond
            float32's range (a count over ~1e38 times smaller than the total, e.g. a decayed running count).

    Example::

        >>> class_weights_from_counts([1, 3], scheme="inverse")
        tensor([2.0000, 0.6667])
    """
    scheme, beta, alpha = check_scheme_args(scheme, beta, alpha)
    n_all = check_vector(counts, "counts", allow_all_zero=False)
    # Only the classes present take part (an empty class gets 0), so that dropping empty classes, as
    # sample_weights does, gives bit-identical weights.
    present = torch.nonzero(n_all > 0).flatten()
    n = n_all[present]
    # w_c = raw_c * sum(n) / sum(n * raw): scale-free for every scheme but effective_number. Computed on the
    # counts divided by a power of two (exact) that brings the largest to [0.5, 1), so that counts near the
    # ends of float64 (sum overflowing, subnormal counts) give the weights of any scaled copy.
    p = _scaled(n)
    if scheme == "inverse":
        raw, mass = 1.0 / p, torch.ones_like(p)
    elif scheme == "sqrt_inverse":
        raw, mass = p.rsqrt(), p.sqrt()
    elif scheme == "power":
        raw, mass = p.pow(alpha - 1.0), p.pow(alpha)
    elif scheme == "uniform" or beta == 0.0:
        raw, mass = torch.ones_like(p), p
    else:  # effective_number depends on the absolute counts: raw = (1 - beta) / (1 - beta**n)
        raw, mass = _effective_number(n, beta)
        mass = mass * (p / n)  # n * raw on the scale of p (exact: p / n is a power of two)
    w = raw * (p.sum() / mass.sum())
    bad = ~torch.isfinite(w) | (w > torch.finfo(torch.float32).max)
    if bool(bad.any()):
        j = first_bad_row(bad)
        c = int(present[j])
        raise ValueError(
            f"counts give class {c} (count {n[j].item()}) a weight of {w[j].item()}, beyond float32's range: "
            f"the counts span too many orders of magnitude (largest {n.max().item()})"
        )
    out = torch.zeros(n_all.numel(), dtype=torch.float32)
    out[present] = w.to(torch.float32)
    return out


def _scaled(n: torch.Tensor) -> torch.Tensor:
    """``n * 2**-e`` with the largest entry in ``[0.5, 1)``: exact for normal results, in two steps so that the
    factor itself never overflows (``2**1074`` does not exist in float64)."""
    e = math.frexp(float(n.max()))[1]
    a = -e // 2
    return n * math.ldexp(1.0, a) * math.ldexp(1.0, -e - a)


def _effective_number(n: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, n * raw)`` of the effective-number scheme, ``raw = (1 - beta) / (1 - beta**n)``.

    ``1 - beta**n = -expm1(n log beta)`` avoids cancellation for beta near 1. ``n * raw`` is computed as
    ``(1 - beta) / -log(beta) * x / -expm1(-x)`` with ``x = -n log beta``, which tends to a finite limit as
    ``n -> 0`` (where ``raw`` itself grows without bound) instead of ``0 * inf``.
    """
    k = -math.log(beta)
    x = n * k
    denom = -torch.expm1(-x)
    tiny = x < 1e-200  # x / (1 - e**-x) = 1 to float64 precision, and safe from 0 / 0
    ratio = torch.where(tiny, torch.ones_like(x), x / torch.where(tiny, torch.ones_like(denom), denom))
    return (1.0 - beta) / denom, (1.0 - beta) / k * ratio


def class_weights(
    labels: Any,
    *,
    num_classes: int | None = None,
    scheme: str = "inverse",
    beta: float = 0.999,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Per-class weights from integer labels.

    Args:
        labels: 1-D integer labels in ``[0, num_classes)`` (tensor, ndarray or sequence). The result is indexed
            by label, so labels (and ``num_classes``) must stay below ``MAX_CLASSES = 2**24``: a larger one is a
            ``ValueError`` naming it (relabel, or use :func:`sample_weights`, which takes any label values).
        num_classes: number of classes; defaults to ``max(labels) + 1``.
        scheme: see the module docstring.
        beta: ``effective_number`` parameter in ``[0, 1)``.
        alpha: ``power`` exponent in ``[0, 1]``.

    Returns:
        float32 tensor of shape (C,), normalised so that the mean weight over the samples is 1.

    Example::

        >>> class_weights(torch.tensor([0, 1, 1, 1]))
        tensor([2.0000, 0.6667])
    """
    t, num_classes = check_labels(labels, "labels", num_classes=num_classes)
    counts = torch.bincount(t, minlength=num_classes)
    return class_weights_from_counts(counts, scheme=scheme, beta=beta, alpha=alpha)


def sample_weights(
    labels: Any,
    *,
    num_classes: int | None = None,
    scheme: str = "inverse",
    beta: float = 0.999,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Per-sample weights: the class weight of each sample's label (mean 1 over the samples).

    Same arguments as :func:`class_weights`, but the classes are the distinct label values (any non-negative
    int64; ``num_classes``, if given, only bounds them). Returns a float32 tensor of shape (N,).

    Example::

        >>> sample_weights(torch.tensor([0, 1, 1, 1]))
        tensor([2.0000, 0.6667, 0.6667, 0.6667])
    """
    t, _ = check_labels(labels, "labels", num_classes=num_classes, max_classes=None)
    ids, _ = compact_labels(t)  # only the grouping matters: any label value works, nothing sized by max(labels)
    w = class_weights_from_counts(torch.bincount(ids), scheme=scheme, beta=beta, alpha=alpha)
    return w[ids]
