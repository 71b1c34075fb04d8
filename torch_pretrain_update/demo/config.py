"""What the demo compares (selection strategies, update methods, metrics) and the settings of one run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch_pretrain_update._checks import check_float, check_int

__all__ = ["METRICS", "REFERENCES", "RUNS_PER_SEED", "STRATEGIES", "UPDATES", "DemoConfig"]

#: selection strategies compared by the demo: (key, label in the table)
STRATEGIES: tuple[tuple[str, str], ...] = (
    ("random", "random subset"),
    ("stratified", "stratified (by class)"),
    ("entropy_topk", "entropy top-k"),
    ("entropy_proportional", "entropy proportional"),
    ("class_balanced", "class-balanced"),
    ("entropy_mix", "entropy top-k + 50% random"),
    ("rounds_topk", "multi-round entropy top-k"),
    ("rounds_mix", "multi-round top-k + 50% random"),
)
#: update methods: (key, label)
UPDATES: tuple[tuple[str, str], ...] = (
    ("finetune", "fine-tune all"),
    ("partial", "partial (features frozen)"),
    ("kd", "KD from old model"),
)
#: reference rows (not selection strategies): the old model as it is, and an update on the whole new pool
REFERENCES: tuple[tuple[str, str], ...] = (
    ("pretrained", "no update (old model)"),
    ("all_new", "all new data (no budget)"),
)
METRICS: tuple[str, ...] = ("new_acc", "old_acc", "minority_recall", "samples_used", "rare_share", "time_s")
#: training runs per seed: every strategy and the all-new reference, under every update method
RUNS_PER_SEED = len(UPDATES) * (len(STRATEGIES) + 1)


@dataclass
class DemoConfig:
    """Settings of one demo run (the command line fills it; the defaults are the full run).

    ``progress``: ``None`` shows bars and a status line when stderr is a terminal and a plain line per stage
    otherwise; ``True`` always shows bars; ``False`` writes nothing to stderr.
    """

    out: str = "demo_out"
    seeds: int = 5
    seed: int = 0
    budget: float = 0.1
    quick: bool = False
    data: Optional[str] = None
    label_key: str = "cls"
    input_key: Optional[str] = None
    rounds: int = 4
    pretrain_epochs: int = 60
    update_epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    mix_fraction: float = 0.5
    noise: float = 0.1
    max_shift: int = 1
    progress: Optional[bool] = None
    threads: int = 1  # torch threads per process (tiny models: more threads only add synchronisation)
    workers: int = 0  # processes running seeds in parallel; 0: min(2, CPUs, seeds)
    data_fraction: float = 1.0  # share of every class used at all (--quick: 0.5)

    def __post_init__(self) -> None:
        self.seeds = check_int(self.seeds, "seeds", min_value=1)
        self.seed = check_int(self.seed, "seed", min_value=0)
        self.budget = check_float(self.budget, "budget", low=0.0, high=1.0, low_inclusive=False)
        self.rounds = check_int(self.rounds, "rounds", min_value=2)
        self.pretrain_epochs = check_int(self.pretrain_epochs, "pretrain_epochs", min_value=1)
        self.update_epochs = check_int(self.update_epochs, "update_epochs", min_value=1)
        self.batch_size = check_int(self.batch_size, "batch_size", min_value=1)
        self.threads = check_int(self.threads, "threads", min_value=1)
        self.workers = check_int(self.workers, "workers", min_value=0)
        self.mix_fraction = check_float(self.mix_fraction, "mix_fraction", low=0.0, high=1.0)
        self.data_fraction = check_float(self.data_fraction, "data_fraction", low=0.0, high=1.0,
                                         low_inclusive=False)

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """The reduced run used by the test suite: 2 seeds, half the data, few epochs, 2 rounds (every strategy
        and update method still runs). A smoke test: its numbers are too noisy to compare strategies."""
        base: dict[str, Any] = dict(quick=True, seeds=2, rounds=2, pretrain_epochs=8, update_epochs=4,
                                    data_fraction=0.5)
        base.update(overrides)
        return cls(**base)
