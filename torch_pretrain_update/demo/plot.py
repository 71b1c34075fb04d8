"""``results.png``: what the demo's numbers look like.

Top row, one panel per update method: accuracy on the new vs the old distribution for every strategy and the two
references (up and to the right is better). Bottom: the report's key number, the paired difference of
new-distribution accuracy to random selection per strategy and update method (mean ± std over the seeds), sorted,
with a zero line: right of it is better than random.

Colours are Okabe and Ito's colour-blind-safe qualitative palette, one per strategy; a multi-round strategy
shares its one-shot counterpart's colour and is drawn hollow; markers tell the update methods apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from torch_pretrain_update.demo.config import REFERENCES, STRATEGIES, UPDATES
from torch_pretrain_update.demo.results import difference_to_random, row

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DIFFERENCE_PANEL", "STRATEGY_STYLE", "UPDATE_MARKERS", "plot_results", "results_figure"]

#: strategy -> (colour, filled)
STRATEGY_STYLE: dict[str, tuple[str, bool]] = {
    "random": ("#000000", True),
    "stratified": ("#0072B2", True),
    "class_balanced": ("#56B4E9", True),
    "entropy_topk": ("#D55E00", True),
    "entropy_proportional": ("#CC79A7", True),
    "entropy_mix": ("#E69F00", True),
    "rounds_topk": ("#D55E00", False),
    "rounds_mix": ("#E69F00", False),
}
#: update method -> marker
UPDATE_MARKERS: dict[str, str] = {"finetune": "o", "partial": "s", "kd": "^"}
#: the label (``Axes.get_label()``) of the paired-difference panel
DIFFERENCE_PANEL = "difference_to_random"
_REFERENCE_STYLE = {"all_new": ("#009E73", "*", 14), "pretrained": ("#7F7F7F", "P", 10)}
_REFERENCE_SHORT = {"all_new": "all new data", "pretrained": "old model"}
_BETTER, _WORSE = "#009E73", "#B2182B"


def _point(ax: Any, x: dict[str, Any], y: dict[str, Any] | None, y_pos: float | None, *, colour: str,
           filled: bool, marker: str, size: float, label: str, bar_alpha: float) -> None:
    """One mean ± std point: (x, y) from two metrics, or x at a fixed height ``y_pos``."""
    container = ax.errorbar(
        x["mean"] * 100, y["mean"] * 100 if y is not None else y_pos,
        xerr=x["std"] * 100, yerr=y["std"] * 100 if y is not None else None,
        fmt=marker, color=colour, mfc=colour if filled else "white", mec=colour, mew=1.8, markersize=size,
        elinewidth=1.2, capsize=3 if y is None else 0, label=label, zorder=3,
    )
    for bars in container[2]:
        bars.set_alpha(bar_alpha)


def _limits(results: dict[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis ranges (percent) that fit every strategy's mean under every update method, with a margin. The
    references (no update, all new data) usually lie far outside; fitting them too would crowd the strategies."""
    means = np.array([[row(results, s, m)["metrics"][k]["mean"] * 100 for k in ("new_acc", "old_acc")]
                      for s, _ in STRATEGIES for m, _ in UPDATES])
    out = []
    for lo, hi in zip(means.min(0), means.max(0)):
        pad = 0.12 * (hi - lo) + 1.5
        out.append((float(lo - pad), float(hi + pad)))
    return out[0], out[1]


def _reference(ax: Any, m: dict[str, Any], limits: tuple[tuple[float, float], tuple[float, float]], key: str,
               label: str) -> None:
    """A reference point: inside the ranges as a point, outside as a marker on the panel's edge with its values."""
    colour, marker, size = _REFERENCE_STYLE[key]
    x, y = m["new_acc"]["mean"] * 100, m["old_acc"]["mean"] * 100
    (x0, x1), (y0, y1) = limits
    if x0 <= x <= x1 and y0 <= y <= y1:
        _point(ax, m["new_acc"], m["old_acc"], None, colour=colour, filled=True, marker=marker, size=size,
               label=label, bar_alpha=0.5)
        return
    cx, cy = min(max(x, x0), x1), min(max(y, y0), y1)
    ax.plot([cx], [cy], marker=marker, color=colour, markersize=size, ls="", clip_on=False, zorder=4, label=label)
    arrow = ("→" if x > x1 else "←" if x < x0 else "") + ("↑" if y > y1 else "↓" if y < y0 else "")
    text = f"{arrow} {_REFERENCE_SHORT[key]}\n{x:.1f} % new, {y:.1f} % old"
    right, high = cx >= x1, cy > (y0 + y1) / 2  # the text goes inwards from the edge
    ax.annotate(text, xy=(cx, cy), xytext=(-10 if right else 10, -8 if high else 8), textcoords="offset points",
                ha="right" if right else "left", va="top" if high else "bottom", color=colour, fontsize=8.5)


def _scatter(ax: Any, results: dict[str, Any], method: str,
             limits: tuple[tuple[float, float], tuple[float, float]]) -> None:
    marker = UPDATE_MARKERS[method]
    for strategy, label in STRATEGIES:
        colour, filled = STRATEGY_STYLE[strategy]
        m = row(results, strategy, method)["metrics"]
        _point(ax, m["new_acc"], m["old_acc"], None, colour=colour, filled=filled, marker=marker, size=8,
               label=label, bar_alpha=0.25)
    for key, label in REFERENCES:
        _reference(ax, row(results, key, "-" if key == "pretrained" else method)["metrics"], limits, key, label)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.annotate("better ↗", xy=(0.98, 0.03), xycoords="axes fraction", ha="right", va="bottom", color=_BETTER,
                fontsize=11, fontweight="bold")
    ax.set_xlabel("accuracy on the new distribution (%) →")
    ax.grid(alpha=0.3)


def _difference(results: dict[str, Any], strategy: str, method: str) -> dict[str, Any]:
    """``difference_to_random`` of a strategy other than random (whose difference is ``None``)."""
    d = difference_to_random(results, strategy, method)
    if d is None:
        raise ValueError(f"results has no difference to random for strategy={strategy!r}, update={method!r}")
    return d


def _difference_panel(ax: Any, results: dict[str, Any]) -> None:
    labels = dict(STRATEGIES)
    strategies = [s for s, _ in STRATEGIES if s != "random"]
    mean_over_methods = {s: float(np.mean([_difference(results, s, m)["mean"] for m, _ in UPDATES]))
                         for s in strategies}
    order = sorted(strategies, key=lambda s: mean_over_methods[s])  # best on top (largest y)
    reach = 0.0
    for i, strategy in enumerate(order):
        colour, filled = STRATEGY_STYLE[strategy]
        for j, (method, _) in enumerate(UPDATES):
            d = _difference(results, strategy, method)
            reach = max(reach, abs(d["mean"]) + d["std"])
            offset = (len(UPDATES) - 1) / 2 - j  # first update method on top within its strategy
            _point(ax, d, None, i + 0.24 * offset, colour=colour, filled=filled, marker=UPDATE_MARKERS[method],
                   size=8, label=f"{strategy}|{method}", bar_alpha=0.8)
    for i in range(len(order) - 1):
        ax.axhline(i + 0.5, color="0.85", lw=0.8, zorder=1)
    ax.set_yticks(range(len(order)), [labels[s] for s in order])
    for tick, strategy in zip(ax.get_yticklabels(), order):
        tick.set_color(STRATEGY_STYLE[strategy][0])
    ax.set_ylim(-0.6, len(order) - 0.4)
    lim = max(reach * 100 * 1.08, 1.0)
    ax.set_xlim(-lim, lim)  # zero in the middle: the better side is the right half
    ax.axvline(0.0, color="black", lw=1.5, zorder=2)
    ax.axvspan(0.0, lim, color=_BETTER, alpha=0.06, zorder=0)
    ax.axvspan(-lim, 0.0, color=_WORSE, alpha=0.04, zorder=0)
    for text, side, colour in (("better than random →", 1, _BETTER), ("← worse than random", -1, _WORSE)):
        ax.annotate(text, xy=(0.0, 1.0), xycoords=("data", "axes fraction"), xytext=(8 * side, 4),
                    textcoords="offset points", ha="left" if side > 0 else "right", va="bottom", color=colour,
                    fontsize=11, fontweight="bold")
    n = len(results["seeds"])
    ax.set_xlabel("accuracy on the new distribution minus random subset's, same seed and update method "
                  f"(points; mean ± std over {n} seeds)")
    ax.set_title("Paired difference to random selection, per strategy (sorted by the mean over update methods)",
                 fontsize=12, pad=24)
    ax.grid(axis="x", alpha=0.3)


def results_figure(results: dict[str, Any]) -> Figure:
    """The figure ``results.png`` shows, built from the results dict (no pyplot state is touched).

    The axes labelled :data:`DIFFERENCE_PANEL` is the paired-difference panel: one y tick per strategy other
    than random, best on top; one errorbar per (strategy, update method), labelled ``"strategy|method"``.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    quick = bool(results["config"]["quick"])
    fig = Figure(figsize=(16.5, 11.5), layout="constrained")
    grid = fig.add_gridspec(2, len(UPDATES) + 1, width_ratios=[1.0] * len(UPDATES) + [0.55],
                            height_ratios=[1.0, 1.0])
    limits = _limits(results)
    scatter_axes: list[Any] = []
    for i, (method, mlabel) in enumerate(UPDATES):
        ax = fig.add_subplot(grid[0, i], sharex=scatter_axes[0] if scatter_axes else None,
                             sharey=scatter_axes[0] if scatter_axes else None)
        _scatter(ax, results, method, limits)
        ax.set_title(mlabel, fontsize=12)
        if i:
            ax.tick_params(labelleft=False)
        scatter_axes.append(ax)
    scatter_axes[0].set_ylabel("accuracy on the old distribution (%) →")
    handles = [Line2D([], [], ls="", marker="o", color=STRATEGY_STYLE[s][0], markersize=8, markeredgewidth=1.8,
                      mfc=STRATEGY_STYLE[s][0] if STRATEGY_STYLE[s][1] else "white", label=label)
               for s, label in STRATEGIES]
    handles += [Line2D([], [], ls="", marker=_REFERENCE_STYLE[k][1], color=_REFERENCE_STYLE[k][0],
                       markersize=_REFERENCE_STYLE[k][2], label=label) for k, label in REFERENCES]
    key = fig.add_subplot(grid[0, len(UPDATES)])
    key.axis("off")
    key.legend(handles=handles, loc="center left", fontsize=10, frameon=False, borderaxespad=0.0,
               title="strategy (hollow: multi-round)\nmean ± std over seeds", title_fontsize=10)

    diff = fig.add_subplot(grid[1, : len(UPDATES)], label=DIFFERENCE_PANEL)
    _difference_panel(diff, results)
    method_keys = [Line2D([], [], ls="", marker=UPDATE_MARKERS[m], color="0.3", markersize=8, label=lab)
                   for m, lab in UPDATES]
    legend_ax = fig.add_subplot(grid[1, len(UPDATES)])
    legend_ax.axis("off")
    legend_ax.legend(handles=method_keys, loc="center left", fontsize=10, frameon=False, borderaxespad=0.0,
                     title="update method", title_fontsize=10)

    n = len(results["seeds"])
    title = f"Budget {results['config']['budget'] * 100:g}% of the new pool; mean ± std over {n} seeds"
    if quick:
        title += "\n--quick: a smoke test, not evidence (2 seeds, half the data, few epochs)"
    fig.suptitle(title, fontsize=13, color=_WORSE if quick else "black")
    return fig


def plot_results(results: dict[str, Any], path: str | Path) -> None:
    """Write :func:`results_figure` to ``path`` (PNG)."""
    results_figure(results).savefig(path, dpi=100)
