"""k-means pseudo-classes: agreement with scikit-learn, determinism, empty clusters, errors, the class samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from torch_pretrain_update import ClassBalancedSampler, StratifiedSampler, kmeans_labels
from torch_pretrain_update.scoring import clusters

# small matmuls: one intra-op thread (see the fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blobs(n: int, d: int, k: int, std: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n, d, centers=k, cluster_std=std, random_state=seed)
    return x.astype(np.float32), y


def _inertia(x: np.ndarray, labels: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def test_separated_blobs_recovered_exactly_like_sklearn() -> None:
    x, y = _blobs(3000, 8, 5, 1.0)
    labels = kmeans_labels(x, 5, seed=0)
    assert labels.dtype == torch.int64 and labels.shape == (3000,)
    assert adjusted_rand_score(y, labels.numpy()) == 1.0
    sk = KMeans(5, n_init=1, random_state=0).fit(x)
    assert _inertia(x, labels.numpy()) == pytest.approx(sk.inertia_, rel=1e-4)


@pytest.mark.parametrize("n, d, k, std", [(6000, 16, 20, 3.0), (4000, 32, 40, 5.0)])
def test_inertia_within_a_few_percent_of_sklearn(n, d, k, std) -> None:
    x, _ = _blobs(n, d, k, std, seed=1)
    ours = _inertia(x, kmeans_labels(x, k, seed=0).numpy())
    theirs = KMeans(k, n_init=1, random_state=0).fit(x).inertia_
    assert ours <= 1.04 * theirs


def test_deterministic_for_a_seed_and_chunking() -> None:
    x, _ = _blobs(2000, 16, 30, 4.0, seed=2)
    a = kmeans_labels(x, 30, seed=5)
    assert torch.equal(a, kmeans_labels(x, 30, seed=5))
    assert torch.equal(a, kmeans_labels(torch.from_numpy(x), 30, seed=5))  # tensor or ndarray
    assert torch.equal(a, kmeans_labels(x, 30, seed=5, chunk_size=77))  # memory O(chunk * k), same result
    assert not torch.equal(a, kmeans_labels(x, 30, seed=6))  # overlapping blobs: the seed matters
    assert set(a.tolist()) == set(range(30))


def test_accelerator_sums_equal_the_cpu_sums() -> None:
    """The one-hot matmul used on accelerators (deterministic, unlike atomic index_add_) gives the same sums."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, generator=g)
    labels = torch.randint(0, 7, (1000,), generator=g)
    a = clusters._cluster_sums(x, labels, 7, 64, onehot=False)
    b = clusters._cluster_sums(x, labels, 7, 64, onehot=True)
    expected = torch.zeros(7, 5, dtype=torch.float64).index_add_(0, labels, x.double())
    assert torch.allclose(a, expected, rtol=0, atol=1e-4) and torch.allclose(b, expected, rtol=0, atol=1e-4)


def test_empty_cluster_is_reseeded_from_the_farthest_point(monkeypatch) -> None:
    x, y = _blobs(600, 2, 3, 0.5, seed=3)
    real = clusters._kmeans_pp

    def bad_init(x, x_sq, k, gen, rows):
        c = real(x, x_sq, k, gen, rows)
        c[2] = 1e4  # far from every point: empty after the first assignment
        return c

    monkeypatch.setattr(clusters, "_kmeans_pp", bad_init)
    labels = kmeans_labels(x, 3, seed=0)
    assert set(labels.tolist()) == {0, 1, 2}
    assert adjusted_rand_score(y, labels.numpy()) == 1.0


def test_fewer_distinct_points_than_k() -> None:
    x = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0]], dtype=np.float32), 50, axis=0)
    labels = kmeans_labels(x, 3, seed=0)
    assert len(set(labels[:50].tolist())) == 1 and len(set(labels[50:].tolist())) == 1
    assert labels[0] != labels[50]
    assert torch.equal(kmeans_labels(x[:1], 1), torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize(
    "emb, k, exc, match",
    [
        (np.zeros((4, 2), np.float32), 5, ValueError, r"k must be <= the number of rows of embeddings \(4\); got k=5"),
        (np.zeros((4, 2), np.float32), 0, ValueError, r"k must be >= 1"),
        (np.zeros((4, 2), np.float32), 2.0, TypeError, r"k must be an int"),
        (np.zeros(4, np.float32), 2, ValueError, r"embeddings must be 2-D of shape \(N, D\); got shape \(4,\)"),
        (np.zeros((0, 3), np.float32), 1, ValueError, r"embeddings must have at least one row"),
        (np.zeros((4, 2), np.int64), 2, TypeError, r"embeddings must have a floating dtype"),
        ([[0.0, 1.0]], 1, TypeError, r"embeddings must be a 2-D torch.Tensor or numpy.ndarray; got list"),
    ],
)
def test_bad_input_names_the_argument(emb, k, exc, match) -> None:
    with pytest.raises(exc, match=match):
        kmeans_labels(emb, k)


def test_nan_names_the_row() -> None:
    x = torch.randn(10, 3)
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings must be finite; row 7"):
        kmeans_labels(x, 2)
    x[7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings must be finite; row 7"):
        kmeans_labels(x, 2)


def test_pseudo_classes_feed_the_class_samplers() -> None:
    x, _ = _blobs(900, 4, 3, 0.5, seed=4)
    x = np.concatenate([x, x[:300] + 0.01])  # the first blob's points twice: uneven clusters
    labels = kmeans_labels(x, 3, seed=0)
    counts = torch.bincount(labels).tolist()
    # one of each: exactly min(count) indices of every cluster per epoch
    sampler = ClassBalancedSampler(labels, samples_per_class="min", seed=0)
    picked = torch.tensor(list(sampler))
    assert torch.bincount(labels[picked], minlength=3).tolist() == [min(counts)] * 3
    # stratified: quotas proportional to the cluster sizes (largest remainder)
    sampler = StratifiedSampler(labels, 120, seed=0)
    picked = torch.tensor(list(sampler))
    assert torch.bincount(labels[picked], minlength=3).tolist() == [round(120 * c / sum(counts)) for c in counts]
