"""The results dict (what ``results.json`` holds): built from every seed's runs, read by the report and the plot.

One row per (strategy, update method) and per reference; every metric as mean, sample std, min, max and the
per-seed values, and for the selection strategies the paired difference of new-distribution accuracy to random
selection (same seed, same update method).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch

from torch_pretrain_update.demo.config import METRICS, REFERENCES, STRATEGIES, UPDATES, DemoConfig
from torch_pretrain_update.demo.data import Arrays

__all__ = ["aggregate", "difference_to_random", "environment", "paired", "row", "stats"]


def stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (ddof=1), min, max and the values; all None when a value is undefined (NaN)."""
    a = np.asarray(values, dtype=np.float64)
    if np.isnan(a).any():
        return {"mean": None, "std": None, "min": None, "max": None, "per_seed": [None] * len(a)}
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "per_seed": [float(v) for v in a],
    }


def environment() -> dict[str, Any]:
    """Versions and the machine, for the report."""
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def aggregate(per_seed: list[dict[str, Any]], arrays: Arrays, cfg: DemoConfig, *,
              processes: int = 1) -> dict[str, Any]:
    """The results dict from the per-seed outputs (each with ``"runs"``: ``{(strategy, update): metrics}``)."""
    labels = dict(STRATEGIES) | dict(REFERENCES)
    update_labels = dict(UPDATES) | {"-": "-"}
    keys = [("pretrained", "-")]
    for method, _ in UPDATES:
        keys += [(s, method) for s, _ in STRATEGIES] + [("all_new", method)]
    rows = []
    for strategy, method in keys:
        metrics = {m: stats([r["runs"][(strategy, method)][m] for r in per_seed]) for m in METRICS}
        one: dict[str, Any] = {
            "strategy": strategy,
            "strategy_label": labels[strategy],
            "update": method,
            "update_label": update_labels[method],
            "kind": "reference" if strategy in dict(REFERENCES) else "strategy",
            "metrics": metrics,
        }
        if one["kind"] == "strategy" and strategy != "random":
            diffs = [r["runs"][(strategy, method)]["new_acc"] - r["runs"][("random", method)]["new_acc"]
                     for r in per_seed]
            one["new_acc_minus_random"] = stats(diffs)
        else:
            one["new_acc_minus_random"] = None
        rows.append(one)
    return {
        "config": asdict(cfg),
        "environment": environment() | {"torch_threads": cfg.threads, "processes": processes},
        "data": {
            "source": arrays.source,
            "samples": int(len(arrays.y)),
            "num_classes": arrays.num_classes,
            "input_shape": list(arrays.x.shape[1:]),
            "shards": [os.path.basename(u) for u in arrays.shards],
            "manifest": arrays.manifest,
        },
        "strategies": [k for k, _ in STRATEGIES],
        "updates": [k for k, _ in UPDATES],
        "references": [k for k, _ in REFERENCES],
        "metrics": list(METRICS),
        "seeds": [
            {k: r[k] for k in ("seed", "budget", "split", "rare_classes", "pool_rare_share", "pretrain_s")}
            for r in per_seed
        ],
        "rows": rows,
    }


def row(results: dict[str, Any], strategy: str, update: str) -> dict[str, Any]:
    """The row of one (strategy or reference, update method); the old model's update is ``"-"``."""
    return next(r for r in results["rows"] if r["strategy"] == strategy and r["update"] == update)


def paired(results: dict[str, Any], a: str, b: str, update: str, metric: str = "new_acc") -> dict[str, Any]:
    """Per-seed ``a - b`` of ``metric`` for one update method (same seeds, same order)."""
    va = row(results, a, update)["metrics"][metric]["per_seed"]
    vb = row(results, b, update)["metrics"][metric]["per_seed"]
    return stats([x - y for x, y in zip(va, vb)])


def difference_to_random(results: dict[str, Any], strategy: str, update: str) -> Optional[dict[str, Any]]:
    """The paired difference of new-distribution accuracy to random selection (``None`` for random itself)."""
    return row(results, strategy, update)["new_acc_minus_random"]
