"""Running the language-model demo: each seed's data, pretraining, scoring and (strategy x update method) runs,
in worker processes when there are several, then the results and the output files (:func:`run_lm_demo`)."""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from torch_pretrain_update._rng import (
    LM_DEMO_INIT,
    LM_DEMO_PRETRAIN_ORDER,
    LM_DEMO_SELECT,
    LM_DEMO_UPDATE_ORDER,
    mix_seed,
)
from torch_pretrain_update.demo.lm.config import LM_STRATEGIES, LM_UPDATES, LMConfig
from torch_pretrain_update.demo.lm.data import SOURCE_NAMES, Sources, build_corpus, find_sources, texts
from torch_pretrain_update.demo.lm.model import ByteLM, Encoded, bits_per_byte, encode, train_lm
from torch_pretrain_update.demo.lm.report import console_summary, format_table, write_outputs
from torch_pretrain_update.demo.lm.results import aggregate
from torch_pretrain_update.demo.lm.strategies import SCORING_USED, budget_count, score_pool, select, selection_stats
from torch_pretrain_update.demo.outputs import cpu_seconds, stamp_times
from torch_pretrain_update.demo.progress import Progress
from torch_pretrain_update.demo.workers import Report, run_seeds

__all__ = ["lm_processes", "run_lm_demo", "run_lm_seed", "update_steps"]

RUNS_PER_SEED = len(LM_STRATEGIES) * len(LM_UPDATES)


def lm_processes(cfg: LMConfig) -> tuple[int, int]:
    """(processes, torch threads each): ``cfg.workers`` or ``min(2, CPUs)`` processes, never more than seeds;
    ``cfg.threads`` or the CPUs shared out among the processes."""
    cpus = os.cpu_count() or 1
    workers = min(cfg.workers or min(2, cpus), cfg.seeds)
    return workers, cfg.threads or max(1, cpus // workers)


def update_steps(cfg: LMConfig, budget: int) -> int:
    """Optimizer steps of every update run: ``cfg.update_epochs`` passes over the selection."""
    return cfg.update_epochs * math.ceil(budget / cfg.batch_size)


def run_lm_demo(cfg: LMConfig) -> dict[str, Any]:
    """Run the whole comparison and write ``report.md``, ``results.json`` and ``results.png`` into ``cfg.out``.

    Returns a dict with ``"results"`` (what ``results.json`` holds), ``"table"``, ``"summary"`` (what the command
    line prints), ``"files"`` and ``"wall_s"``.
    """
    t_start = time.perf_counter()
    cpu_start = cpu_seconds()
    progress = Progress(cfg.progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workers, threads = lm_processes(cfg)
    saved_threads = torch.get_num_threads()
    try:
        progress.stage("listing the standard library's files and loading the pydoc topics")
        sources = find_sources()
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        progress.stage(f"{len(seeds)} seed(s) x {RUNS_PER_SEED} runs ({len(LM_STRATEGIES)} strategies x "
                       f"{len(LM_UPDATES)} update methods), in {workers} process(es) with {threads} torch "
                       f"thread(s) each" + (" (each imports torch first: a few seconds)" if workers > 1 else ""))
        progress.start_bars({"pretrain": (len(seeds) * cfg.pretrain_steps, "step"), "score": (len(seeds), "seed"),
                             "update": (len(seeds) * RUNS_PER_SEED, "run")})
        torch.set_num_threads(threads)
        per_seed = run_seeds(functools.partial(run_lm_seed, sources, cfg), seeds, workers=workers,
                             threads=threads, report=progress.event)
        progress.stage(f"all seeds done; writing report.md, results.json and results.png to {out}")
        results = aggregate(per_seed, sources.describe(), cfg, processes=workers, threads=threads)
        stamp_times(results, t_start, cpu_start)
        table = format_table(results)
        files = write_outputs(results, table, out)
    finally:
        torch.set_num_threads(saved_threads)
        progress.close()
    return {"results": results, "table": table, "summary": console_summary(results, table), "files": files,
            "wall_s": results["wall_s"]}


def _evaluate(model: ByteLM, new_test: Encoded, old_test: Encoded) -> dict[str, float]:
    return {"new_bpb": bits_per_byte(model, new_test), "old_bpb": bits_per_byte(model, old_test)}


def run_lm_seed(sources: Sources, cfg: LMConfig, seed: int, report: Report) -> dict[str, Any]:
    """One seed: data, pretraining, pool scores, then every (strategy, update method) run from the same old
    model. ``report(kind, seed, text)``: ``"stage"`` when a stage starts, ``"pretrain"`` per step, ``"score"``
    once, ``"update"`` per run, ``"finished"`` at the end."""
    t_seed = time.perf_counter()
    corpus = build_corpus(sources, seed, cfg)
    enc = {k: encode(getattr(corpus, k), cfg.seq_len) for k in ("old_train", "old_test", "new_test", "pool")}
    budget = budget_count(cfg, len(corpus.pool))
    report("stage", seed, f"pretraining the old model ({cfg.pretrain_steps} steps on {len(corpus.old_train)} "
                          "chunks of standard-library source code)")
    torch.manual_seed(mix_seed(seed, LM_DEMO_INIT))
    old = ByteLM(cfg.seq_len, cfg.d_model, cfg.layers, cfg.heads)
    t0 = time.perf_counter()
    train_lm(old, enc["old_train"], steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, cfg=cfg, seed=seed,
             stream=LM_DEMO_PRETRAIN_ORDER, on_step=lambda: report("pretrain", seed, ""))
    pretrain_s = time.perf_counter() - t0
    runs: dict[tuple[str, str], dict[str, float]] = {
        ("pretrained", "-"): {**_evaluate(old, enc["new_test"], enc["old_test"]), "selected": 0.0, "distinct": 0.0,
                              **{f"{k}_share": float("nan") for k in SOURCE_NAMES}, "planted": 0.0, "time_s": 0.0}
    }
    report("stage", seed, f"pretrained in {pretrain_s:.1f} s; scoring the pool of {len(corpus.pool)} chunks "
                          "(perplexity, hidden-state clusters, target n-grams, near duplicates)")
    select_seed = mix_seed(seed, LM_DEMO_SELECT) % (1 << 31)
    scores = score_pool(old, enc["pool"], texts(corpus.pool), texts(corpus.target), select_seed, cfg)
    report("score", seed, "")
    steps = update_steps(cfg, budget)
    report("stage", seed, f"{RUNS_PER_SEED} update runs of {steps} steps on {budget} of {len(corpus.pool)} pool "
                          "chunks each")
    for strategy, _ in LM_STRATEGIES:
        t = time.perf_counter()
        chosen = select(strategy, scores, budget, select_seed, cfg)
        select_s = time.perf_counter() - t + sum(scores.seconds[k] for k in SCORING_USED[strategy])
        held = selection_stats(chosen, corpus)
        part = enc["pool"].subset(chosen)
        for method, _ in LM_UPDATES:
            model = copy.deepcopy(old)
            t = time.perf_counter()
            train_lm(model, part, steps=steps, lr=cfg.lr, cfg=cfg, seed=seed, stream=LM_DEMO_UPDATE_ORDER,
                     method=method, teacher=old)
            took = time.perf_counter() - t
            runs[(strategy, method)] = {**_evaluate(model, enc["new_test"], enc["old_test"]), **held,
                                        "time_s": select_s + took}
            report("update", seed, "")
    planted = corpus.copy_of >= 0
    drop = scores.drop.numpy()
    report("finished", seed, f"done ({RUNS_PER_SEED} runs in {time.perf_counter() - t_seed:.1f} s)")
    return {
        "seed": seed,
        "budget": budget,
        "sizes": corpus.sizes(),
        "steps": {"pretrain": cfg.pretrain_steps, "update": steps},
        "pretrain_s": pretrain_s,
        "scoring_s": scores.seconds,
        "duplicates": {"dropped": int(drop.sum()), "planted": int(planted.sum()),
                       "planted_dropped": int(drop[planted].sum()), "base_dropped": int(drop[~planted].sum())},
        "log_ratio_by_source": {name: float(scores.log_ratio[torch.from_numpy(corpus.source == i)].mean())
                                for i, name in enumerate(SOURCE_NAMES) if (corpus.source == i).any()},
        "runs": runs,
    }
