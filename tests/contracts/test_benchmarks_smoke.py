"""Smoke test of the benchmark suite: every module runs at quick sizes, and ``python -m benchmarks`` writes both files.

It checks only that the suite runs and writes well-formed output; speed targets are judged by full runs
(``make bench``), never by timed tests. The modules run in this process (``run(quick=True)``, as the suite's
child processes call it), sparing a fresh interpreter per module; the command line is run once, on one module,
for what only it does (a child per module, ``results.json`` and ``results.md``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_every_benchmark_module_is_run_here():
    assert len(MODULES) >= 10 and "bench_samplers" in MODULES


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", MODULES)
def test_module_runs_at_quick_sizes(name):
    mod = importlib.import_module(f"benchmarks.{name}")
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rows = [r.to_dict() for r in mod.run(quick=True)]
    finally:
        gc.unfreeze()  # the harness freezes what survives its collections (see benchmarks/_harness.collect)
    assert torch.get_num_threads() == threads, "the module left torch's thread count changed"
    assert rows, f"{name} produced no rows"
    json.dumps(rows)  # what the suite writes to results.json
    for row in rows:
        assert row["measure"], row
        assert row["ours"] is not None and math.isfinite(row["ours"]) and row["ours"] > 0, row
        if row["baseline"] is not None:
            assert math.isfinite(row["baseline"]) and row["baseline"] > 0, row


@pytest.mark.timeout(120)
def test_command_line_writes_results(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = bench_main(["--quick", "--only", "scores", "--out-dir", str(tmp_path)])
    assert rc == 0, out.getvalue()[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["quick"] is True and not data["meta"]["errors"]
    assert {r["benchmark"] for r in data["results"]} == {"bench_scores"}
    for row in data["results"]:
        assert row["ours"] is not None and row["ours"] > 0, row
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Benchmark results") and md.count("\n| ") >= len(data["results"])
