"""What each selection strategy gives the update: the library's samplers, used as a training loop would."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from torch_pretrain_update import (
    ClassBalancedSampler,
    EntropySampler,
    RandomSubsetSampler,
    SelectionRounds,
    StratifiedSampler,
    entropy,
)
from torch_pretrain_update.demo.config import DemoConfig
from torch_pretrain_update.demo.data import Scenario
from torch_pretrain_update.demo.models import predict_logits

__all__ = ["budget_count", "pool_logits", "select_one_shot", "select_rounds"]


def budget_count(cfg: DemoConfig, pool_size: int) -> int:
    """Samples the update may use: ``cfg.budget`` of the pool, at least one."""
    return max(1, int(round(cfg.budget * pool_size)))


def pool_logits(model: nn.Module, x_pool: torch.Tensor) -> torch.Tensor:
    """The model's logits on the pool (the samplers score them: entropy, higher = less sure)."""
    return predict_logits(model, x_pool)


def select_one_shot(
    strategy: str, scen: Scenario, logits: torch.Tensor, budget: int, seed: int, cfg: DemoConfig
) -> torch.Tensor:
    """The pool indices a one-shot strategy gives the update: epoch 0 of the library sampler, i.e. exactly what
    a training loop would draw first. The update then trains on that fixed selection (a labelling budget);
    only class-balanced resampling can repeat an index (a class with fewer samples than its share)."""
    n = len(scen.y_pool)
    sampler: Any
    if strategy == "random":
        sampler = RandomSubsetSampler(n, budget, seed=seed)
    elif strategy == "stratified":
        sampler = StratifiedSampler(scen.y_pool, budget, seed=seed)
    elif strategy == "class_balanced":
        present = int(torch.unique(scen.y_pool).numel())
        sampler = ClassBalancedSampler(scen.y_pool, samples_per_class=max(1, budget // present), seed=seed)
    elif strategy == "entropy_topk":
        sampler = EntropySampler(logits, budget, from_logits=True, mode="topk", seed=seed)
    elif strategy == "entropy_proportional":
        sampler = EntropySampler(logits, budget, from_logits=True, mode="proportional", seed=seed)
    elif strategy == "entropy_mix":
        sampler = EntropySampler(logits, budget, from_logits=True, mode="topk", random_fraction=cfg.mix_fraction,
                                 seed=seed)
    else:
        raise ValueError(f"strategy must be one of the one-shot strategies; got {strategy!r}")
    sampler.set_epoch(0)
    return torch.tensor(list(sampler), dtype=torch.int64)


def select_rounds(
    strategy: str,
    scen: Scenario,
    old: nn.Module,
    budget: int,
    seed: int,
    cfg: DemoConfig,
    fit: Callable[[torch.Tensor], nn.Module],
) -> tuple[torch.Tensor, nn.Module]:
    """Multi-round selection with :class:`~torch_pretrain_update.SelectionRounds`: score the pool with the
    current model (entropy), take this round's share (never an index picked before), update the *old* model on
    everything picked so far with ``fit``, repeat. Returns the final picks and the final model, which is
    therefore trained exactly like a one-shot strategy's model, on a selection of the same size."""
    fraction = cfg.mix_fraction if strategy == "rounds_mix" else 0.0
    if strategy not in ("rounds_topk", "rounds_mix"):
        raise ValueError(f"strategy must be 'rounds_topk' or 'rounds_mix'; got {strategy!r}")
    rounds = SelectionRounds(len(scen.y_pool), budget, cfg.rounds, strategy="topk", random_fraction=fraction,
                             seed=seed)
    model = old
    for _ in range(cfg.rounds):
        scores = entropy(pool_logits(model, scen.x_pool), from_logits=True)
        rounds.next_round(scores)
        model = fit(torch.as_tensor(rounds.chosen, dtype=torch.int64))
    return torch.as_tensor(rounds.chosen, dtype=torch.int64), model
