"""Reference formulas the tests recompute results against, in float64 NumPy (independent of the package)."""

from __future__ import annotations

from typing import Any

import numpy as np


def entropy64(p: Any) -> np.ndarray:
    """Shannon entropy (nats) of each row of probabilities ``p``; ``0 log 0 = 0``."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def topk_ref(scores: Any, k: int) -> np.ndarray:
    """Indices of the k highest scores, ties to the lower index, ascending (a stable sort on -score)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:k])
