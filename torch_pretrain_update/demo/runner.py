"""Running the demo: each seed's scenario, pretraining and (strategy x update method) runs, in worker processes
when there are several, then the results and the output files (:func:`run_demo`)."""

from __future__ import annotations

import copy
import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torch_pretrain_update import read_manifest
from torch_pretrain_update._rng import mix_seed
from torch_pretrain_update.demo.config import RUNS_PER_SEED, STRATEGIES, UPDATES, DemoConfig
from torch_pretrain_update.demo.data import Arrays, build_scenario, load_shard_arrays, write_digits_shards
from torch_pretrain_update.demo.models import evaluate, make_model, train
from torch_pretrain_update.demo.outputs import cpu_seconds, stamp_times
from torch_pretrain_update.demo.progress import Progress
from torch_pretrain_update.demo.report import console_summary, format_table, write_outputs
from torch_pretrain_update.demo.results import aggregate
from torch_pretrain_update.demo.selection import budget_count, pool_logits, select_one_shot, select_rounds
from torch_pretrain_update.demo.workers import Report, run_seeds

__all__ = ["num_workers", "run_demo"]

def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole comparison and write ``report.md``, ``results.json`` and ``results.png`` into ``cfg.out``.

    Progress goes to stderr as ``cfg.progress`` says (see :class:`~torch_pretrain_update.demo.progress.Progress`).

    Returns a dict with ``"results"`` (what ``results.json`` holds), ``"table"`` (the markdown table),
    ``"summary"`` (what the command line prints: the table, after a warning for a ``--quick`` run), ``"files"``
    and ``"wall_s"``.
    """
    t_start = time.perf_counter()
    cpu_start = cpu_seconds()
    progress = Progress(cfg.progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            arrays = _load(cfg, out, progress)
            per_seed = _run_seeds(arrays, cfg, progress)
        finally:
            torch.set_num_threads(threads)
        progress.stage(f"all seeds done; writing report.md, results.json and results.png to {out}")
        results = aggregate(per_seed, arrays, cfg, processes=num_workers(cfg))
        stamp_times(results, t_start, cpu_start)
        table = format_table(results)
        files = write_outputs(results, table, out)
    finally:
        progress.close()
    return {"results": results, "table": table, "summary": console_summary(results, table), "files": files,
            "wall_s": results["wall_s"]}


def _load(cfg: DemoConfig, out: Path, progress: Progress) -> Arrays:
    if cfg.data is not None:
        progress.stage(f"reading the shards {cfg.data}")
        return load_shard_arrays(cfg.data, label_key=cfg.label_key, input_key=cfg.input_key, progress=progress.bars)
    progress.stage(f"writing scikit-learn's digits to WebDataset shards in {out / 'shards'}")
    manifest = write_digits_shards(out)
    urls = read_manifest(manifest).urls
    progress.stage(f"reading the {len(urls)} shards back (strict reader, safe decoder, counts checked against "
                   "the manifest)")
    arrays = load_shard_arrays(urls, label_key="cls", manifest=manifest, progress=progress.bars)
    arrays.source = "scikit-learn digits (1,797 8x8 images), written to WebDataset shards"
    return arrays


def _count(n: int, singular: str, plural: str = "") -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def num_workers(cfg: DemoConfig) -> int:
    """Processes the seeds run in: ``cfg.workers``, or by default ``min(2, CPUs)``; never more than seeds."""
    return min(cfg.workers or min(2, os.cpu_count() or 1), cfg.seeds)


def _run_seeds(arrays: Arrays, cfg: DemoConfig, progress: Progress) -> list[dict[str, Any]]:
    """Every seed's runs, in seed order; in ``num_workers(cfg)`` processes (spawned: nothing inherited but the
    arguments) when more than one. Each seed is a pure function of its inputs, so the numbers do not depend on
    the number of processes (only the wall times do)."""
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    workers = num_workers(cfg)
    total = len(seeds) * RUNS_PER_SEED
    progress.stage(
        f"{_count(len(seeds), 'seed')} x {RUNS_PER_SEED} runs ({len(STRATEGIES)} strategies and all new data, x "
        f"{len(UPDATES)} update methods) = {total} runs, in {_count(workers, 'process', 'processes')} with "
        f"{_count(cfg.threads, 'torch thread')} each"
    )
    progress.start_bars({"pretrain": (len(seeds) * cfg.pretrain_epochs, "epoch"), "score": (len(seeds), "seed"),
                         "update": (total, "run")})
    if workers > 1:
        progress.stage(f"starting {workers} worker processes (each imports torch first: a few seconds)")
    return run_seeds(functools.partial(_run_seed, arrays, cfg=cfg), seeds, workers=workers, threads=cfg.threads,
                     report=progress.event)


def _run_seed(arrays: Arrays, seed: int, cfg: DemoConfig, report: Report) -> dict[str, Any]:
    """One seed: scenario, pretraining, then every (strategy, update) run. ``report(kind, seed, text)`` says
    what it does: ``"stage"`` when a stage starts, ``"pretrain"`` per epoch, ``"score"`` once, ``"update"`` per
    run, ``"finished"`` at the end."""
    t_seed = time.perf_counter()
    scen = build_scenario(arrays, seed, cfg)
    rare = scen.split.rare
    rare_mask = torch.from_numpy(np.isin(scen.y_pool.numpy(), rare))
    budget = budget_count(cfg, len(scen.y_pool))

    one_shot = [k for k, _ in STRATEGIES if not k.startswith("rounds_")]
    multi = [k for k, _ in STRATEGIES if k.startswith("rounds_")]
    report("stage", seed, f"pretraining the old model ({cfg.pretrain_epochs} epochs on {len(scen.y_old_train)} "
                          "old samples)")
    torch.manual_seed(mix_seed(seed, 5))
    old = make_model(tuple(scen.x_old_train.shape[1:]), scen.num_classes)
    t0 = time.perf_counter()
    train(old, scen.x_old_train, scen.y_old_train, method="finetune", cfg=cfg, epochs=cfg.pretrain_epochs,
          seed=mix_seed(seed, 6), on_epoch=lambda: report("pretrain", seed, ""))
    pretrain_s = time.perf_counter() - t0
    report("stage", seed, f"pretrained in {pretrain_s:.1f} s; one-shot strategies: {len(one_shot)} x "
                          f"{len(UPDATES)} update runs on {budget} of {len(scen.y_pool)} new samples")
    runs: dict[tuple[str, str], dict[str, float]] = {}
    base = evaluate(old, scen, rare)
    runs[("pretrained", "-")] = {**base, "samples_used": 0.0, "rare_share": float("nan"), "time_s": 0.0}

    t0 = time.perf_counter()
    logits = pool_logits(old, scen.x_pool)
    score_s = time.perf_counter() - t0
    report("score", seed, "")

    def fit(indices: torch.Tensor, method: str, run_seed: int) -> tuple[nn.Module, float]:
        model = copy.deepcopy(old)
        t = time.perf_counter()
        train(model, scen.x_pool[indices], scen.y_pool[indices], method=method, cfg=cfg,
              epochs=cfg.update_epochs, seed=run_seed, teacher=old)
        return model, time.perf_counter() - t

    def record(key: tuple[str, str], model: nn.Module, indices: torch.Tensor, took: float) -> None:
        uniq = torch.unique(indices)
        runs[key] = {**evaluate(model, scen, rare), "samples_used": float(uniq.numel()),
                     "rare_share": float(rare_mask[indices].float().mean()), "time_s": took}
        report("update", seed, "")

    for strategy in one_shot:
        t = time.perf_counter()
        chosen = select_one_shot(strategy, scen, logits, budget, seed, cfg)
        select_s = time.perf_counter() - t + (score_s if strategy.startswith("entropy") else 0.0)
        for method, _ in UPDATES:
            model, took = fit(chosen, method, mix_seed(seed, 8))
            record((strategy, method), model, chosen, select_s + took)
    report("stage", seed, f"multi-round strategies: {len(multi)} x {len(UPDATES)} update runs, "
                          f"{cfg.rounds} rounds (scoring and updates) each")
    for strategy in multi:
        for method, _ in UPDATES:
            t = time.perf_counter()

            def refit(idx: torch.Tensor, method: str = method) -> nn.Module:  # method bound now, per loop turn
                return fit(idx, method, mix_seed(seed, 8))[0]

            chosen, model = select_rounds(strategy, scen, old, budget, seed, cfg, refit)
            record((strategy, method), model, chosen, time.perf_counter() - t)
    report("stage", seed, f"all new data: {len(UPDATES)} update runs on all {len(scen.y_pool)} new samples")
    everything = torch.arange(len(scen.y_pool))
    for method, _ in UPDATES:
        model, took = fit(everything, method, mix_seed(seed, 8))
        record(("all_new", method), model, everything, took)
    report("finished", seed, f"done ({RUNS_PER_SEED} runs in {time.perf_counter() - t_seed:.1f} s)")
    return {
        "seed": seed,
        "budget": budget,
        "split": scen.split.sizes(),
        "rare_classes": [int(c) for c in rare],
        "pool_rare_share": float(rare_mask.float().mean()),
        "pretrain_s": pretrain_s,
        "runs": runs,
    }
