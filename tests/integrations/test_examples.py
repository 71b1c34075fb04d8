"""Every script in ``examples/`` runs to completion (exit status 0) as a user would run it.

A script that declares ``# test_examples: skip`` in its first lines (e.g. a ``torchrun`` example, run by its
own test) is left out. Each script checks its own claims with ``assert`` (exact resume, equal class counts,
...), so exit status 0 means more than "it imports".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SKIP_MARK = "# test_examples: skip"


def _skipped(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        head = [next(f, "") for _ in range(15)]
    return any(line.strip().startswith(SKIP_MARK) for line in head)


RUN = [p for p in EXAMPLES if not _skipped(p)]


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    mine = {"entropy_sampler_loop.py", "class_balanced_kd.py", "stream_checkpoint_resume.py", "replay_mixing.py",
            "selection_rounds.py", "shards_to_update.py"}
    assert mine <= names, sorted(mine - names)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", RUN, ids=[p.name for p in RUN])
def test_example_runs(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=280)
    assert res.returncode == 0, f"{script.name} exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.strip(), f"{script.name} printed nothing"
