"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` runs every module and writes both files.

It checks only that the suite runs and writes well-formed output; speed targets are judged by full runs
(``make bench``), never by timed tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_quick_benchmarks_write_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["quick"] is True and not data["meta"]["errors"]
    modules = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert {r["benchmark"] for r in data["results"]} == modules  # every module produced at least one row
    for row in data["results"]:
        assert row["ours"] is not None and row["ours"] > 0, row
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Benchmark results") and md.count("\n| ") >= len(data["results"])
