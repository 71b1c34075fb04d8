"""``results.png`` of the language-model demo.

Top row, one panel per update method: bits per byte on the new domain (prose) vs the old domain (source code) for
every strategy (down and to the left is better), with the old model as a grey cross and its old-domain value as a
dashed line (above it: forgetting). Bottom: the paired difference of new- and old-domain bits per byte to random
selection per strategy and update method (mean ± std over the seeds), zero in the middle: left of it is better
than random.
Colours are Okabe and Ito's colour-blind-safe palette, one per strategy; markers tell the update methods apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from torch_pretrain_update.demo.lm.config import LM_STRATEGIES, LM_UPDATES
from torch_pretrain_update.demo.lm.results import lm_difference, lm_row
from torch_pretrain_update.demo.plot import DIFFERENCE_PANEL, UPDATE_MARKERS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LM_STRATEGY_COLOURS", "OLD_DIFFERENCE_PANEL", "lm_results_figure", "plot_lm_results"]

LM_STRATEGY_COLOURS: dict[str, str] = {"random": "#000000", "ppl_topk": "#D55E00", "ppl_mix": "#E69F00",
                                       "target": "#0072B2", "dedup_target": "#56B4E9", "cluster": "#009E73"}
#: the label (``Axes.get_label()``) of the old-domain difference panel; the new-domain one is ``DIFFERENCE_PANEL``
OLD_DIFFERENCE_PANEL = "old_difference_to_random"
_BETTER, _WORSE, _OLD_MODEL = "#009E73", "#B2182B", "#7F7F7F"


def _point(ax: Any, x: dict[str, Any], y: Any, yerr: Any, colour: str, marker: str, label: str) -> None:
    ax.errorbar(x["mean"], y, xerr=x["std"], yerr=yerr, fmt=marker, color=colour, mfc=colour, mec=colour,
                markersize=8, elinewidth=1.2, capsize=0 if yerr is not None else 3, label=label, zorder=3)


def _scatter(ax: Any, results: dict[str, Any], method: str) -> None:
    for strategy, label in LM_STRATEGIES:
        m = lm_row(results, strategy, method)["metrics"]
        _point(ax, m["new_bpb"], m["old_bpb"]["mean"], m["old_bpb"]["std"], LM_STRATEGY_COLOURS[strategy],
               UPDATE_MARKERS[method], label)
    base = lm_row(results, "pretrained", "-")["metrics"]
    ax.axhline(base["old_bpb"]["mean"], color=_OLD_MODEL, ls="--", lw=1.2, zorder=1)
    ax.plot([base["new_bpb"]["mean"]], [base["old_bpb"]["mean"]], marker="P", color=_OLD_MODEL, markersize=11,
            ls="", zorder=4)
    ax.annotate(f"✚ old model: {base['new_bpb']['mean']:.3f} new, {base['old_bpb']['mean']:.3f} old (dashed)",
                xy=(0.02, 0.97), xycoords="axes fraction", ha="left", va="top", color=_OLD_MODEL, fontsize=9)
    ax.annotate("better ↙", xy=(0.02, 0.03), xycoords="axes fraction", ha="left", va="bottom", color=_BETTER,
                fontsize=11, fontweight="bold", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_xlabel("bits per byte on new-domain prose (lower is better)")
    ax.grid(alpha=0.3)


def _difference_panel(ax: Any, results: dict[str, Any], metric: str, order: list[str]) -> None:
    labels = dict(LM_STRATEGIES)
    reach = 0.0
    for i, strategy in enumerate(order):
        for j, (method, _) in enumerate(LM_UPDATES):
            d = lm_difference(results, strategy, method, metric)
            if d is None or d["mean"] is None:
                continue
            reach = max(reach, abs(d["mean"]) + d["std"])
            offset = (len(LM_UPDATES) - 1) / 2 - j  # first update method on top within its strategy
            _point(ax, d, i + 0.24 * offset, None, LM_STRATEGY_COLOURS[strategy], UPDATE_MARKERS[method],
                   f"{strategy}|{method}")
    ax.set_yticks(range(len(order)), [labels[s] for s in order])
    ax.set_ylim(-0.6, len(order) - 0.4)
    lim = max(reach * 1.08, 1e-3)
    ax.set_xlim(-lim, lim)
    ax.axvline(0.0, color="black", lw=1.5, zorder=2)
    ax.axvspan(-lim, 0.0, color=_BETTER, alpha=0.06, zorder=0)
    ax.axvspan(0.0, lim, color=_WORSE, alpha=0.04, zorder=0)
    for text, side, colour in (("← better than random", -1, _BETTER), ("worse than random →", 1, _WORSE)):
        ax.annotate(text, xy=(0.0, 1.0), xycoords=("data", "axes fraction"), xytext=(8 * side, 4),
                    textcoords="offset points", ha="left" if side > 0 else "right", va="bottom", color=colour,
                    fontsize=10, fontweight="bold")
    if metric == "new_bpb":
        ax.set_xlabel("bits per byte on new-domain prose minus random subset's (same seed and update method)")
    else:
        ax.set_xlabel("old-domain code: minus random subset's")
    ax.grid(axis="x", alpha=0.3)


def lm_results_figure(results: dict[str, Any]) -> Figure:
    """The figure ``results.png`` shows (no pyplot state is touched). The axes labelled
    :data:`~torch_pretrain_update.demo.plot.DIFFERENCE_PANEL` (new domain) and :data:`OLD_DIFFERENCE_PANEL` hold
    one errorbar per (strategy other than random, update method), labelled ``"strategy|method"``."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(16.5, 11.0), layout="constrained")
    grid = fig.add_gridspec(2, len(LM_UPDATES))
    first: Any = None
    for i, (method, mlabel) in enumerate(LM_UPDATES):
        ax = fig.add_subplot(grid[0, i], sharex=first, sharey=first)
        _scatter(ax, results, method)
        ax.set_title(mlabel, fontsize=12)
        first = first or ax
    first.set_ylabel("bits per byte on old-domain code (lower is better)")
    strategies = [s for s, _ in LM_STRATEGIES if s != "random"]
    mean = {s: float(np.mean([lm_row(results, s, m)["new_bpb_minus_random"]["mean"] for m, _ in LM_UPDATES]))
            for s in strategies}
    order = sorted(strategies, key=lambda s: -mean[s])  # best (most negative) on top
    _difference_panel(fig.add_subplot(grid[1, :2], label=DIFFERENCE_PANEL), results, "new_bpb", order)
    old_ax = fig.add_subplot(grid[1, 2], label=OLD_DIFFERENCE_PANEL)
    _difference_panel(old_ax, results, "old_bpb", order)
    old_ax.tick_params(labelleft=False)
    handles = [Line2D([], [], ls="", marker="o", color=LM_STRATEGY_COLOURS[s], markersize=8, label=label)
               for s, label in LM_STRATEGIES]
    handles += [Line2D([], [], ls="", marker=UPDATE_MARKERS[m], color="0.3", markersize=8, label=label)
                for m, label in LM_UPDATES]
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=10, frameon=False)
    n = len(results["seeds"])
    title = (f"Byte-level LM updated on {results['config']['budget'] * 100:g}% of a mixed pool toward prose; "
             f"mean ± std over {n} seeds")
    if results["config"]["quick"]:
        title += "\n--quick: a smoke test, not evidence (2 seeds, small pool and model, few steps)"
    fig.suptitle(title, fontsize=13, color=_WORSE if results["config"]["quick"] else "black")
    return fig


def plot_lm_results(results: dict[str, Any], path: str | Path) -> None:
    """Write :func:`lm_results_figure` to ``path`` (PNG)."""
    lm_results_figure(results).savefig(path, dpi=100)
