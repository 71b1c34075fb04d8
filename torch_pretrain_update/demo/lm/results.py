"""The results dict of the language-model demo (what ``results.json`` holds), built from every seed's runs.

One row per (strategy, update method) and one for the old model; every metric as mean, sample std, min, max and
the per-seed values (:func:`~torch_pretrain_update.demo.results.stats`), and for the strategies other than random
the paired difference of new- and old-domain bits per byte to random selection (same seed, same update method;
negative = fewer bits than random = better).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

from torch_pretrain_update.demo.lm.config import LM_METRICS, LM_STRATEGIES, LM_UPDATES, LMConfig
from torch_pretrain_update.demo.results import environment, stats

__all__ = ["PAIRED", "aggregate", "lm_row", "lm_difference"]

#: metrics with a paired difference to random selection
PAIRED = ("new_bpb", "old_bpb")
_REFERENCE = ("pretrained", "no update (old model)")


def aggregate(per_seed: list[dict[str, Any]], sources: dict[str, Any], cfg: LMConfig, *, processes: int,
              threads: int) -> dict[str, Any]:
    """The results dict from the per-seed outputs (each with ``"runs"``: ``{(strategy, update): metrics}``)."""
    labels = dict(LM_STRATEGIES) | dict([_REFERENCE])
    update_labels = dict(LM_UPDATES) | {"-": "-"}
    keys = [("pretrained", "-")] + [(s, m) for m, _ in LM_UPDATES for s, _ in LM_STRATEGIES]
    rows = []
    for strategy, method in keys:
        runs = [r["runs"][(strategy, method)] for r in per_seed]
        one: dict[str, Any] = {
            "strategy": strategy,
            "strategy_label": labels[strategy],
            "update": method,
            "update_label": update_labels[method],
            "kind": "reference" if strategy == _REFERENCE[0] else "strategy",
            "metrics": {k: stats([run[k] for run in runs]) for k in LM_METRICS},
        }
        for k in PAIRED:
            one[f"{k}_minus_random"] = None
            if one["kind"] == "strategy" and strategy != "random":
                randoms = [r["runs"][("random", method)][k] for r in per_seed]
                one[f"{k}_minus_random"] = stats([run[k] - x for run, x in zip(runs, randoms)])
        rows.append(one)
    return {
        "config": asdict(cfg),
        "environment": environment() | {"torch_threads": threads, "processes": processes},
        "data": sources,
        "strategies": [k for k, _ in LM_STRATEGIES],
        "updates": [k for k, _ in LM_UPDATES],
        "metrics": list(LM_METRICS),
        "seeds": [{k: v for k, v in r.items() if k != "runs"} for r in per_seed],
        "rows": rows,
    }


def lm_row(results: dict[str, Any], strategy: str, update: str) -> dict[str, Any]:
    """The row of one (strategy, update method); the old model's is ``("pretrained", "-")``."""
    return next(r for r in results["rows"] if r["strategy"] == strategy and r["update"] == update)


def lm_difference(results: dict[str, Any], strategy: str, update: str, metric: str = "new_bpb") -> Optional[
        dict[str, Any]]:
    """The paired difference of ``metric`` (``"new_bpb"`` or ``"old_bpb"``) to random selection (``None`` for
    random itself)."""
    return lm_row(results, strategy, update)[f"{metric}_minus_random"]
