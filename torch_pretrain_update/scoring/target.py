"""Target matching: pick the raw data that looks like a target sample, by importance weights.

Importance resampling ("Data Selection for Language Models via Importance Resampling", Xie et al. 2023): fit a
simple model of the target distribution and one of the raw pool, weight each raw document by
``w(x) = p_target(x) / p_raw(x)``, and draw the selection without replacement with probability proportional to
``w``.

- :func:`hashed_ngram_features`: bag-of-hashed-n-grams counts of text (lowercased word tokens, their unigrams and
  bigrams, as that paper) or of token-id sequences, as a sparse CSR matrix.
- :func:`target_log_ratio`: ``log p_target(x) - log p_raw(x)`` under the bag-of-hashed-n-grams model (each side a
  smoothed categorical over the buckets); :func:`bucket_log_ratio` is that fitted model (one log ratio per bucket)
  and :func:`document_log_ratio` weighs other documents with it (a stream: ``data.stages.with_target_weights``).
- :func:`domain_log_ratio`: the same log ratio for embeddings (images, speech, text encoders), estimated by a
  logistic classifier that tells target from raw (Bayes' rule with the class prior removed).
- :func:`resampling_weights` and :func:`importance_resample`: the draw itself, through this package's weighted
  samplers (exponential keys, Efraimidis & Spirakis 2006, the Gumbel top-k trick): a pure function of
  ``(weights, seed, epoch)``, so it is the same on every rank and resumes exactly. For training, pass
  ``resampling_weights(log_ratio, k)`` to ``WeightedSampler(..., replacement=False)`` (distributed, resumable) or
  to ``EntropySampler.from_scores(..., mode="proportional", exclude=...)`` (with near-duplicates excluded).

The n-gram features are computed in :mod:`torch_pretrain_update.scoring.ngrams`, the embedding classifier in
:mod:`torch_pretrain_update.scoring.domain`.
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch

from torch_pretrain_update._checks import as_tensor, check_float, check_int, check_vector, first_bad_row, short_repr
from torch_pretrain_update.sampling.draws import exclude_mask, weighted_sample_without_replacement

__all__ = [
    "target_log_ratio",
    "bucket_log_ratio",
    "document_log_ratio",
    "resampling_weights",
    "importance_resample",
]

#: a count or embedding matrix: a sparse or dense tensor, or an ndarray
Features = Union[torch.Tensor, np.ndarray]


# ------------------------------------------------------------------------------------------------------
# log importance weights
# ------------------------------------------------------------------------------------------------------


class _Counts:
    """A validated count matrix: sparse CSR pieces or a dense float64 tensor (N, B)."""

    def __init__(self, x: Any, name: str, *, allow_vector: bool) -> None:
        if isinstance(x, torch.Tensor) and x.layout == torch.sparse_coo:
            x = x.coalesce().to_sparse_csr()
        self.name = name
        if isinstance(x, torch.Tensor) and x.layout == torch.sparse_csr:
            if x.ndim != 2:
                raise ValueError(f"{name} must be 2-D (documents x buckets); got shape {tuple(x.shape)}")
            self.sparse = True
            self.crow = x.crow_indices().cpu().to(torch.int64)
            self.col = x.col_indices().cpu().to(torch.int64)
            self.values = x.values().detach().cpu()
            self.shape = tuple(x.shape)
            vals = self.values
        else:
            t = as_tensor(x, name)
            if t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"{name} must hold counts (real numbers); got {short_repr(t)}")
            if t.ndim == 1 and allow_vector:
                t = t.unsqueeze(0)
            if t.ndim != 2:
                raise ValueError(f"{name} must be 2-D (documents x buckets){' or 1-D' if allow_vector else ''}; "
                                 f"got shape {tuple(t.shape)}")
            self.sparse = False
            self.dense = t.detach().cpu()
            self.shape = tuple(t.shape)
            vals = self.dense
        if self.shape[0] == 0 or self.shape[1] == 0:
            raise ValueError(f"{name} must not be empty; got shape {self.shape}")
        if vals.numel():
            lo, hi = (float(v) for v in torch.aminmax(vals.double() if not vals.is_floating_point() else vals))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name} must be finite counts; found {lo if not math.isfinite(lo) else hi}")
            if lo < 0:
                raise ValueError(f"{name} must be non-negative counts; found {lo}")

    def column_totals(self) -> torch.Tensor:
        b = self.shape[1]
        if self.sparse:
            return torch.zeros(b, dtype=torch.float64).index_add_(0, self.col, self.values.double())
        return self.dense.sum(dim=0, dtype=torch.float64)

    def check_rows(self) -> None:
        """Refuse an empty document (a row with no count): it has no weight to compare."""
        empty = self.row_totals() <= 0
        if bool(empty.any()):
            i = first_bad_row(empty)
            raise ValueError(f"{self.name} row {i} is empty (no n-gram): it has no weight to compare; drop it first")

    def row_totals(self) -> torch.Tensor:
        if self.sparse:
            rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.crow.diff())
            return torch.zeros(self.shape[0], dtype=torch.float64).index_add_(0, rows, self.values.double())
        return self.dense.sum(dim=1, dtype=torch.float64)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.crow.diff())
            terms = self.values.double() * v[self.col]
            return torch.zeros(self.shape[0], dtype=torch.float64).index_add_(0, rows, terms)
        out = torch.empty(self.shape[0], dtype=torch.float64)
        step = max(1, (1 << 22) // self.shape[1])  # a chunk of rows in float64 at a time
        for s in range(0, self.shape[0], step):
            out[s : s + step] = self.dense[s : s + step].double() @ v
        return out


def target_log_ratio(raw_features: Features, target_features: Features, *, smoothing: float = 1e-8) -> torch.Tensor:
    """Log importance weights ``log p_target(x) - log p_raw(x)`` of each raw document under the
    bag-of-hashed-n-grams model.

    Each side is a categorical distribution over the B buckets fitted on its own features: the bucket
    frequencies ``f_b = c_b / sum_b c_b`` (``c_b`` the bucket's total count) smoothed as
    ``p(b) = (f_b + smoothing) / (1 + B * smoothing)``. A document's log probability is ``sum_b x_b log p(b)``
    (``x`` its counts), so the result is ``x . (log p_target - log p_raw)``; the normaliser ``1 + B * smoothing``
    is the same on both sides and cancels. With the default ``smoothing=1e-8`` this is exactly the estimator of
    the ``data-selection`` package's ``HashedNgramDSIR`` (``log(p + 1e-8)`` on both sides), so on the same
    features the weights are the same. A larger ``smoothing`` (e.g. ``1 / num_buckets``) penalises n-grams that
    a small target sample happens not to contain less: with 1e-8 each occurrence of such a bucket costs about
    ``log(1e-8) = -18`` nats.

    Args:
        raw_features: (N, B) counts of the raw pool (a sparse CSR tensor from :func:`hashed_ngram_features`, or a
            dense tensor / ndarray); the raw distribution is fitted on these rows.
        target_features: (M, B) counts of the target sample, or (B,) already summed.
        smoothing: added to every bucket's frequency on both sides, ``> 0``.

    Returns:
        float64 tensor of shape (N,). Select with :func:`importance_resample`, or sample with
        ``WeightedSampler(resampling_weights(log_ratio, k), k, replacement=False)``.

    Raises:
        ValueError: bucket counts differ, negative or non-finite counts, an empty raw document (named), an all-zero
            target, or a target that shares no bucket with the raw pool (the weights would only reflect the
            smoothing).

    Example::

        >>> from torch_pretrain_update import hashed_ngram_features
        >>> raw = hashed_ngram_features(["a b c", "x y z", "a b x"], num_buckets=128)
        >>> tgt = hashed_ngram_features(["a b c a b"], num_buckets=128)
        >>> lr = target_log_ratio(raw, tgt)
        >>> int(lr.argmax())
        0
    """
    smoothing = check_float(smoothing, "smoothing", low=0.0, low_inclusive=False)
    raw = _Counts(raw_features, "raw_features", allow_vector=False)
    return raw.matvec(_fit(raw, _Counts(target_features, "target_features", allow_vector=True), smoothing))


def bucket_log_ratio(raw_features: Features, target_features: Features, *, smoothing: float = 1e-8) -> torch.Tensor:
    """The fitted bag-of-hashed-n-grams model of :func:`target_log_ratio`: ``log p_target(b) - log p_raw(b)`` per
    bucket, so that ``target_log_ratio(raw, target) == document_log_ratio(raw, bucket_log_ratio(raw, target))``
    bit for bit. Fit it once on a pool and weigh other documents (a stream, new data) with
    :func:`document_log_ratio`.

    Args:
        raw_features, target_features, smoothing: as in :func:`target_log_ratio` (and checked the same way).

    Returns:
        float64 tensor of shape (B,).

    Example::

        >>> from torch_pretrain_update import hashed_ngram_features
        >>> raw = hashed_ngram_features(["a b c", "x y z", "a b x"], num_buckets=128)
        >>> table = bucket_log_ratio(raw, hashed_ngram_features(["a b c a b"], num_buckets=128))
        >>> tuple(table.shape)
        (128,)
    """
    smoothing = check_float(smoothing, "smoothing", low=0.0, low_inclusive=False)
    raw = _Counts(raw_features, "raw_features", allow_vector=False)
    return _fit(raw, _Counts(target_features, "target_features", allow_vector=True), smoothing)


def document_log_ratio(features: Features, bucket_log_ratio: Any) -> torch.Tensor:
    """Log importance weights of documents under a fitted model: ``features @ bucket_log_ratio`` in float64, the
    per-document sum of :func:`target_log_ratio`.

    Args:
        features: (N, B) counts of the documents to weigh (e.g. :func:`hashed_ngram_features` of them, with the
            ``n`` and ``num_buckets`` the model was fitted with), or (B,) for one document.
        bucket_log_ratio: the (B,) finite vector from :func:`bucket_log_ratio`.

    Returns:
        float64 tensor of shape (N,) ((1,) for one document).

    Raises:
        ValueError: bucket counts differ, negative or non-finite counts, an empty document (named).

    Example::

        >>> from torch_pretrain_update import hashed_ngram_features
        >>> raw = hashed_ngram_features(["a b c", "x y z", "a b x"], num_buckets=128)
        >>> table = bucket_log_ratio(raw, hashed_ngram_features(["a b c a b"], num_buckets=128))
        >>> bool(document_log_ratio(hashed_ngram_features(["a b"], num_buckets=128), table)[0] > 0)
        True
    """
    table = check_vector(bucket_log_ratio, "bucket_log_ratio", allow_negative=True).double()
    docs = _Counts(features, "features", allow_vector=True)
    if docs.shape[1] != table.numel():
        raise ValueError(f"features must have as many buckets as bucket_log_ratio ({table.numel()}); got "
                         f"{docs.shape[1]}")
    docs.check_rows()
    return docs.matvec(table)


def _fit(raw: _Counts, tgt: _Counts, smoothing: float) -> torch.Tensor:
    """``log(f_target + smoothing) - log(f_raw + smoothing)`` per bucket, after the checks of target_log_ratio."""
    if raw.shape[1] != tgt.shape[1]:
        raise ValueError(f"target_features must have as many buckets as raw_features ({raw.shape[1]}); got "
                         f"{tgt.shape[1]}")
    raw.check_rows()
    c_raw, c_tgt = raw.column_totals(), tgt.column_totals()
    if not float(c_tgt.sum()) > 0:
        raise ValueError("target_features must have at least one positive count; all are 0")
    if not bool(((c_raw > 0) & (c_tgt > 0)).any()):
        raise ValueError(
            "target_features share no bucket with raw_features: the importance weights would only reflect the "
            "smoothing; check that both were hashed with the same n and num_buckets and come from related text"
        )
    return torch.log(c_tgt / c_tgt.sum() + smoothing) - torch.log(c_raw / c_raw.sum() + smoothing)


# ------------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------------

#: log weights are kept within this many nats of the num_samples-th largest (see resampling_weights)
_SPAN = 300.0


def resampling_weights(log_ratio: Any, num_samples: int, *, exclude: Any = None) -> torch.Tensor:
    """Sampling weights ``exp(log_ratio)`` for a draw of ``num_samples`` without replacement, safe in float64.

    ``exp`` of raw log ratios overflows or underflows (they are sums over whole documents: hundreds of nats
    apart), so the weights are ``exp(log_ratio - r)`` with ``r`` the ``num_samples``-th largest log ratio among
    the selectable indices, the exponent capped at ``+300``, and indices more than 300 nats below ``r`` given
    weight 0. Neither changes the draw measurably: an index 300 nats above ``r`` is selected, and one 300 nats
    below is passed over, except with probability below ``N * exp(-300)``. At least ``num_samples`` weights are
    positive, and the ratio of the largest to the smallest positive weight stays below ``exp(600)``, so
    ``WeightedSampler(w, num_samples, replacement=False)`` and ``EntropySampler.from_scores(w, num_samples,
    mode="proportional")`` accept them.

    Args:
        log_ratio: 1-D finite log importance weights (e.g. from :func:`target_log_ratio`).
        num_samples: the size of the draw these weights are for.
        exclude: indices or a bool mask (e.g. from near-duplicate detection) that get weight 0.

    Returns:
        float64 tensor of the shape of ``log_ratio``.

    Example::

        >>> w = resampling_weights(torch.tensor([-1000.0, 0.0, 2.0, 5.0]), 2)
        >>> (w > 0).tolist()
        [False, True, True, True]
    """
    lr = check_vector(log_ratio, "log_ratio", allow_negative=True)
    k = check_int(num_samples, "num_samples", min_value=1)
    mask = exclude_mask(exclude, lr.numel())
    pool = lr if mask is None else lr[~mask]
    if k > pool.numel():
        raise ValueError(f"num_samples must be <= the number of selectable indices ({pool.numel()} of "
                         f"{lr.numel()}); got {k}")
    ref = float(torch.kthvalue(pool, pool.numel() - k + 1).values)
    shifted = lr - ref
    w = torch.exp(shifted.clamp(max=_SPAN))
    w[shifted < -_SPAN] = 0.0
    if mask is not None:
        w[mask] = 0.0
    return w


def importance_resample(
    log_ratio: Any, num_samples: int, *, seed: int = 0, epoch: int = 0, exclude: Any = None
) -> torch.Tensor:
    """Importance resampling: ``num_samples`` distinct indices drawn without replacement with probability
    proportional to ``exp(log_ratio)`` (successive draws among the indices not yet drawn).

    The draw is ``weighted_sample_without_replacement(resampling_weights(log_ratio, num_samples), ...)``:
    exponential keys (the Gumbel top-k trick of the importance-resampling paper), a pure function of
    ``(log_ratio, num_samples, seed, epoch)``, identical on every rank and for any world size, and the same set
    that ``WeightedSampler(resampling_weights(log_ratio, num_samples), num_samples, replacement=False, seed=seed)``
    iterates in epoch ``epoch``.

    Args:
        log_ratio: 1-D finite log importance weights.
        num_samples: how many indices, at most the number of selectable ones.
        seed, epoch: the draw's seed and epoch.
        exclude: indices or a bool mask never to select (e.g. near-duplicates).

    Returns:
        int64 tensor of ``num_samples`` indices in ascending order.

    Example::

        >>> from torch_pretrain_update import hashed_ngram_features
        >>> raw = hashed_ngram_features(["a b c", "x y z", "a b x", "x x y"], num_buckets=128)
        >>> tgt = hashed_ngram_features(["a b c a b"], num_buckets=128)
        >>> importance_resample(target_log_ratio(raw, tgt), 2, seed=0)  # doctest: +SKIP
        tensor([0, 2])
    """
    w = resampling_weights(log_ratio, num_samples, exclude=exclude)
    return weighted_sample_without_replacement(w, num_samples, seed=seed, epoch=epoch, shuffle=False).to(torch.int64)
