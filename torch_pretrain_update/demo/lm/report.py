"""The language-model demo's outputs: the markdown table, ``report.md`` (setup, results, what this run shows) and
``results.json``; the figure comes from :mod:`~torch_pretrain_update.demo.lm.plot`."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from torch_pretrain_update.demo.lm.config import LM_STRATEGIES, LM_UPDATES
from torch_pretrain_update.demo.lm.data import SOURCE_NAMES
from torch_pretrain_update.demo.lm.plot import plot_lm_results
from torch_pretrain_update.demo.lm.results import lm_difference, lm_row
from torch_pretrain_update.demo.outputs import report_page, write_files
from torch_pretrain_update.demo.report import _ABOVE, _BELOW, _EQUAL, _WITHIN, SMOKE_TEST_HEADLINE
from torch_pretrain_update.demo.report import _pm as pm
from torch_pretrain_update.demo.report import _span as span
from torch_pretrain_update.demo.report import _verdict as verdict

__all__ = ["LM_SMOKE_TEST_NOTE", "console_summary", "format_lm_report", "format_table", "lm_observations",
           "write_outputs"]

#: what a ``--quick`` run's report and console summary say after :data:`SMOKE_TEST_HEADLINE`
LM_SMOKE_TEST_NOTE = (
    "`--quick` uses 2 seeds, a pool of a few hundred chunks, a smaller model and a few dozen training steps to check "
    "that every strategy and update method runs end to end. Its numbers are too noisy to compare strategies and can "
    "reverse the full run's conclusions. For numbers to read, run `pretrain-update demo lm` (4 seeds)."
)
#: how a paired difference of bits per byte reads (fewer bits than random is better)
_READING = {_BELOW: "better than random (more than one std below it)", _WITHIN: "within one std of random",
            _ABOVE: "worse than random (more than one std above it)", _EQUAL: "equal to random"}


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table: one row per (update method, strategy), the old model first."""
    lines = ["| update | strategy | new bpb | Δ new vs random | old bpb | Δ old vs random | prose % | "
             "planted copies | distinct | time s |", "|" + "---|" * 10]
    for one in results["rows"]:
        m = one["metrics"]
        diffs = [pm(one[f"{k}_minus_random"], 1.0, 3) for k in ("new_bpb", "old_bpb")]
        held = ["-"] * 3 if one["kind"] == "reference" else [pm(m[k], 1.0, 1) for k in ("planted", "distinct",
                                                                                        "time_s")]
        lines.append(
            f"| {one['update_label']} | {one['strategy_label']} | {pm(m['new_bpb'], 1.0, 3)} | {diffs[0]} | "
            f"{pm(m['old_bpb'], 1.0, 3)} | {diffs[1]} | {pm(m['prose_share'])} | {' | '.join(held)} |"
        )
    return "\n".join(lines)


def console_summary(results: dict[str, Any], table: str) -> str:
    """What the command line prints: the table, after the smoke-test note for a ``--quick`` run."""
    if not results["config"]["quick"]:
        return table
    note = textwrap.fill(f"{SMOKE_TEST_HEADLINE.upper()} {LM_SMOKE_TEST_NOTE.replace('`', '')}", width=100)
    return f"{note}\n\n{table}"


def _mean_over_seeds(results: dict[str, Any], key: str, field: str) -> float:
    return float(np.mean([s[key][field] for s in results["seeds"]]))


def lm_observations(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers of this run (nothing here is fixed in advance)."""
    labels = dict(LM_STRATEGIES)
    n = len(results["seeds"])
    base = lm_row(results, "pretrained", "-")["metrics"]
    lines = [f"The old model needs {pm(base['old_bpb'], 1.0, 3)} bits per byte on held-out source code (its own "
             f"domain) and {pm(base['new_bpb'], 1.0, 3)} on held-out prose (the new domain)."]
    for method, mlabel in LM_UPDATES:
        rows = [lm_row(results, s, method) for s, _ in LM_STRATEGIES]
        best = min(rows, key=lambda r: r["metrics"]["new_bpb"]["mean"])
        worst = max(rows, key=lambda r: r["metrics"]["new_bpb"]["mean"])
        groups: dict[str, list[str]] = {k: [] for k in _READING}
        for r in rows[1:]:
            d = lm_difference(results, r["strategy"], method)
            if d is not None:
                groups[verdict(d)].append(f"{labels[r['strategy']]} ({d['mean']:+.3f} ± {d['std']:.3f})")
        parts = [f"{_READING[k]}: {', '.join(v)}" for k, v in groups.items() if v]
        lines.append(
            f"**{mlabel}**: fewest new-domain bits per byte with {best['strategy_label']} "
            f"({pm(best['metrics']['new_bpb'], 1.0, 3)}), most with {worst['strategy_label']} "
            f"({pm(worst['metrics']['new_bpb'], 1.0, 3)}); random subset {pm(rows[0]['metrics']['new_bpb'], 1.0, 3)}. "
            f"Paired difference to random (bits per byte, mean ± std over {n} seeds): " + "; ".join(parts) + "."
        )
    forget = []
    for method, mlabel in LM_UPDATES:
        change = np.mean([lm_row(results, s, method)["metrics"]["old_bpb"]["mean"] for s, _ in LM_STRATEGIES])
        forget.append(f"{mlabel} {change - base['old_bpb']['mean']:+.3f}")
    lines.append("Forgetting: old-domain bits per byte after the update minus the old model's, averaged over the "
                 f"strategies: {', '.join(forget)} (positive = worse on the old domain).")
    held = {s: lm_row(results, s, "finetune")["metrics"] for s, _ in LM_STRATEGIES}  # the same for every method
    shares = [f"{label} {held[s]['prose_share']['mean'] * 100:.0f}%" for s, label in LM_STRATEGIES]
    pool = ", ".join(f"{_pool_share(results, k) * 100:.0f}% {k}" for k in SOURCE_NAMES)
    ppl = ", ".join(f"{held['ppl_topk'][f'{k}_share']['mean'] * 100:.0f}% {k}" for k in SOURCE_NAMES)
    lines.append(f"Share of prose (the new domain) in the selection: {', '.join(shares)}. The pool before planting "
                 f"holds {pool}; perplexity top-k takes {ppl}.")
    dup = {k: _mean_over_seeds(results, "duplicates", k) for k in ("planted", "planted_dropped", "base_dropped")}
    picked = {s: held[s]["planted"]["mean"] for s in ("random", "target", "dedup_target")}
    lines.append(
        f"Duplicates: of {dup['planted']:.0f} planted copies per seed (exact and near), the near-duplicate mask "
        f"drops {dup['planted_dropped']:.1f}, and {dup['base_dropped']:.1f} further chunks that already repeat "
        f"another one. Planted copies in the selection: random {picked['random']:.1f}, target-matched "
        f"{picked['target']:.1f}, de-duplicated + target-matched {picked['dedup_target']:.1f}."
    )
    if n < 5:
        lines.append(f"With {n} seeds the spread is itself uncertain: a difference within one standard deviation is "
                     "no measured difference, and one just outside it is weak evidence.")
    return lines


def _pool_share(results: dict[str, Any], source: str) -> float:
    sizes = [s["sizes"] for s in results["seeds"]]
    return float(np.mean([z[f"pool_{source}"] / (z["pool"] - z["planted_exact"] - z["planted_near"]) for z in sizes]))


def _describe(results: dict[str, Any]) -> list[str]:
    cfg, d, seeds = results["config"], results["data"], results["seeds"]
    z = seeds[0]["sizes"]
    lower = "block 0" if cfg["frozen_blocks"] == 1 else f"blocks 0-{cfg['frozen_blocks'] - 1}"
    frozen = f"token and position embeddings and {lower}"
    return [
        f"- **Data** (Python {d['python']}'s own files, nothing downloaded): chunks of at most {cfg['seq_len'] + 1} "
        f"bytes. *Old domain*: source code from {d['code_files']} `.py` files of the standard library; "
        f"*new domain*: the English prose of `pydoc_data.topics` ({d['pydoc_topics']} topics); *other text*: "
        f"{d['text_files']} `.txt`/`.rst`/README/LICENSE files of the standard library directory.",
        f"- **Parts** (seed {seeds[0]['seed']}; whole files and topics per part): old training {z['old_train']} "
        f"chunks; old test {z['old_test']}; new test {z['new_test']} (topics no other part uses); target sample "
        f"{z['target']} prose chunks; pool {z['pool']} = {z['pool_code']} code + {z['pool_prose']} prose + "
        f"{z['pool_other']} other + {z['planted_exact']} exact copies + {z['planted_near']} near copies "
        f"({cfg['near_edits']} bytes changed) of pool chunks.",
        f"- **Budget**: {cfg['budget'] * 100:g}% of the pool = {span([s['budget'] for s in seeds])} chunks.",
        f"- **Model**: byte-level transformer ({cfg['layers']} blocks, width {cfg['d_model']}, {cfg['heads']} heads, "
        f"causal), pretrained for {cfg['pretrain_steps']} steps (batch {cfg['batch_size']}, Adam, lr "
        f"{cfg['pretrain_lr']}, warm-up and cosine decay) on the old training part.",
        f"- **Update** (same recipe for every strategy): {seeds[0]['steps']['update']} steps = "
        f"{cfg['update_epochs']} passes over the selection, Adam lr {cfg['lr']}, from the old model. *fine-tune "
        f"all*: every parameter; *partial*: {frozen} frozen with `freeze` and left out of the optimizer by "
        f"`partial_optimizer`; *KD*: every parameter, `KDLoss(temperature={cfg['kd_temperature']}, "
        f"alpha={cfg['kd_alpha']})` per byte position with the padding as its mask, the old model as teacher.",
        "- **Strategies** (library samplers, the first `budget` indices of epoch 0): *random* "
        "`RandomSubsetSampler`; *perplexity top-k* `EntropySampler.from_scores(nll)` on each chunk's mean NLL under "
        "the old model (`sequence_scores(..., score='nll')`), highest first; *+ 50% random* the same with "
        f"`random_fraction={cfg['mix_fraction']}`; *target-matched* `WeightedSampler(resampling_weights(log_ratio), "
        "replacement=False)` with `target_log_ratio` of `hashed_ngram_features` (word uni- and bigrams, "
        f"{cfg['num_buckets']} buckets, smoothing 1 / buckets) of the pool vs the target sample; "
        "*de-duplicated* the same with "
        f"`near_duplicate_mask` (threshold {cfg['dedup_threshold']}) excluded; *cluster-balanced* "
        f"`ClassBalancedSampler` over `kmeans_labels` (k = {cfg['clusters']}) of the old model's mean-pooled hidden "
        "states.",
        "- **Metrics**: bits per byte (mean negative log2-likelihood of each next byte) on the held-out prose "
        "(*new*) and source code (*old*: forgetting); mean ± sample std over the seeds; *Δ vs random*: paired "
        "difference to random selection with the same seed and update method (negative = better). *prose %*, "
        "*planted copies* and *distinct*: what the selection holds; *time*: scoring, selection and update.",
    ]


def format_lm_report(results: dict[str, Any], table: str) -> str:
    """``report.md``: a ``--quick`` run starts with the smoke-test note, then setup, table, figure and
    :func:`lm_observations`."""
    cfg, env = results["config"], results["environment"]
    quick = bool(cfg["quick"])
    seeds = [s["seed"] for s in results["seeds"]]
    return report_page(
        title="# pretrain-update demo lm: updating a byte-level language model on new text under a budget",
        smoke_note=f"> **{SMOKE_TEST_HEADLINE}** {LM_SMOKE_TEST_NOTE}" if quick else None,
        generated=f"Generated by `pretrain-update demo lm{' --quick' if quick else ''}` on {results['date']}: "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), wall time {results['wall_s']:.1f} s, CPU time "
        f"{results['cpu_s']:.1f} s ({env['processes']} process(es) with {env['torch_threads']} torch thread(s) "
        f"each, {env['cpu_count']} CPUs visible), torch {env['torch']}.",
        setup=_describe(results),
        table=table,
        figure_alt="bits per byte on new vs old text per strategy, and the paired difference to random",
        observations=lm_observations(results),
    )


def write_outputs(results: dict[str, Any], table: str, out: Path) -> list[str]:
    """Write ``results.json``, ``report.md`` and ``results.png``; return their paths."""
    return write_files(results, out, format_lm_report(results, table), plot_lm_results)
