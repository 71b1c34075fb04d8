"""Every script in ``examples/`` runs to completion as ``python examples/X.py`` would run it.

A script that declares ``# test_examples: skip`` in its first lines (e.g. a ``torchrun`` example, run by its
own test in a fresh interpreter) is left out. Each script checks its own claims with ``assert`` (exact resume,
equal class counts, ...), so finishing means more than "it imports".

The scripts run in this process, as ``__main__`` (``runpy``), in an empty working folder and with their own
``sys.argv``: a fresh interpreter would add 3-5 s per script of importing torch, scikit-learn and torch's
compiler stack (which the first optimizer pulls in) to what the script itself does. What a script changes
globally (torch's thread count, the default random generator) is put back afterwards.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

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
def test_example_runs(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(sys, "argv", [str(script)])
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # a script may end with sys.exit(); only status 0 (or None) is a success
        assert exc.code in (0, None), f"{script.name} exited with {exc.code!r}"
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert capsys.readouterr().out.strip(), f"{script.name} printed nothing"
