"""Running the demo: each seed's scenario, pretraining and (strategy x update method) runs, in worker processes
when there are several, then the results and the output files (:func:`run_demo`)."""

from __future__ import annotations

import copy
import datetime
import os
import queue as queue_module
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from torch_pretrain_update import read_manifest
from torch_pretrain_update._rng import mix_seed
from torch_pretrain_update.demo.config import RUNS_PER_SEED, STRATEGIES, UPDATES, DemoConfig
from torch_pretrain_update.demo.data import Arrays, build_scenario, load_shard_arrays, write_digits_shards
from torch_pretrain_update.demo.models import evaluate, make_model, train
from torch_pretrain_update.demo.progress import Progress
from torch_pretrain_update.demo.report import console_summary, format_table, write_outputs
from torch_pretrain_update.demo.results import aggregate
from torch_pretrain_update.demo.selection import budget_count, pool_logits, select_one_shot, select_rounds

__all__ = ["num_workers", "run_demo"]

#: how one seed's run reports progress: ``report(kind, seed, text)``, kinds as in ``Progress.event`` plus
#: ``"finished"`` (the seed's last report)
Report = Callable[[str, int, str], None]


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole comparison and write ``report.md``, ``results.json`` and ``results.png`` into ``cfg.out``.

    Progress goes to stderr as ``cfg.progress`` says (see :class:`~torch_pretrain_update.demo.progress.Progress`).

    Returns a dict with ``"results"`` (what ``results.json`` holds), ``"table"`` (the markdown table),
    ``"summary"`` (what the command line prints: the table, after a warning for a ``--quick`` run), ``"files"``
    and ``"wall_s"``.
    """
    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
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
        results["wall_s"] = time.perf_counter() - t_start
        results["cpu_s"] = _cpu_seconds() - cpu_start  # this process and its (finished) worker processes
        results["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
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


_worker_queue: Any = None  # set in each worker process by _init_worker


def _init_worker(queue: Any, threads: int) -> None:
    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(threads)


def _seed_in_worker(arrays: Arrays, seed: int, cfg: DemoConfig) -> dict[str, Any]:
    return _run_seed(arrays, seed, cfg, report=lambda kind, s, text: _worker_queue.put((kind, s, text)))


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
    finished: set[int] = set()

    def report(kind: str, seed: int, text: str) -> None:
        if kind == "finished":
            finished.add(seed)
            kind = "stage"
        progress.event(kind, seed, text)

    if workers <= 1:
        return [_run_seed(arrays, seed, cfg, report) for seed in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    progress.stage(f"starting {workers} worker processes (each imports torch first: a few seconds)")
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads is not safe
    queue = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(queue, cfg.threads)) as pool:
        futures = [pool.submit(_seed_in_worker, arrays, seed, cfg) for seed in seeds]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while not queue.empty():
                report(*queue.get())
        results = [f.result() for f in futures]
    # The reports travel on their own queue: the last ones can arrive after the results.
    while len(finished) < len(seeds):
        try:
            report(*queue.get(timeout=5.0))
        except queue_module.Empty:
            break
    return results


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
            chosen, model = select_rounds(
                strategy, scen, old, budget, seed, cfg,
                lambda idx, method=method: fit(idx, method, mix_seed(seed, 8))[0],
            )
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
