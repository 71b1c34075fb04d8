"""Class and sample weights against the formulas, recomputed independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_pretrain_update import class_weights, class_weights_from_counts, sample_weights

LABELS = np.array([0] * 50 + [1] * 30 + [2] * 5 + [4] * 15)  # class 3 is empty
COUNTS = np.bincount(LABELS, minlength=5).astype(np.float64)


def _reference(scheme: str, beta: float = 0.999, alpha: float = 0.5) -> np.ndarray:
    raw = np.zeros(5)
    present = COUNTS > 0
    n = COUNTS[present]
    raw[present] = {
        "inverse": 1.0 / n,
        "sqrt_inverse": 1.0 / np.sqrt(n),
        "effective_number": (1.0 - beta) / (1.0 - beta**n),
        "power": n ** (alpha - 1.0),
        "uniform": np.ones_like(n),
    }[scheme]
    return raw * COUNTS.sum() / (COUNTS * raw).sum()


@pytest.mark.parametrize("scheme", ["inverse", "sqrt_inverse", "effective_number", "power", "uniform"])
def test_class_weights_match_formula(scheme):
    w = class_weights(torch.from_numpy(LABELS), num_classes=5, scheme=scheme)
    assert w.dtype == torch.float32 and w.shape == (5,)
    np.testing.assert_allclose(w.numpy(), _reference(scheme), rtol=1e-6)
    assert w[3] == 0  # empty class
    np.testing.assert_allclose((COUNTS * w.numpy().astype(np.float64)).sum(), len(LABELS), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.9999])
def test_effective_number_betas(beta):
    w = class_weights(LABELS, num_classes=5, scheme="effective_number", beta=beta)
    np.testing.assert_allclose(w.numpy(), _reference("effective_number", beta=beta), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_power_alphas(alpha):
    w = class_weights(LABELS, num_classes=5, scheme="power", alpha=alpha)
    np.testing.assert_allclose(w.numpy(), _reference("power", alpha=alpha), rtol=1e-6)
    if alpha == 1.0:  # the natural mix: every sample weight 1
        np.testing.assert_allclose(w.numpy()[COUNTS > 0], 1.0, rtol=1e-6)


def test_power_sampling_probability_is_proportional_to_count_power():
    w = class_weights(LABELS, num_classes=5, scheme="power", alpha=0.3).double().numpy()
    mass = COUNTS * w  # probability of drawing each class when samples are drawn proportionally to w
    target = np.where(COUNTS > 0, COUNTS**0.3, 0)
    np.testing.assert_allclose(mass / mass.sum(), target / target.sum(), rtol=1e-6)


def test_sample_weights_are_class_weights_per_label():
    cw = class_weights(LABELS, scheme="sqrt_inverse")
    sw = sample_weights(LABELS, scheme="sqrt_inverse")
    assert sw.shape == (len(LABELS),)
    np.testing.assert_array_equal(sw.numpy(), cw.numpy()[LABELS])
    np.testing.assert_allclose(sw.double().mean().item(), 1.0, rtol=1e-6)


def test_num_classes_defaults_to_max_plus_one():
    assert class_weights([2, 2, 0]).shape == (3,)


def test_fractional_counts():
    w = class_weights_from_counts(torch.tensor([0.5, 1.5, 0.0]), scheme="inverse")
    # raw = [2, 2/3, 0]; sum(n * raw) = 2 = sum(n), so no rescaling
    np.testing.assert_allclose(w.numpy(), [2.0, 2.0 / 3.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    "labels, kwargs, exc, match",
    [
        ([0.0, 1.0], {}, TypeError, "labels must have an integer dtype"),
        ([0, -1], {}, ValueError, "labels must be >= 0; got -1 at index 1"),
        ([0, 5], {"num_classes": 3}, ValueError, "labels must be < num_classes=3; got 5 at index 1"),
        ([], {}, ValueError, "labels must not be empty"),
        ([[0, 1]], {}, ValueError, "labels must be 1-D"),
        ([0, 1], {"scheme": "log"}, ValueError, "scheme must be one of.*'log'"),
        ([0, 1], {"scheme": "effective_number", "beta": 1.0}, ValueError, "beta must be < 1.0; got 1.0"),
        ([0, 1], {"scheme": "power", "alpha": -0.5}, ValueError, "alpha must be >= 0.0; got -0.5"),
        ([0, 1], {"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ("01", {}, TypeError, "labels must be a torch.Tensor"),
    ],
)
def test_bad_input(labels, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        class_weights(labels, **kwargs)


@pytest.mark.parametrize(
    "counts, match",
    [([0, 0], "counts must have at least one positive"), ([1, -1], "counts must be non-negative"),
     ([1, float("nan")], "counts must be finite")],
)
def test_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        class_weights_from_counts(torch.tensor(counts, dtype=torch.float64))
