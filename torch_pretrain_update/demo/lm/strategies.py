"""What each selection strategy gives the update: the pool's scores under the old model and the target sample,
then the library's samplers, used as a training loop would (epoch 0, the first ``budget`` indices)."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torch_pretrain_update import (
    ClassBalancedSampler,
    EntropySampler,
    RandomSubsetSampler,
    WeightedSampler,
    hashed_ngram_features,
    kmeans_labels,
    near_duplicate_mask,
    resampling_weights,
    sequence_scores,
    target_log_ratio,
)
from torch_pretrain_update.demo.lm.config import LMConfig
from torch_pretrain_update.demo.lm.data import SOURCE_NAMES, Corpus
from torch_pretrain_update.demo.lm.model import ByteLM, Encoded, forward_chunks

__all__ = ["PoolScores", "budget_count", "score_pool", "select", "selection_stats"]


def budget_count(cfg: LMConfig, pool_size: int) -> int:
    """Chunks the update may use: ``cfg.budget`` of the pool (planted copies included), at least one."""
    return max(1, int(round(cfg.budget * pool_size)))


@dataclass
class PoolScores:
    """Everything the strategies select by, one value per pool chunk, and the seconds each took."""

    nll: torch.Tensor  # mean negative log-likelihood per byte under the old model (nats; log-perplexity)
    log_ratio: torch.Tensor  # log p_target - log p_pool under the bag of hashed n-grams
    drop: torch.Tensor  # bool: exact or near duplicate of an earlier chunk
    clusters: torch.Tensor  # int64 k-means pseudo-classes of the mean-pooled hidden states
    seconds: dict[str, float]


def score_pool(old: ByteLM, pool: Encoded, pool_texts: list[str], target_texts: list[str], seed: int,
               cfg: LMConfig) -> PoolScores:
    """One forward pass of the old model over the pool (per-chunk NLL with
    :func:`~torch_pretrain_update.sequence_scores` and mean-pooled hidden states, clustered with
    :func:`~torch_pretrain_update.kmeans_labels`), the target log ratios
    (:func:`~torch_pretrain_update.hashed_ngram_features`, :func:`~torch_pretrain_update.target_log_ratio`) and the
    duplicates (:func:`~torch_pretrain_update.near_duplicate_mask`)."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    nll = torch.empty(len(pool))
    pooled = torch.empty(len(pool), cfg.d_model)

    def take(h: torch.Tensor, rows: slice) -> None:
        m = pool.mask[rows]
        nll[rows] = sequence_scores(old.head(h), m, score="nll", targets=pool.targets[rows])
        pooled[rows] = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    forward_chunks(old, pool, take)
    seconds["perplexity"] = time.perf_counter() - t
    t = time.perf_counter()
    clusters = kmeans_labels(pooled, min(cfg.clusters, len(pool)), seed=seed)
    seconds["kmeans"] = time.perf_counter() - t
    t = time.perf_counter()
    raw = hashed_ngram_features(pool_texts, n=cfg.ngram, num_buckets=cfg.num_buckets)
    tgt = hashed_ngram_features(target_texts, n=cfg.ngram, num_buckets=cfg.num_buckets)
    # a target sample of a few thousand n-grams leaves most buckets empty: smoothing 1 / buckets (rather than the
    # 1e-8 of the data-selection package) keeps one n-gram it happens to lack from costing ~18 nats
    log_ratio = target_log_ratio(raw, tgt, smoothing=1.0 / cfg.num_buckets)
    seconds["target"] = time.perf_counter() - t
    t = time.perf_counter()
    drop = near_duplicate_mask(pool_texts, threshold=cfg.dedup_threshold, seed=seed)
    seconds["dedup"] = time.perf_counter() - t
    return PoolScores(nll=nll, log_ratio=log_ratio, drop=drop, clusters=clusters, seconds=seconds)


#: which scoring stages each strategy's time includes
SCORING_USED: dict[str, tuple[str, ...]] = {
    "random": (),
    "ppl_topk": ("perplexity",),
    "ppl_mix": ("perplexity",),
    "target": ("target",),
    "dedup_target": ("target", "dedup"),
    "cluster": ("perplexity", "kmeans"),
}


def select(strategy: str, scores: PoolScores, budget: int, seed: int, cfg: LMConfig) -> torch.Tensor:
    """The pool indices ``strategy`` gives the update: the first ``budget`` indices of epoch 0 of a library
    sampler.

    - ``random``: :class:`~torch_pretrain_update.RandomSubsetSampler`.
    - ``ppl_topk`` / ``ppl_mix``: ``EntropySampler.from_scores(nll, mode="topk")``, the highest perplexity under
      the old model; ``ppl_mix`` with ``random_fraction=cfg.mix_fraction`` (the rest uniform).
    - ``target``: ``WeightedSampler(resampling_weights(log_ratio, budget), replacement=False)``: importance
      resampling without replacement toward the target sample.
    - ``dedup_target``: the same with the near-duplicates excluded (their weight is 0).
    - ``cluster``: :class:`~torch_pretrain_update.ClassBalancedSampler` over the k-means pseudo-classes,
      ``ceil(budget / clusters)`` per cluster (a cluster smaller than that is repeated), cut to the budget.
    """
    n = len(scores.nll)
    sampler: Any
    if strategy == "random":
        sampler = RandomSubsetSampler(n, budget, seed=seed)
    elif strategy in ("ppl_topk", "ppl_mix"):
        fraction = cfg.mix_fraction if strategy == "ppl_mix" else 0.0
        sampler = EntropySampler.from_scores(scores.nll, budget, mode="topk", random_fraction=fraction, seed=seed)
    elif strategy in ("target", "dedup_target"):
        exclude = scores.drop if strategy == "dedup_target" else None
        weights = resampling_weights(scores.log_ratio, budget, exclude=exclude)
        sampler = WeightedSampler(weights, budget, replacement=False, seed=seed)
    elif strategy == "cluster":
        present = int(torch.unique(scores.clusters).numel())
        sampler = ClassBalancedSampler(scores.clusters, samples_per_class=math.ceil(budget / present), seed=seed)
    else:
        raise ValueError(f"strategy must be one of random, ppl_topk, ppl_mix, target, dedup_target, cluster; "
                         f"got {strategy!r}")
    sampler.set_epoch(0)
    return torch.tensor(list(itertools.islice(sampler, budget)), dtype=torch.int64)


def selection_stats(chosen: torch.Tensor, corpus: Corpus) -> dict[str, float]:
    """What a selection holds: chunks (repeats counted), distinct chunks, the share of each source (prose is the
    new domain), and how many of its chunks are planted copies."""
    idx = chosen.numpy()
    out = {f"{name}_share": float((corpus.source[idx] == i).mean()) for i, name in enumerate(SOURCE_NAMES)}
    out["planted"] = float((corpus.copy_of[idx] >= 0).sum())
    return {"selected": float(idx.size), "distinct": float(np.unique(idx).size), **out}
