"""Crash and resume: a training process is SIGKILLed at a random step and restarted from its last checkpoint.

The killed run is forked from the test process; the restart is a fresh interpreter (``python _crash_train.py``),
so that only the files on disk carry over, as after a real crash. The unbroken reference runs in this process.

Across the crash, the samples after the checkpoint must be exactly the unbroken run's: none lost, and only the
steps between the last checkpoint and the kill are seen twice (the documented at-least-once window).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "_support" / "_crash_train.py"
ROOT = Path(__file__).resolve().parents[2]


def _argv(kind: str, work: Path, workers: int, every: int, kill_at: int | None, extra: list[str]) -> list[str]:
    argv = [str(SCRIPT), kind, str(work), "--workers", str(workers), "--every", str(every), *extra]
    return argv + (["--kill-at", str(kill_at)] if kill_at is not None else [])


def _run(kind: str, work: Path, workers: int, every: int, kill_at: int | None, extra: list[str]) -> int:
    """The script in a fresh interpreter (the restart after a crash: nothing but the files carries over)."""
    # Output goes to a file, not a pipe: the DataLoader workers of a SIGKILLed script outlive it (until their
    # watchdog notices, up to 5 s) holding the pipe open, and reading a pipe to its end would wait for them.
    with open(work / "output.txt", "w") as out:
        proc = subprocess.run([sys.executable, *_argv(kind, work, workers, every, kill_at, extra)], cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if kill_at is None:
        assert proc.returncode == 0, (work / "output.txt").read_text()[-3000:]
    return proc.returncode


def _script_in_child(argv: list[str], output: str) -> None:
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = argv
    sys.path.insert(0, str(SCRIPT.parent))
    runpy.run_path(str(SCRIPT), run_name="__main__")


def _run_forked(kind: str, work: Path, workers: int, every: int, kill_at: int, extra: list[str]) -> int:
    """The run that gets killed, in a process forked from this one (a real process and a real SIGKILL, without
    an interpreter start: ~2.5 s of CPU each); returns its exit code as ``subprocess`` reports it."""
    proc = multiprocessing.get_context("fork").Process(
        target=_script_in_child, args=(_argv(kind, work, workers, every, kill_at, extra), str(work / "output.txt")))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"the run to be killed at step {kill_at} did not end in 120 s")
    return proc.exitcode


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
    rc = _run_forked(kind, work, workers, every, kill_at, extra)
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
