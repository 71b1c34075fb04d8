"""Exact and near duplicates of a pool: MinHash + LSH over n-gram shingles, cosine threshold on embeddings.

Pretraining pipelines remove duplicates first: repeated documents waste the budget and are memorised. The
functions here return the ``exclude`` mask every sampler takes (``True`` = drop), so de-duplication composes with
selection, weighting and balancing::

    drop = near_duplicate_mask(texts)                       # bool (N,), one of each duplicate group kept
    sampler = RandomSubsetSampler(len(texts), 10_000, exclude=drop, seed=0)

**Groups and the kept item.** Two items are near-duplicates when their (estimated) similarity reaches the
threshold; a *group* is a connected component of that relation (so a chain a~b~c is one group even when a and c
are not similar), and the item of lowest index in each group is kept, every other one dropped. The stream filter
(:class:`~torch_pretrain_update.NearDuplicateFilter`, ``scoring/dedup_stage.py``) cannot see later items: it drops
an item that is a duplicate of an earlier *kept* one. On groups whose members are all similar to each other
(copies of one source) both give the same drops.

**Texts.** Exact duplicates by content hash, near duplicates by MinHash signatures and LSH banding; the hashes,
the choice of bands and the candidate pairs of large buckets are described in ``scoring/minhash.py``.

**Empty input is an error, never a silent keep or drop.** An empty text (after normalisation) or an empty
token sequence has no shingles: :func:`near_duplicate_mask` and the filter raise ``ValueError`` naming it. A
text shorter than ``ngram`` is one shingle (the whole text). A zero embedding has no direction:
:func:`embedding_duplicate_mask` raises naming its row.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from torch_pretrain_update._checks import check_float, check_int, first_bad_row
from torch_pretrain_update.scoring.clusters import _kmeans, check_embeddings
from torch_pretrain_update.scoring.minhash import (
    Texts,
    _band_keys,
    _candidate_pairs,
    _check_common,
    _digest,
    _items,
    _signatures,
    _verified,
)

__all__ = ["near_duplicate_mask", "embedding_duplicate_mask"]


# ---------------------------------------------------------------------------------------------------------
# union-find (vectorised)
# ---------------------------------------------------------------------------------------------------------


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            return r
        r = rr


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the groups of each pair ``(a[i], b[i])``; a group's root is its lowest index (``parent[i] <= i``)."""
    while a.size:
        ra, rb = _roots(parent, a), _roots(parent, b)
        parent[a] = ra  # path compression for the endpoints
        parent[b] = rb
        diff = ra != rb
        if not diff.any():
            return
        ra, rb, a, b = ra[diff], rb[diff], a[diff], b[diff]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))  # hook the higher root under the lower


def _drop_mask(parent: np.ndarray) -> torch.Tensor:
    idx = np.arange(parent.size)
    return torch.from_numpy(_roots(parent, idx) != idx)


# ---------------------------------------------------------------------------------------------------------
# public: texts
# ---------------------------------------------------------------------------------------------------------


def near_duplicate_mask(
    texts: Texts,
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    seed: int = 0,
    ngram: int = 5,
    shingle: str = "char",
    normalize: bool = True,
    bands: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Which items to drop as exact or near duplicates: bool (N,), ``True`` for every item but the first (lowest
    index) of each duplicate group. Pass it as ``exclude=`` to any sampler.

    Exact duplicates (equal BLAKE2b hashes of the normalised text, or of the token ids) are grouped first, and
    only one copy of each distinct content is MinHashed. Near duplicates: MinHash signatures
    (:func:`minhash_signatures`), LSH banding with ``bands`` (default :func:`lsh_params`), candidates verified by
    their estimated Jaccard similarity ``>= threshold``, groups by union-find over the verified pairs (see the
    module docstring for groups and empty items, and ``scoring/minhash.py`` for the candidates of large buckets).
    Deterministic for a seed.

    Args:
        texts: a sequence of ``str`` (or UTF-8 ``bytes``), a sequence of 1-D token-id sequences, or a 2-D
            integer tensor/ndarray (N sequences of one length).
        threshold: Jaccard similarity of the shingle sets at which two items are near duplicates, in (0, 1].
        num_perm: MinHash signature length (more: a sharper estimate, slower).
        seed: seed of the hash family.
        ngram: shingle length in code points (``shingle="char"``), words (``"word"``) or tokens.
        shingle: ``"char"`` or ``"word"`` n-grams (texts only; token ids always use token n-grams).
        normalize: lower-case and collapse whitespace first (texts only).
        bands: ``(bands, rows)`` of the LSH index, ``bands * rows <= num_perm``; default: optimal for
            ``threshold``.

    Returns:
        bool tensor of shape (N,) on the CPU: ``True`` = drop.

    Raises:
        TypeError: ``texts`` of the wrong kind, or mixing texts and token sequences (the message names the item).
        ValueError: ``texts`` empty, an empty item (after normalisation), a negative token id, or an option out of
            range (the message names it).

    Example::

        >>> near_duplicate_mask(["A cat sat on the mat.", "a  cat sat on the mat.", "Dogs bark.",
        ...                      "A cat sat on the mat!"])
        tensor([False,  True, False,  True])
        >>> sampler = RandomSubsetSampler(len(texts), 1000, exclude=near_duplicate_mask(texts), seed=0)
    """
    threshold, num_perm, seed, ngram, shingle, normalize, (nb, nr) = _check_common(
        threshold, num_perm, seed, ngram, shingle, normalize, bands
    )
    kind, items = _items(texts, "texts", normalize, shingle)
    n = len(items)
    parent = np.arange(n, dtype=np.int64)

    first_of: dict[bytes, int] = {}
    uniq = np.empty(n, dtype=np.int64)  # item -> index of the first item with the same content
    for i, item in enumerate(items):
        uniq[i] = first_of.setdefault(_digest(item), i)
    reps = np.fromiter(first_of.values(), dtype=np.int64, count=len(first_of))  # ascending
    copies = np.flatnonzero(uniq != np.arange(n))
    _union(parent, uniq[copies], copies)

    if reps.size > 1:
        sig = _signatures([items[i] for i in reps], kind, shingle, ngram, num_perm, seed)
        a, b = _candidate_pairs(_band_keys(sig, nb, nr))
        ok = _verified(sig, a, b, threshold)
        _union(parent, reps[a[ok]], reps[b[ok]])
    return _drop_mask(parent)


# ---------------------------------------------------------------------------------------------------------
# public: embeddings
# ---------------------------------------------------------------------------------------------------------


def embedding_duplicate_mask(
    embeddings: Union[torch.Tensor, np.ndarray],
    *,
    threshold: float = 0.95,
    num_clusters: Optional[int] = None,
    seed: int = 0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Which items to drop as semantic duplicates: bool (N,), ``True`` for every item but the first (lowest index)
    of each group of embeddings with cosine similarity ``>= threshold``.

    As in "SemDeDup: Data-efficient learning at web-scale through semantic deduplication", the unit-normalised
    embeddings are first clustered with k-means (:func:`~torch_pretrain_update.kmeans_labels`) and pairs are only
    compared within a cluster, which makes the cost about ``N * (cluster size) * D`` instead of ``N**2 * D``;
    duplicates at a high threshold are close together and rarely fall in different clusters (a pair that does is
    missed). Within a cluster the similarities are computed one chunk of ``chunk_size`` rows at a time (on the
    embeddings' device), and the pairs above the threshold are merged into groups by union-find chunk by chunk,
    so memory is ``O(chunk_size * cluster size)``. Groups are connected components (see the module docstring).

    Args:
        embeddings: (N, D) float tensor (any device) or ndarray; finite, no all-zero row.
        threshold: cosine similarity at which two items are duplicates, in [-1, 1].
        num_clusters: k-means clusters; default ``ceil(N / 10_000)`` (1, i.e. every pair compared, up to
            N = 10,000).
        seed: seed of the k-means initialisation.
        chunk_size: rows per similarity chunk.

    Returns:
        bool tensor of shape (N,) on the CPU: ``True`` = drop.

    Raises:
        TypeError / ValueError: ``embeddings`` not a 2-D float tensor/ndarray, empty, not finite or with a zero
            row (the message names the row), or an option out of range.

    Example::

        >>> drop = embedding_duplicate_mask(model_embeddings, threshold=0.95)
        >>> sampler = EntropySampler(probs, 5000, exclude=drop, seed=0)
    """
    x = check_embeddings(embeddings)
    threshold = check_float(threshold, "threshold", low=-1.0, high=1.0)
    seed = check_int(seed, "seed", min_value=0)
    chunk_size = check_int(chunk_size, "chunk_size", min_value=1)
    n = x.shape[0]
    if num_clusters is None:
        num_clusters = -(-n // 10_000)
    num_clusters = check_int(num_clusters, "num_clusters", min_value=1)
    if num_clusters > n:
        raise ValueError(f"num_clusters must be <= the number of rows of embeddings ({n}); got {num_clusters}")
    norm = x.norm(dim=1, keepdim=True)
    zero = (norm == 0).flatten()
    if bool(zero.any()):
        row = first_bad_row(zero.cpu())
        raise ValueError(f"embeddings row {row} is all zeros: its cosine similarity to anything is undefined")
    x = x / norm

    if num_clusters == 1:
        groups = [np.arange(n)]
    else:
        labels = _kmeans(x, num_clusters, seed=seed).labels.numpy()
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        groups = np.split(order, bounds)

    parent = np.arange(n, dtype=np.int64)
    for members in groups:
        if members.size < 2:
            continue
        e = x[torch.from_numpy(members).to(x.device)]
        for s in range(1, members.size, chunk_size):
            sim = e[s : s + chunk_size] @ e[: s + chunk_size].T  # rows s.. against every member up to them
            hit_i, hit_j = torch.nonzero(sim >= threshold, as_tuple=True)
            keep = hit_j < hit_i + s  # pairs with an earlier member only
            later, earlier = (hit_i[keep] + s).cpu().numpy(), hit_j[keep].cpu().numpy()
            if later.size:
                _union(parent, members[earlier], members[later])
    return _drop_mask(parent)
