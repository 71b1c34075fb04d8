"""What every demo writes: the run's times, ``results.json``, ``report.md`` laid out one way, and the figure."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["cpu_seconds", "report_page", "stamp_times", "write_files"]


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def stamp_times(results: dict[str, Any], t_start: float, cpu_start: float) -> None:
    """Record the wall time since ``t_start`` (``time.perf_counter``), the CPU time since ``cpu_start``
    (:func:`cpu_seconds`: this process and its worker processes, once they have ended) and the date."""
    results["wall_s"] = time.perf_counter() - t_start
    results["cpu_s"] = cpu_seconds() - cpu_start
    results["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def report_page(*, title: str, smoke_note: Optional[str], generated: str, setup: Sequence[str], table: str,
                figure_alt: str, observations: Sequence[str]) -> str:
    """``report.md``: the title, for a ``--quick`` run the smoke-test note (``smoke_note``), the line saying how
    it was generated, then setup, table, figure (``results.png``) and the observations as a list."""
    quick = smoke_note is not None
    lines = [
        title + (" (--quick: smoke test)" if quick else ""),
        "",
        *([smoke_note, ""] if smoke_note is not None else []),
        generated,
        "",
        "## Setup",
        "",
        *setup,
        "",
        "## Results",
        "",
        table,
        "",
        f"![{figure_alt}](results.png)",
        "",
        "## What this run shows",
        "",
        "Generated from the numbers above; whatever they show is reported, no strategy was tuned."
        + (" In a `--quick` run these statements describe noise (see the note at the top)." if quick else ""),
        "",
        *[f"- {line}" for line in observations],
        "",
    ]
    return "\n".join(lines)


def write_files(results: dict[str, Any], out: Path, report: str,
                plot: Callable[[dict[str, Any], Path], None]) -> list[str]:
    """Write ``results.json``, ``report.md`` and ``results.png`` (drawn by ``plot``) into ``out``; return their
    paths."""
    paths = [out / "report.md", out / "results.json", out / "results.png"]
    paths[1].write_text(json.dumps(results, indent=1, allow_nan=False, default=_json_default) + "\n")
    paths[0].write_text(report)
    plot(results, paths[2])
    return [str(p) for p in paths]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
