"""Crash and resume: a training subprocess is SIGKILLed at a random step and restarted from its last checkpoint.

Across the crash, the samples after the checkpoint must be exactly the unbroken run's: none lost, and only the
steps between the last checkpoint and the kill are seen twice (the documented at-least-once window).
"""

from __future__ import annotations

import json
import random
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "_support" / "_crash_train.py"
ROOT = Path(__file__).resolve().parents[2]


def _run(kind: str, work: Path, workers: int, every: int, kill_at: int | None, extra: list[str]) -> int:
    cmd = [sys.executable, str(SCRIPT), kind, str(work), "--workers", str(workers), "--every", str(every), *extra]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    # Output goes to a file, not a pipe: the DataLoader workers of a SIGKILLed script outlive it (until their
    # watchdog notices, up to 5 s) holding the pipe open, and reading a pipe to its end would wait for them.
    with open(work / "output.txt", "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if kill_at is None:
        assert proc.returncode == 0, (work / "output.txt").read_text()[-3000:]
    return proc.returncode


def _run_here(kind: str, work: Path, workers: int, every: int, extra: list[str], monkeypatch) -> None:
    """The unbroken reference run, in this process: the same script and arguments, without the interpreter start."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), kind, str(work), "--workers", str(workers), "--every", str(every),
                                      *extra])
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert (work / "done").exists()


def _log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.txt").read_text().splitlines()]


def _check(kind: str, tmp_path: Path, workers: int, every: int, seed: int, extra: list[str], monkeypatch) -> None:
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    _run_here(kind, ref_dir, workers, every, extra, monkeypatch)
    reference = _log(ref_dir)
    n_steps = len(reference)
    assert n_steps > every + 1

    kill_at = random.Random(seed).randint(every + 1, n_steps - 1)  # a random step with a checkpoint before it
    work = tmp_path / "crash"
    work.mkdir()
    rc = _run(kind, work, workers, every, kill_at, extra)
    assert rc == -signal.SIGKILL, f"the script was not killed (rc={rc})"
    assert not (work / "done").exists()
    before = _log(work)
    assert [r["step"] for r in before] == list(range(1, kill_at + 1))
    last_ckpt = json.loads((work / "ckpt.json").read_text())["step"]
    assert last_ckpt == kill_at - kill_at % every

    _run(kind, work, workers, every, None, extra)  # restart from the checkpoint
    after = _log(work)[kill_at:]
    # The restarted run re-does the steps after the checkpoint and finishes the epoch exactly like the unbroken run.
    assert after == reference[last_ckpt:]
    # What a consumer saw: everything up to the kill, then the resumed tail. Nothing lost; the only repeats are the
    # steps between the last checkpoint and the kill.
    seen_before = [r["ids"] for r in before]
    assert seen_before == [r["ids"] for r in reference[:kill_at]]
    repeated = seen_before[last_ckpt:kill_at]
    assert [r["ids"] for r in after[: kill_at - last_ckpt]] == repeated


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_sampler_crash_and_resume(tmp_path, workers, monkeypatch):
    _check("sampler", tmp_path, workers, every=4, seed=workers, extra=[], monkeypatch=monkeypatch)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_crash_and_resume(tmp_path, workers, monkeypatch):
    from torch_pretrain_update.data.write import write_shards

    samples = [{"__key__": f"s{i:04d}", "cls": i % 3, "x.npy": __import__("numpy").full(4, i, "float32")}
               for i in range(120)]
    manifest = write_shards(samples, str(tmp_path / "shard-%04d.tar"), maxcount=20)
    shards = str(tmp_path / "shard-{0000..0005}.tar")
    _check("stream", tmp_path, workers, every=5, seed=10 + workers,
           extra=["--shards", shards, "--manifest", manifest], monkeypatch=monkeypatch)
