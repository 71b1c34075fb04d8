"""Pseudo-classes without labels: k-means on embeddings, ready for the class-based samplers.

Pretraining data has no labels, but the class-based machinery (:class:`~torch_pretrain_update.ClassBalancedSampler`,
:class:`~torch_pretrain_update.StratifiedSampler`, class weights) only needs *some* grouping. Clustering the
samples' embeddings gives one: balancing over clusters spreads a budget across the regions of the embedding
space instead of letting the densest region (boilerplate, one dominant domain) take most of it, as the
cluster-diverse selection of "D4: Improving LLM Pretraining via Document De-Duplication and Diversification"
does.

Why k-means in torch rather than ``sklearn.cluster.KMeans``: no extra run-time dependency (scikit-learn is only a
dev/demo extra here); the embeddings usually come out of a model as torch tensors, possibly on a GPU, and are
clustered where they are without a copy to numpy; and the distance computation is chunked, so memory stays
``O(chunk * k)`` beyond the input whatever N is (scikit-learn's Lloyd also chunks, but needs a float64 or float32
C-contiguous numpy copy of the whole input). The algorithm is the same as scikit-learn's default (greedy k-means++
initialisation with ``2 + log(k)`` local trials, Lloyd iterations, tolerance relative to the data's variance,
empty clusters re-seeded from the points farthest from their centres); ``tests/test_clusters.py`` checks the
inertia against scikit-learn's on blobs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from torch_pretrain_update._checks import check_float, check_int, first_bad_row, short_repr

__all__ = ["kmeans_labels"]

Matrix = Union[torch.Tensor, np.ndarray]

#: distance-matrix elements per chunk (float32: 1 MiB, stays in cache): rows per chunk = this // k.
_CHUNK_ELEMENTS = 1 << 18


class _KMeansResult(NamedTuple):
    labels: torch.Tensor  # int64 (N,) on the CPU
    centers: torch.Tensor  # (k, D) on the input's device, in the original (uncentred) coordinates
    inertia: float  # sum of squared distances of each point to its centre
    n_iter: int


def check_embeddings(embeddings: Any, name: str = "embeddings") -> torch.Tensor:
    """A finite 2-D float tensor (N >= 1, D >= 1) on its own device; float32 unless given float64."""
    if isinstance(embeddings, np.ndarray):
        if embeddings.dtype.kind != "f":
            raise TypeError(f"{name} must have a floating dtype; got {short_repr(embeddings)}")
        x = torch.from_numpy(np.ascontiguousarray(embeddings)) if embeddings.flags.writeable else \
            torch.tensor(embeddings)
    elif isinstance(embeddings, torch.Tensor):
        if not embeddings.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {short_repr(embeddings)}")
        x = embeddings.detach()
    else:
        raise TypeError(f"{name} must be a 2-D torch.Tensor or numpy.ndarray; got {type(embeddings).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D of shape (N, D); got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column; got shape {tuple(x.shape)}")
    if x.dtype != torch.float64:
        x = x.float()  # float16 / bfloat16: compute in float32
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        i = first_bad_row(~finite.cpu())
        raise ValueError(f"{name} must be finite; row {i} is {x[i].tolist()[:8]}")
    return x


def _rows_per_chunk(k: int, chunk_size: int | None) -> int:
    return chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(k, 1))


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre (lowest index on ties) and the squared distance to it, one chunk of rows at a time."""
    c_sq = (centers * centers).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], rows):
        d = torch.addmm(c_sq.unsqueeze(0), x[s : s + rows], centers.T, alpha=-2.0)  # (rows, k): |c|^2 - 2 x.c
        m, j = d.min(dim=1)  # |x|^2 is the same for every centre: added to the minimum only
        labels[s : s + rows] = j
        dist[s : s + rows] = (m + x_sq[s : s + rows]).clamp_(min=0.0)
    return labels, dist


def _sq_dist_to(x: torch.Tensor, x_sq: torch.Tensor, points: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, m) squared distances from every row of ``x`` to each of the ``m`` rows of ``points`` (m small)."""
    p_sq = (points * points).sum(1)
    out = torch.empty(x.shape[0], points.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], rows):
        d = torch.addmm(p_sq.unsqueeze(0), x[s : s + rows], points.T, alpha=-2.0)
        d += x_sq[s : s + rows, None]
        out[s : s + rows] = d.clamp_(min=0.0)
    return out


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator, rows: int) -> torch.Tensor:
    """Greedy k-means++ ("k-means++: The Advantages of Careful Seeding"; greedy trials as in scikit-learn): each
    new centre is the best of ``2 + log(k)`` candidates drawn in proportion to the squared distance to the
    nearest centre chosen so far. Random numbers come from the CPU generator ``gen`` (same draws on any device)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    idx = [int(torch.randint(n, (1,), generator=gen))]
    closest = _sq_dist_to(x, x_sq, x[idx], rows)[:, 0]
    for _ in range(1, k):
        u = torch.rand(trials, generator=gen, dtype=torch.float64)
        # float64 cumulative sums with searchsorted: torch.multinomial refuses more than 2**24 categories
        cum = torch.cumsum(closest.double(), 0)
        total = float(cum[-1])
        if total <= 0.0:  # every point coincides with a chosen centre: any point will do
            cand = torch.randint(n, (trials,), generator=gen)
        else:
            cand = torch.searchsorted(cum, (u * total).to(cum.device), right=True).clamp_(max=n - 1).cpu()
        d = _sq_dist_to(x, x_sq, x[cand.to(x.device)], rows)  # (N, trials)
        pot = torch.minimum(d, closest[:, None]).sum(0)
        best = int(torch.argmin(pot))  # the first on ties
        idx.append(int(cand[best]))
        closest = torch.minimum(closest, d[:, best])
    return x[torch.tensor(idx, device=x.device)].clone()


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int, rows: int, onehot: bool) -> torch.Tensor:
    """Per-cluster sums of the rows: each chunk summed in the input's dtype, the chunks added up in float64 (so
    rounding does not grow with N, and no float64 copy of the input is made). ``index_add_`` (a fixed order on the
    CPU), or with ``onehot`` (used on accelerators, where ``index_add_`` is atomic and its sums would depend on
    thread timing) a one-hot matmul per chunk."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    part = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], rows):
        if not onehot:
            part.zero_().index_add_(0, labels[s : s + rows], x[s : s + rows])
        else:
            hot = torch.nn.functional.one_hot(labels[s : s + rows], k).to(x.dtype)
            torch.mm(hot.T, x[s : s + rows], out=part)
        sums += part
    return sums


def _kmeans(
    embeddings: Any, k: int, *, seed: int = 0, iters: int = 100, tol: float = 1e-4, chunk_size: int | None = None
) -> _KMeansResult:
    x = check_embeddings(embeddings)
    n = x.shape[0]
    k = check_int(k, "k", min_value=1)
    if k > n:
        raise ValueError(f"k must be <= the number of rows of embeddings ({n}); got k={k}")
    seed = check_int(seed, "seed", min_value=0)
    iters = check_int(iters, "iters", min_value=1)
    tol = check_float(tol, "tol", low=0.0)
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", min_value=1)
    rows = _rows_per_chunk(k, chunk_size)

    # Centre the data (as scikit-learn does): |x|^2 - 2 x.c + |c|^2 loses less precision near the origin.
    mean = x.mean(0, dtype=torch.float64).to(x.dtype)
    x = x - mean
    x_sq = (x * x).sum(1)
    tol_abs = tol * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0

    gen = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp(x, x_sq, k, gen, rows)
    n_iter = 0
    for n_iter in range(1, iters + 1):  # noqa: B007 - n_iter is reported
        labels, dist = _assign(x, x_sq, centers, rows)
        sums = _cluster_sums(x, labels, k, rows, onehot=x.device.type != "cpu")
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            # Re-seed each empty cluster with one of the points farthest from their centres, taken out of their
            # old clusters (scikit-learn's relocation). Points already at their centre (distance 0) are not
            # moved: with fewer distinct points than k, some clusters stay empty.
            far = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]
            far = far[dist[far] > 0]
            for e, p in zip(empty.tolist(), far.tolist()):
                old = int(labels[p])
                sums[old] -= x[p].double()
                counts[old] -= 1
                sums[e] = x[p].double()
                counts[e] = 1
        filled = counts > 0
        new = centers.clone()
        new[filled] = (sums[filled] / counts[filled, None]).to(x.dtype)
        shift = float(((new - centers).double() ** 2).sum())
        centers = new
        if shift <= tol_abs:
            break
    # a last assignment, so that the labels are those of the returned centres
    labels, dist = _assign(x, x_sq, centers, rows)
    return _KMeansResult(labels.cpu(), centers + mean, float(dist.double().sum()), n_iter)


def kmeans_labels(
    embeddings: Matrix,
    k: int,
    *,
    seed: int = 0,
    iters: int = 100,
    tol: float = 1e-4,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cluster ids of k-means on ``embeddings``: int64 pseudo-classes for the class-based samplers.

    Greedy k-means++ initialisation, then Lloyd iterations until the centres move by at most ``tol`` times the
    mean per-feature variance (squared, summed over centres) or ``iters`` iterations; a last assignment makes the
    labels those of the final centres. Computed in torch on the embeddings' device (float32, or float64 when
    given float64) with the distances ``|x|^2 - 2 x.c + |c|^2`` in chunks of rows, so memory beyond the input is
    ``O(chunk * k)``. Deterministic for a seed on the CPU (the random draws come from a CPU generator seeded
    with ``seed``; on an accelerator the sums use a fixed-order matmul, but matmul rounding may differ from the
    CPU's). Empty clusters are re-seeded from the points farthest from their centres. Ties go to the lower
    cluster id. See the module docstring for why this is torch and not ``sklearn.cluster.KMeans``.

    With fewer distinct points than ``k`` some clusters stay empty, so the labels may use fewer than ``k``
    values; the samplers group by the label values present, so that is harmless.

    Args:
        embeddings: (N, D) float tensor (any device) or ndarray; every value finite.
        k: number of clusters, in ``[1, N]``.
        seed: seed of the k-means++ draws (``>= 0``).
        iters: the most Lloyd iterations (``>= 1``).
        tol: convergence tolerance relative to the data's mean per-feature variance (``>= 0``).
        chunk_size: rows per chunk of the distance computation (default: ``2**18 // k``).

    Returns:
        int64 tensor of shape (N,) on the CPU, values in ``[0, k)``.

    Raises:
        TypeError: ``embeddings`` not a float tensor/ndarray, or ``k`` not an int.
        ValueError: ``embeddings`` not 2-D, empty or not finite (the message names the first bad row), or ``k``
            outside ``[1, N]``.

    Example::

        >>> labels = kmeans_labels(embeddings, 50, seed=0)      # pseudo-classes from, e.g., mean-pooled states
        >>> sampler = ClassBalancedSampler(labels, samples_per_class="min", seed=0)
        >>> sampler = StratifiedSampler(labels, 10_000, min_per_class=10, seed=0)
    """
    return _kmeans(embeddings, k, seed=seed, iters=iters, tol=tol, chunk_size=chunk_size).labels
