"""Text stages: importance weights toward a target distribution (:func:`with_target_weights`), written into each
sample of a stream of documents (see :mod:`torch_pretrain_update.data.stages`).

The other text tools work on streams and shards as they are:

- **De-duplication of a stream**: :class:`~torch_pretrain_update.scoring.dedup_stage.NearDuplicateFilter` is a
  stage (``WeightedWebDataset(..., stages=[NearDuplicateFilter(key="txt")])``, or ``.compose(...)`` on a
  ``wds.WebDataset``); each DataLoader worker de-duplicates its own share. For a whole pool (a
  :class:`~torch_pretrain_update.data.shard_dataset.ShardDataset`), ``drop = near_duplicate_mask([ds[i]["txt"] for
  i in range(len(ds))])`` is the ``exclude=`` of any sampler (``RandomSubsetSampler(ds, k, exclude=drop)``).
- **Selection of a pool**: ``importance_resample(target_log_ratio(hashed_ngram_features(texts), target), k)``
  picks ``k`` indices of a ``ShardDataset``; ``WeightedSampler(resampling_weights(log_ratio, k), k,
  replacement=False)`` streams that draw, distributed and resumable, through ``DataLoader(ds, sampler=...)``.
- **Sequence scores** of a language model over shards: ``score_dataset`` reduces a ``(batch, classes)`` output
  per sample, so per-sequence scores (``sequence_scores`` of ``(batch, tokens, vocab)`` logits) are computed in a
  loop over the dataset in index order and used like ``score_dataset``'s result::

      scores = torch.empty(len(ds))
      for batch in DataLoader(ds, batch_size=64):  # ShardDataset samples carry "__index__"
          logits = model(batch["ids.npy"])
          scores[batch["__index__"]] = sequence_scores(logits, batch["mask.npy"], score="nll")
      sampler = EntropySampler.from_scores(scores, num_samples=k, exclude=drop)

  Over a stream (``WeightedWebDataset`` with a manifest), fill ``scores`` the same way from ``"__index__"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from torch_pretrain_update._checks import check_choice, check_float, check_int, check_str, check_vector
from torch_pretrain_update.data.stages.base import Handler, Sample, _bad, _get, _Stage
from torch_pretrain_update.data.stages.weights import _attach, _stored_weight
from torch_pretrain_update.scoring.ngrams import hashed_ngram_features
from torch_pretrain_update.scoring.target import bucket_log_ratio, document_log_ratio

__all__ = ["with_target_weights", "TargetWeightStage"]

_F32_MAX = float(np.finfo(np.float32).max)


class TargetWeightStage(_Stage):
    """Stage: weight each text sample by its importance weight toward a target sample, under the
    bag-of-hashed-n-grams model of :func:`~torch_pretrain_update.target_log_ratio`.

    The model is fitted once, when the stage is built: :func:`~torch_pretrain_update.bucket_log_ratio` of the raw
    pool's and the target's :func:`~torch_pretrain_update.hashed_ngram_features`. Each sample's text is hashed
    the same way (``n``, ``num_buckets``) and its log ratio ``lr`` is
    :func:`~torch_pretrain_update.document_log_ratio`, so for a document of the raw pool it is exactly its entry
    of ``target_log_ratio(raw_features, target_features)``. The weight is
    ``exp(min(lr - reference, log(max_weight)))`` as a 0-d float32 tensor (a weight below ~1e-45 is 0).

    ``reference`` (default, given raw features): ``logsumexp(lr_pool) - log(N)`` over the N raw documents, so the
    pool's own weights average 1 (self-normalised importance weights: a weighted loss over the raw pool then
    estimates the loss under the target distribution). Log ratios are sums over whole documents, so the weights
    span many orders of magnitude: most documents weigh almost nothing. For a selection of ``k`` documents instead
    of weights, use ``importance_resample`` or ``WeightedSampler(resampling_weights(log_ratio, k), k,
    replacement=False)`` over a ``ShardDataset``.

    The stage keeps no running estimate: each weight depends on the sample alone, so any split between ranks and
    workers gives the same weights and a resumed stream is exact.

    Args:
        raw_features_or_model: (N, B) counts of the raw pool (e.g. ``hashed_ngram_features(pool_texts, n=n,
            num_buckets=B)``), or an already fitted (B,) model from ``bucket_log_ratio`` (then
            ``target_features=None``).
        target_features: (M, B) or (B,) counts of the target sample; required with raw features.
        text_key: key of the text (``str``, or UTF-8 ``bytes`` as an undecoded ``.txt`` member).
        n, num_buckets: the features' n-gram order and bucket count (default ``num_buckets``: the model's B; a
            different one is refused).
        smoothing: as in ``target_log_ratio``.
        reference: the log ratio that gets weight 1; default as above with raw features, 0 with a fitted model.
        max_weight: the largest weight (larger ones are clipped to it); default float32's largest value.
        weight_key: key the weight is written to.
        combine: ``"replace"`` or ``"multiply"`` (into an existing weight, e.g. a class weight), as in
            :func:`~torch_pretrain_update.with_class_weights`.
        handler: webdataset exception handler for bad samples (text missing, not ``str``/``bytes``, not UTF-8,
            empty or only whitespace; a bad stored weight with ``combine="multiply"``): a
            :class:`~torch_pretrain_update.data.stages.base.BadSampleError` naming the sample; skipped samples are
            counted in ``stage.stats["skipped"]``.

    Example::

        >>> pool = ["the cat sat", "a dog ran off", "the cat ran"]
        >>> stage = with_target_weights(hashed_ngram_features(pool, num_buckets=512),
        ...                             hashed_ngram_features(["the cat"], num_buckets=512))
        >>> w = [float(s["weight"]) for s in stage([{"txt": t} for t in pool])]
        >>> w[1] < w[0]
        True
    """

    def __init__(
        self,
        raw_features_or_model: Any,
        target_features: Any = None,
        *,
        text_key: str = "txt",
        n: int = 2,
        num_buckets: Optional[int] = None,
        smoothing: float = 1e-8,
        reference: Optional[float] = None,
        max_weight: Optional[float] = None,
        weight_key: str = "weight",
        combine: str = "replace",
        handler: Handler = reraise_exception,
    ) -> None:
        super().__init__(handler)
        self.text_key = check_str(text_key, "text_key")
        self.weight_key = check_str(weight_key, "weight_key")
        self.n = check_int(n, "n", min_value=1)
        self.combine = check_choice(combine, "combine", ("replace", "multiply"))
        self.max_weight = _F32_MAX if max_weight is None else check_float(
            max_weight, "max_weight", low=0.0, high=_F32_MAX, low_inclusive=False)
        x = raw_features_or_model
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 1:
            if target_features is not None:
                raise ValueError("target_features must be None with a fitted (B,) model from bucket_log_ratio; got "
                                 f"{type(target_features).__name__}")
            self.table = check_vector(x, "raw_features_or_model", allow_negative=True).double()
            ref = 0.0 if reference is None else reference
        else:
            if target_features is None:
                raise ValueError("target_features is required with raw features (or pass a fitted (B,) model "
                                 "from bucket_log_ratio)")
            self.table = bucket_log_ratio(x, target_features, smoothing=smoothing)
            if reference is None:  # the pool's own weights average 1
                pool = document_log_ratio(x, self.table)
                ref = float(torch.logsumexp(pool, 0)) - math.log(pool.numel())
            else:
                ref = reference
        self.reference = check_float(ref, "reference")
        b = self.table.numel()
        self.num_buckets = b if num_buckets is None else check_int(num_buckets, "num_buckets", min_value=1)
        if self.num_buckets != b:
            raise ValueError(f"num_buckets must be the model's bucket count {b}; got {num_buckets}")
        self._log_cap = math.log(self.max_weight)

    def log_ratio(self, text: str) -> float:
        """The log importance weight of one text (``document_log_ratio`` of its features)."""
        feats = hashed_ngram_features([text], n=self.n, num_buckets=self.num_buckets)
        return float(document_log_ratio(feats, self.table)[0])

    def _run(self, src: Iterator[Sample]) -> Iterator[Sample]:
        return self._each(src, self._weigh)

    def _weigh(self, sample: Sample) -> None:
        text = _text(sample, self.text_key)
        stored = _stored_weight(sample, self.weight_key, self.combine)
        try:
            lr = self.log_ratio(text)
        except ValueError as exc:
            raise _bad(sample, self.text_key, str(exc)) from None
        w = min(math.exp(min(lr - self.reference, self._log_cap)), self.max_weight)
        _attach(sample, self.weight_key, w, stored)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n": self.n, "num_buckets": self.num_buckets, "reference": self.reference,
                "max_weight": self.max_weight, "combine": self.combine, "model": self._digest("model", self.table)}


#: The public name (webdataset style: called with options, it returns the stage); ``TargetWeightStage`` is the
#: same object, the type of what it returns.
with_target_weights = TargetWeightStage


def _text(sample: Any, key: str) -> str:
    """``sample[key]`` as a non-blank ``str`` (``bytes`` decoded as UTF-8); anything else is a bad sample."""
    value = _get(sample, key)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(sample, key, f"text bytes are not UTF-8 ({exc})") from None
    if not isinstance(value, str):
        raise _bad(sample, key, f"expected a text (str or UTF-8 bytes); got {type(value).__name__}")
    if not value.strip():
        raise _bad(sample, key, f"the text is empty ({value[:20]!r}): no n-gram to weigh")
    return value
