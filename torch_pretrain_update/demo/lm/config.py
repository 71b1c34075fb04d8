"""What the language-model demo compares (selection strategies, update methods, metrics) and one run's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch_pretrain_update._checks import check_float, check_int

__all__ = ["LM_METRICS", "LM_STRATEGIES", "LM_UPDATES", "LMConfig"]

#: selection strategies: (key, label in the table)
LM_STRATEGIES: tuple[tuple[str, str], ...] = (
    ("random", "random subset"),
    ("ppl_topk", "perplexity top-k"),
    ("ppl_mix", "perplexity top-k + 50% random"),
    ("target", "target-matched"),
    ("dedup_target", "de-duplicated + target-matched"),
    ("cluster", "cluster-balanced"),
)
#: update methods: (key, label)
LM_UPDATES: tuple[tuple[str, str], ...] = (
    ("finetune", "fine-tune all"),
    ("partial", "partial (embeddings + lower blocks frozen)"),
    ("kd", "token-level KD from old model"),
)
#: per run: bits per byte on held-out new-domain (prose) and old-domain (code) text; what the selection held
#: (chunks, distinct chunks, share of each source, planted copies); wall time of scoring, selection and update
LM_METRICS: tuple[str, ...] = ("new_bpb", "old_bpb", "selected", "distinct", "code_share", "prose_share",
                               "other_share", "planted", "time_s")


@dataclass
class LMConfig:
    """Settings of one ``pretrain-update demo lm`` run; the defaults are the full run (about 4 minutes on 2 CPUs).

    Sizes are in chunks of at most ``seq_len + 1`` bytes (a model input of ``seq_len`` bytes and the byte after
    each position as its target). ``progress`` as the digits demo's :class:`~torch_pretrain_update.demo.Progress`:
    ``None`` bars on a terminal and a line per stage otherwise, ``True`` bars, ``False`` nothing.
    """

    out: str = "demo_lm_out"
    seeds: int = 4
    seed: int = 0
    budget: float = 0.1
    quick: bool = False
    progress: Optional[bool] = None
    workers: int = 0  # processes running seeds in parallel; 0: min(2, CPUs, seeds)
    threads: int = 0  # torch threads per process; 0: CPUs // processes (at least 1)
    # data (chunks)
    seq_len: int = 128
    old_train: int = 1600  # stdlib source code the old model is pretrained on
    test: int = 96  # held-out chunks per domain (new: prose of topics no other part uses; old: unseen files)
    target: int = 48  # the target sample: prose chunks outside the pool and the test part
    pool_code: int = 640
    pool_prose: int = 400
    pool_other: int = 320  # fewer when the environment has less other text
    exact_copies: float = 0.05  # planted copies, as a fraction of the pool before planting
    near_copies: float = 0.05
    near_edits: int = 2  # bytes changed in a near copy
    file_cap: int = 8  # most chunks taken from one source file or text file
    topic_cap: int = 24  # most chunks taken from one pydoc topic
    # model and training
    d_model: int = 64
    layers: int = 4
    heads: int = 4
    frozen_blocks: int = 2  # partial update: embeddings and this many lower blocks frozen
    batch_size: int = 16
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    update_epochs: int = 2
    lr: float = 1.5e-3
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5
    # selection
    mix_fraction: float = 0.5
    ngram: int = 2
    num_buckets: int = 10_000
    dedup_threshold: float = 0.5  # Jaccard similarity of 5-gram sets: chunks are short, one edit moves ~5 of ~100
    clusters: int = 8  # k-means pseudo-classes on the old model's mean-pooled hidden states

    def __post_init__(self) -> None:
        ints = {"seeds": 1, "seed": 0, "workers": 0, "threads": 0, "seq_len": 16, "old_train": 1, "test": 1,
                "target": 1, "pool_code": 0, "pool_prose": 0, "pool_other": 0, "near_edits": 1, "file_cap": 1,
                "topic_cap": 1, "d_model": 8, "layers": 2, "heads": 1, "frozen_blocks": 1, "batch_size": 1,
                "pretrain_steps": 1, "update_epochs": 1, "ngram": 1, "num_buckets": 1, "clusters": 1}
        for name, low in ints.items():
            setattr(self, name, check_int(getattr(self, name), name, min_value=low))
        if self.frozen_blocks >= self.layers:
            raise ValueError(f"frozen_blocks must be < layers ({self.layers}); got {self.frozen_blocks}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model must be a multiple of heads ({self.heads}); got {self.d_model}")
        if self.pool_code + self.pool_prose + self.pool_other == 0:
            raise ValueError("pool_code + pool_prose + pool_other must be > 0")
        self.budget = check_float(self.budget, "budget", low=0.0, high=1.0, low_inclusive=False)
        for name in ("exact_copies", "near_copies", "mix_fraction", "kd_alpha"):
            setattr(self, name, check_float(getattr(self, name), name, low=0.0, high=1.0))
        for name in ("pretrain_lr", "lr", "kd_temperature", "dedup_threshold"):
            setattr(self, name, check_float(getattr(self, name), name, low=0.0, low_inclusive=False))

    @classmethod
    def quick_config(cls, **overrides: Any) -> LMConfig:
        """The reduced run the tests use: 2 seeds, a small pool, a smaller model, few steps (every strategy and
        update method still runs). A smoke test: its numbers are too noisy to compare strategies."""
        base: dict[str, Any] = dict(quick=True, seeds=2, old_train=320, test=48, target=24, pool_code=160,
                                    pool_prose=120, pool_other=80, d_model=32, layers=2, frozen_blocks=1,
                                    pretrain_steps=30, update_epochs=1, clusters=4)
        base.update(overrides)
        return cls(**base)
