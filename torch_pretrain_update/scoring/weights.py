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

from typing import Any

import torch

from torch_pretrain_update._checks import check_choice, check_float, check_labels, check_vector

__all__ = ["class_weights", "sample_weights", "class_weights_from_counts", "WEIGHT_SCHEMES"]

WEIGHT_SCHEMES = ("inverse", "sqrt_inverse", "effective_number", "power", "uniform")


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

    Example::

        >>> class_weights_from_counts([1, 3], scheme="inverse")
        tensor([2.0000, 0.6667])
    """
    check_choice(scheme, "scheme", WEIGHT_SCHEMES)
    beta = check_float(beta, "beta", low=0.0, high=1.0, high_inclusive=False)
    alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
    n = check_vector(counts, "counts", allow_all_zero=False)
    present = n > 0
    safe = torch.where(present, n, torch.ones_like(n))
    if scheme == "inverse":
        raw = 1.0 / safe
    elif scheme == "sqrt_inverse":
        raw = safe.rsqrt()
    elif scheme == "effective_number":
        # (1 - beta) / (1 - beta**n); -expm1(n log beta) = 1 - beta**n without cancellation for beta near 1.
        raw = (1.0 - beta) / -torch.expm1(safe * torch.log(torch.tensor(beta, dtype=torch.float64)))
        if beta == 0.0:
            raw = torch.ones_like(safe)
    elif scheme == "power":
        raw = safe.pow(alpha - 1.0)
    else:
        raw = torch.ones_like(safe)
    raw = torch.where(present, raw, torch.zeros_like(raw))
    total = n.sum()
    w = raw * (total / (n * raw).sum())
    return w.to(torch.float32)


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
        labels: 1-D integer labels in ``[0, num_classes)`` (tensor, ndarray or sequence).
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

    Same arguments as :func:`class_weights`. Returns a float32 tensor of shape (N,).

    Example::

        >>> sample_weights(torch.tensor([0, 1, 1, 1]))
        tensor([2.0000, 0.6667, 0.6667, 0.6667])
    """
    t, num_classes = check_labels(labels, "labels", num_classes=num_classes)
    counts = torch.bincount(t, minlength=num_classes)
    w = class_weights_from_counts(counts, scheme=scheme, beta=beta, alpha=alpha)
    return w[t]
