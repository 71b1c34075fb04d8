"""The demo's outputs: the markdown table, ``report.md`` (setup, results, what this run shows) and
``results.json``; the figure comes from :mod:`~torch_pretrain_update.demo.plot`."""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from torch_pretrain_update.demo.config import STRATEGIES, UPDATES
from torch_pretrain_update.demo.outputs import report_page, write_files
from torch_pretrain_update.demo.plot import plot_results
from torch_pretrain_update.demo.results import paired, row

__all__ = ["SMOKE_TEST_HEADLINE", "SMOKE_TEST_NOTE", "console_summary", "format_report", "format_table",
           "observations", "write_outputs"]

#: what a ``--quick`` run's report and console summary say first: its numbers are not evidence
SMOKE_TEST_HEADLINE = "Quick run: a smoke test, not evidence."
SMOKE_TEST_NOTE = (
    "`--quick` uses 2 seeds, half of the data and a few epochs to check that every strategy and update method "
    "runs end to end. Its numbers are too noisy to compare strategies and can reverse the full run's conclusions "
    "(a strategy ahead of random by 10 points here can be level with it in the full run). For numbers to read, "
    "run `pretrain-update demo` (5 seeds, all of the data)."
)


def _pm(stat: Optional[dict[str, Any]], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (printed as is): one row per (update method, strategy)."""
    head = ("| update | strategy | new acc % | Δ new vs random (pts) | old acc % | minority recall % | "
            "samples | time s |")
    lines = [head, "|" + "---|" * 8]
    for one in results["rows"]:
        m = one["metrics"]
        diff = one["new_acc_minus_random"]
        samples = m["samples_used"]
        sample_text = f"{samples['mean']:.0f}" if samples["std"] == 0 else f"{samples['mean']:.1f}"
        lines.append(
            f"| {one['update_label']} | {one['strategy_label']} | {_pm(m['new_acc'])} | "
            f"{'-' if diff is None else _pm(diff)} | {_pm(m['old_acc'])} | {_pm(m['minority_recall'])} | "
            f"{sample_text} | {_pm(m['time_s'], 1.0, 2)} |"
        )
    return "\n".join(lines)


def console_summary(results: dict[str, Any], table: str) -> str:
    """What the command line prints: the table, after the smoke-test note for a ``--quick`` run."""
    if not results["config"]["quick"]:
        return table
    note = textwrap.fill(f"{SMOKE_TEST_HEADLINE.upper()} {SMOKE_TEST_NOTE.replace('`', '')}", width=100)
    return f"{note}\n\n{table}"


_ABOVE, _WITHIN, _BELOW, _EQUAL = ("more than one std above", "within one std of", "more than one std below",
                                   "equal to")


def _verdict(stat: dict[str, Any]) -> str:
    """Where the mean paired difference lies relative to its own standard deviation over the seeds (a plain
    description, not a significance test)."""
    if stat["std"] == 0.0 and stat["mean"] == 0.0:
        return _EQUAL
    if stat["mean"] > stat["std"]:
        return _ABOVE
    if stat["mean"] < -stat["std"]:
        return _BELOW
    return _WITHIN


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers of this run (nothing here is fixed in advance)."""
    labels = dict(STRATEGIES)
    lines = []
    n = len(results["seeds"])
    base = row(results, "pretrained", "-")["metrics"]
    lines.append(
        f"The old model reaches {_pm(base['old_acc'])} % on the old distribution but {_pm(base['new_acc'])} % on "
        f"the new one (recall of the old-rare classes {_pm(base['minority_recall'])} %)."
    )
    for method, mlabel in UPDATES:
        strat_rows = [row(results, s, method) for s, _ in STRATEGIES]
        best = max(strat_rows, key=lambda r: r["metrics"]["new_acc"]["mean"])
        worst = min(strat_rows, key=lambda r: r["metrics"]["new_acc"]["mean"])
        rnd = row(results, "random", method)["metrics"]["new_acc"]
        allnew = row(results, "all_new", method)["metrics"]["new_acc"]
        groups: dict[str, list[str]] = {_ABOVE: [], _WITHIN: [], _BELOW: [], _EQUAL: []}
        for r in strat_rows:
            if r["strategy"] == "random":
                continue
            d = r["new_acc_minus_random"]
            groups[_verdict(d)].append(f"{labels[r['strategy']]} ({d['mean'] * 100:+.1f} ± {d['std'] * 100:.1f})")
        text = (
            f"**{mlabel}**: highest new-distribution accuracy with {best['strategy_label']} "
            f"({_pm(best['metrics']['new_acc'])} %), lowest with {worst['strategy_label']} "
            f"({_pm(worst['metrics']['new_acc'])} %); random subset {_pm(rnd)} %, all new data (no budget) "
            f"{_pm(allnew)} %. Paired difference to random (points, mean ± std over {n} seeds): "
        )
        parts = []
        for verdict in (_ABOVE, _WITHIN, _BELOW, _EQUAL):
            if groups[verdict]:
                parts.append(f"{verdict} random: {', '.join(groups[verdict])}")
        lines.append(text + "; ".join(parts) + ".")
        for one, many in (("entropy_topk", "rounds_topk"), ("entropy_mix", "rounds_mix")):
            d = paired(results, many, one, method)
            lines.append(
                f"{mlabel}: {labels[many]} vs one-shot {labels[one]}: {d['mean'] * 100:+.1f} ± "
                f"{d['std'] * 100:.1f} points of new accuracy ({_verdict(d)} 0)."
            )
    forget = []
    for method, mlabel in UPDATES:
        drops = [(row(results, s, method)["metrics"]["old_acc"]["mean"] - base["old_acc"]["mean"]) * 100
                 for s, _ in STRATEGIES]
        forget.append(f"{mlabel} {np.mean(drops):+.1f}")
    lines.append(
        "Old-distribution accuracy after the budgeted update, change from the old model averaged over the "
        f"strategies (points): {', '.join(forget)}."
    )
    if n < 5:
        lines.append(
            f"With {n} seeds the spread is itself uncertain: a difference within one standard deviation is no "
            "measured difference, and one just outside it is weak evidence (run `--seeds 5` or more to firm it up)."
        )
    return lines


def _describe(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    seeds = results["seeds"]
    split = seeds[0]["split"]
    d = results["data"]
    pool = split["pool"]
    model = "a small CNN (two 3x3 convolutions + a two-layer head)" if len(d["input_shape"]) == 2 else (
        "a small MLP (one hidden layer + a two-layer head)")
    return [
        f"- **Data**: {d['source']}; {d['samples']} samples, {d['num_classes']} classes, input shape "
        f"{tuple(d['input_shape'])}" + (f", read back from {len(d['shards'])} shards checked against their manifest"
                                         if d["manifest"] else "") + ".",
        "- **Old distribution**: half of the classes (drawn per seed) are rare: 4% of each rare class vs 40% of "
        f"each common class goes to old training ({split['old_train']} samples for seed {seeds[0]['seed']}); "
        f"old test: clean images with the old class mix ({split['old_test']} samples).",
        "- **New distribution**: the rest of each class goes to the new pool, where the old-rare classes are now "
        f"the majority ({seeds[0]['pool_rare_share'] * 100:.0f}% of {pool} samples for seed {seeds[0]['seed']}); "
        f"every new image is shifted by up to {cfg['max_shift']} pixel and gets Gaussian noise (std "
        f"{cfg['noise']}). New test: 17% of every class, transformed ({split['new_test']} samples).",
        f"- **Budget**: {cfg['budget'] * 100:g}% of the new pool = {_span([x['budget'] for x in seeds])} samples "
        "for the update (the pool size varies a little with the seed's rare classes).",
        f"- **Model**: {model}; pretrained {cfg['pretrain_epochs']} epochs on the old training part (Adam, lr "
        f"{cfg['lr']}, batch {cfg['batch_size']}).",
        f"- **Update** (same recipe for every strategy, nothing tuned per strategy): {cfg['update_epochs']} epochs, "
        f"Adam lr {cfg['lr']}, batch {cfg['batch_size']}, starting from the old model. *fine-tune all*: every "
        "parameter; *partial*: the convolutional feature extractor frozen and left out of the optimizer "
        "(`partial_optimizer(model, Adam, trainable='head.*')`); *KD*: every parameter, "
        f"`KDLoss(temperature={cfg['kd_temperature']}, alpha={cfg['kd_alpha']})` with the old model as teacher.",
        "- **Strategies** (library samplers, epoch 0 of each): *random subset* `RandomSubsetSampler`; "
        "*stratified* `StratifiedSampler` on the pool's labels; *entropy top-k* / *proportional* `EntropySampler` "
        "on the old model's predictive entropy; *class-balanced* `ClassBalancedSampler` (budget / classes per "
        f"class); *entropy top-k + {cfg['mix_fraction'] * 100:g}% random* `EntropySampler(random_fraction="
        f"{cfg['mix_fraction']})`; *multi-round* `SelectionRounds` over {cfg['rounds']} rounds: each round the pool "
        "is re-scored by the model updated on everything picked so far (the same recipe, from the old model), "
        "so its final model is trained exactly like the one-shot ones; its time includes every round.",
        "- **Metrics**: *new acc* and *old acc*: accuracy on the new and old test parts (old acc shows "
        "forgetting); *minority recall*: mean recall on the new test part of the classes that were rare in the "
        "old data; *samples*: distinct pool samples used; *time*: wall time of scoring, selection and update. "
        "Values are mean ± sample standard deviation over the seeds; *Δ new vs random* is the paired difference "
        "to random selection on the same seed and update method (positive: better than random).",
    ]


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def format_report(results: dict[str, Any], table: str) -> str:
    """``report.md``: a ``--quick`` run starts with the smoke-test note, then setup, table, figure and the
    statements of :func:`observations`."""
    cfg = results["config"]
    seeds = [s["seed"] for s in results["seeds"]]
    env = results["environment"]
    when = results.get("date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    quick = bool(cfg["quick"])
    return report_page(
        title="# pretrain-update demo: updating a pretrained model on drifted data under a budget",
        smoke_note=f"> **{SMOKE_TEST_HEADLINE}** {SMOKE_TEST_NOTE}" if quick else None,
        generated=f"Generated by `pretrain-update demo{' --quick' if quick else ''}` on {when}: {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), total wall time {results['wall_s']:.1f} s, CPU time "
        f"{results['cpu_s']:.1f} s ({env['processes']} process(es) with {env['torch_threads']} torch thread "
        f"each, {env['cpu_count']} CPUs visible), torch {env['torch']}.",
        setup=_describe(results),
        table=table,
        figure_alt="new vs old accuracy per strategy, and the paired difference to random",
        observations=observations(results),
    )


def write_outputs(results: dict[str, Any], table: str, out: Path) -> list[str]:
    """Write ``results.json``, ``report.md`` and ``results.png``; return their paths."""
    return write_files(results, out, format_report(results, table), plot_results)
