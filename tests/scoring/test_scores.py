"""Scores against independent float64 numpy references, stability, chunking and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_pretrain_update.scoring.scores as scores_mod
from torch_pretrain_update import compute_scores, entropy, least_confidence, margin


def _np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _ref_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=1)


def _ref_margin(p: np.ndarray) -> np.ndarray:
    s = np.sort(p, axis=1)
    return 1.0 - (s[:, -1] - s[:, -2])


def _ref_least(p: np.ndarray) -> np.ndarray:
    return 1.0 - p.max(axis=1)


REFS = {
    "entropy": (entropy, _ref_entropy),
    "margin": (margin, _ref_margin),
    "least_confidence": (least_confidence, _ref_least),
}


@pytest.fixture
def probs() -> np.ndarray:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(500, 7))
    return _np_softmax(z)


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("kind", ["tensor32", "tensor64", "numpy32", "numpy64"])
def test_scores_match_reference(name, kind, probs):
    fn, ref = REFS[name]
    dtype = np.float32 if kind.endswith("32") else np.float64
    x = probs.astype(dtype)
    if kind.startswith("tensor"):
        x = torch.from_numpy(x)
    got = fn(x)
    assert got.dtype == torch.float32 and got.shape == (500,)
    np.testing.assert_allclose(got.numpy(), ref(probs), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(compute_scores(x, name).numpy(), got.numpy())


@pytest.mark.parametrize("name", sorted(REFS))
def test_scores_from_logits_match_reference(name):
    rng = np.random.default_rng(1)
    z = rng.normal(scale=4.0, size=(300, 11))
    fn, ref = REFS[name]
    got = fn(torch.from_numpy(z), from_logits=True)
    np.testing.assert_allclose(got.numpy(), ref(_np_softmax(z)), rtol=1e-6, atol=1e-6)


def test_zero_probabilities_give_no_nan():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    h = entropy(p)
    assert torch.isfinite(h).all()
    np.testing.assert_allclose(h.numpy(), [0.0, np.log(2.0), 0.0], atol=1e-7)


@pytest.mark.parametrize("name", sorted(REFS))
def test_extreme_logits_are_stable(name):
    z = torch.tensor([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]], dtype=torch.float32)
    got = REFS[name][0](z, from_logits=True)
    assert torch.isfinite(got).all()
    expected = {
        "entropy": [0.0, np.log(2.0), np.log(3.0)],
        "margin": [0.0, 1.0, 1.0],
        "least_confidence": [0.0, 0.5, 2.0 / 3.0],
    }[name]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_chunking_gives_the_same_result(monkeypatch, probs):
    whole = entropy(probs)
    monkeypatch.setattr(scores_mod, "_CHUNK_ELEMENTS", 7 * 13)  # 13 rows per chunk, last chunk partial
    np.testing.assert_array_equal(entropy(probs).numpy(), whole.numpy())


def test_bad_row_is_reported_in_a_later_chunk(monkeypatch, probs):
    monkeypatch.setattr(scores_mod, "_CHUNK_ELEMENTS", 7 * 13)
    bad = probs.copy()
    bad[123, 2] = np.nan
    with pytest.raises(ValueError, match="row 123"):
        entropy(bad)


def test_readonly_memmap_input(tmp_path, probs):
    path = tmp_path / "p.npy"
    np.save(path, probs.astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    np.testing.assert_allclose(margin(mm).numpy(), _ref_margin(probs), atol=1e-6)


def test_half_precision_input(probs):
    got = entropy(torch.from_numpy(probs).half())
    np.testing.assert_allclose(got.numpy(), _ref_entropy(probs), atol=3e-3)


@pytest.mark.parametrize(
    "x, kwargs, exc, match",
    [
        (torch.tensor([[0.5, float("nan")]]), {}, ValueError, "finite; row 0"),
        (torch.tensor([[0.5, 0.5], [0.5, float("inf")]]), {}, ValueError, "finite; row 1"),
        (torch.tensor([[0.5, 0.5], [1.5, -0.5]]), {}, ValueError, r"\(>= 0\); row 1"),
        (torch.tensor([[0.5, 0.5], [0.3, 0.3]]), {}, ValueError, "sum to 1.*row 1 sums to 0.6"),
        (torch.tensor([[1.0, float("nan")]]), {"from_logits": True}, ValueError, "finite logits; row 0"),
        (torch.tensor([0.5, 0.5]), {}, ValueError, "2-D"),
        (torch.zeros(0, 3), {}, ValueError, "at least one row"),
        (torch.ones(4, 1), {}, ValueError, "at least 2 columns"),
        (torch.ones(2, 2, dtype=torch.int64), {}, TypeError, "floating dtype"),
        ([[0.5, 0.5]], {}, TypeError, "torch.Tensor or numpy.ndarray"),
        (torch.tensor([[0.5, 0.5]]), {"from_logits": 1}, TypeError, "from_logits must be a bool"),
    ],
)
def test_bad_input(x, kwargs, exc, match):
    for fn in (entropy, margin, least_confidence):
        with pytest.raises(exc, match=match):
            fn(x, **kwargs)


def test_unknown_score_name():
    with pytest.raises(ValueError, match="score must be one of.*'variance'"):
        compute_scores(torch.tensor([[0.5, 0.5]]), "variance")


def test_error_names_the_callers_argument():
    with pytest.raises(ValueError, match="^probs must be finite"):
        compute_scores(torch.tensor([[0.5, float("nan")]]), "entropy", name="probs")
