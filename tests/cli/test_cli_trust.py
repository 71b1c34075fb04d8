"""The command line as a person meets it: it never destroys an input, writes what the suffix says, reports in JSON,
shows progress by one rule, and says how to fix a mistake in its own words (flags, not library arguments).

Every call runs ``cli.main`` in-process on small real files; expected values are recomputed with numpy.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import torch_pretrain_update
from tests._support.cli import run_cli as run
from tests._support.references import entropy64, topk_ref
from torch_pretrain_update.cli import main
from torch_pretrain_update.cli._common import int_lines

ROOT = Path(__file__).resolve().parents[2]


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder):
    """{name: bytes} of every file in ``folder`` (hidden ones included): what must not change."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4) * 0.5, size=60).astype(np.float32)
    labels = rng.integers(0, 4, 60)
    np.save(tmp_path / "probs.npy", p)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "done.npy", np.arange(0, 60, 6))
    return tmp_path, p, labels


# ------------------------------------------------------------------------------- A: never destroy input
@pytest.mark.parametrize(
    "case",
    ["same path", "dot path", "symlink", "hard link", "labels", "exclude", "weights"],
)
def test_output_that_is_an_input_is_refused(files, capsys, monkeypatch, case):
    folder, _, _ = files
    monkeypatch.chdir(folder)
    select = ["select", "probs.npy", "--budget", 5, "--strategy", "entropy", "--no-progress"]
    argv, names = {
        "same path": (select + ["-o", "probs.npy"], ["'probs.npy'", "input"]),
        "dot path": (select + ["-o", "./probs.npy"], ["'./probs.npy'", "'probs.npy'"]),
        "symlink": (select + ["-o", "link.npy"], ["'link.npy'", "'probs.npy'"]),
        "hard link": (select + ["-o", "hard.npy"], ["'hard.npy'", "'probs.npy'"]),
        "labels": (["select", "probs.npy", "--budget", 8, "--strategy", "stratified", "--labels", "labels.npy",
                    "-o", "labels.npy", "--no-progress"], ["-o 'labels.npy'", "--labels 'labels.npy'"]),
        "exclude": (select + ["--exclude", "done.npy", "-o", "done.npy"], ["-o 'done.npy'", "--exclude 'done.npy'"]),
        "weights": (["weights", "labels.npy", "-o", "labels.npy", "--no-progress"], ["-o 'labels.npy'"]),
    }[case]
    os.symlink("probs.npy", folder / "link.npy")
    os.link(folder / "probs.npy", folder / "hard.npy")
    before = snapshot(folder)
    code, out, err = run(argv, capsys)
    one_line_error(code, err, "same file", *names)
    assert out == ""
    assert snapshot(folder) == before  # every input byte for byte, and no file added (no temporary left)
    assert os.path.islink(folder / "link.npy") and os.path.samefile(folder / "hard.npy", folder / "probs.npy")


def _failing_save(exc):
    real_save = np.save

    def save(f, arr, *a, **k):
        f.write(b"\x93NUMPY partial")  # some bytes reach the temporary file first
        raise exc

    return save, real_save


@pytest.mark.parametrize("exc, code", [(OSError(errno.ENOSPC, "No space left on device"), 2),
                                       (KeyboardInterrupt(), 130)])
def test_write_failure_leaves_nothing_behind(files, capsys, monkeypatch, exc, code):
    folder, _, _ = files
    np.save(folder / "keep.npy", np.array([7, 8, 9]))  # an earlier result: must survive a failed write
    (folder / "keep.npy.tmp").write_bytes(b"someone else's file")  # the old fixed temporary name
    before = snapshot(folder)
    save, _ = _failing_save(exc)
    monkeypatch.setattr(np, "save", save)
    got, out, err = run(["select", folder / "probs.npy", "--budget", 5, "--strategy", "entropy", "-o",
                         folder / "keep.npy", "--no-progress"], capsys)
    monkeypatch.undo()
    assert got == code, err
    if code == 2:
        one_line_error(got, err, "cannot write", "keep.npy", "No space left")
    else:
        assert err.strip() == "pretrain-update select: interrupted"
    assert snapshot(folder) == before  # old output intact, keep.npy.tmp untouched, no temporary left


def test_successful_write_uses_a_private_temporary(files, capsys):
    folder, p, _ = files
    (folder / "keep.npy.tmp").write_bytes(b"someone else's file")
    before = snapshot(folder)
    code, _, err = run(["select", folder / "probs.npy", "--budget", 5, "--strategy", "entropy", "-o",
                        folder / "keep.npy", "--no-progress"], capsys)
    assert code == 0, err
    after = snapshot(folder)
    assert set(after) == set(before) | {"keep.npy"}
    assert after["keep.npy.tmp"] == b"someone else's file"
    np.testing.assert_array_equal(np.load(folder / "keep.npy"), topk_ref(entropy64(p), 5))
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(folder / "keep.npy").st_mode & 0o777) == 0o666 & ~umask  # as open() would make it


# --------------------------------------------------------------------------------------------- B: version
def test_version(capsys):
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert torch_pretrain_update.__version__ == version
    code, out, err = run(["--version"], capsys)
    assert code == 0, err
    assert out == f"pretrain-update {version}\n"


# ---------------------------------------------------------------------------------- C: output formats
@pytest.mark.parametrize("name", ["keep.npy", "keep.csv", "keep.txt", "KEEP.CSV"])
def test_select_writes_the_format_its_suffix_names(files, capsys, name):
    folder, p, _ = files
    code, _, err = run(["select", folder / "probs.npy", "--budget", 12, "--strategy", "entropy", "-o",
                        folder / name, "--no-progress"], capsys)
    assert code == 0, err
    ref = topk_ref(entropy64(p), 12)
    if name.endswith(".npy"):
        got = np.load(folder / name)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref)
        return
    text = (folder / name).read_text()
    assert text.endswith("\n") and "\r" not in text
    lines = text.splitlines()
    if name.lower().endswith(".csv"):
        assert lines[0] == "index"  # one header line, then one index per line
        lines = lines[1:]
    assert lines == [str(i) for i in ref]


@pytest.mark.parametrize("name", ["keep.bin", "keep", "keep.npz", "keep.npy.gz"])
def test_unknown_output_suffix_is_refused(files, capsys, name):
    folder, _, _ = files
    before = snapshot(folder)
    for argv in (["select", folder / "probs.npy", "--budget", 5, "--strategy", "entropy"],
                 ["weights", folder / "labels.npy"]):
        code, out, err = run([*argv, "-o", folder / name, "--no-progress"], capsys)
        one_line_error(code, err, name, ".npy", ".csv", ".txt")
        assert out == ""
    assert snapshot(folder) == before


def test_weights_writes_the_format_its_suffix_names(files, capsys):
    folder, _, labels = files
    written = {}
    for suffix in ("npy", "csv", "txt"):
        code, _, err = run(["weights", folder / "labels.npy", "--scheme", "effective_number", "--beta", "0.9",
                            "-o", folder / f"w.{suffix}", "--no-progress"], capsys)
        assert code == 0, err
        written[suffix] = folder / f"w.{suffix}"
    w = np.load(written["npy"])
    assert w.dtype == np.float32 and w.shape == (4,)
    n = np.bincount(labels, minlength=4).astype(np.float64)
    raw = (1 - 0.9) / (1 - 0.9**n)
    np.testing.assert_allclose(w, raw * n.sum() / (n * raw).sum(), rtol=1e-6)
    csv = written["csv"].read_text().splitlines()
    assert csv[0] == "class,weight"
    assert [int(line.split(",")[0]) for line in csv[1:]] == [0, 1, 2, 3]
    # the text is the shortest decimal of each float32: it reads back bit for bit
    np.testing.assert_array_equal(np.array([line.split(",")[1] for line in csv[1:]], dtype=np.float32), w)
    np.testing.assert_array_equal(np.array(written["txt"].read_text().split(), dtype=np.float32), w)


def test_int_lines_matches_str():
    values = np.array([0, 5, 9, 10, 11, 99, 100, 12345, 10**12, 2**62, 7], dtype=np.int64)
    assert int_lines(values) == ("\n".join(map(str, values.tolist())) + "\n").encode()
    assert int_lines(np.zeros(3, dtype=np.int64)) == b"0\n0\n0\n"
    assert int_lines(np.array([], dtype=np.int64)) == b""


# ------------------------------------------------------------------------------------------- D: --json
def test_select_json_summary(files, capsys):
    folder, _, labels = files
    code, out, err = run(["select", folder / "probs.npy", "--budget", 0.2, "--strategy", "stratified", "--labels",
                          folder / "labels.npy", "--exclude", folder / "done.npy", "--seed", 3, "-o",
                          folder / "keep.csv", "--json", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out)  # stdout is exactly one JSON object
    got = np.array((folder / "keep.csv").read_text().split()[1:], dtype=np.int64)
    cls, cnt = np.unique(labels[got], return_counts=True)
    seconds = summary.pop("seconds")
    assert isinstance(seconds, float) and 0.0 <= seconds < 60.0
    assert summary == {
        "command": "select", "input": str(folder / "probs.npy"), "rows": 60, "budget": 0.2, "budget_rows": 12,
        "selected": 12, "unique": 12, "strategy": "stratified", "seed": 3, "labels": str(folder / "labels.npy"),
        "exclude": str(folder / "done.npy"), "excluded": 10,
        "class_counts": {str(c): int(m) for c, m in zip(cls, cnt)},
        "output": str(folder / "keep.csv"), "format": "csv",
    }
    assert not np.isin(got, np.arange(0, 60, 6)).any()


def test_select_json_score_strategy(files, capsys):
    folder, p, _ = files
    code, out, err = run(["select", folder / "probs.npy", "--budget", 7, "--strategy", "entropy", "-o",
                          folder / "k.npy", "--json", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["selected"], summary["rows"], summary["mode"], summary["random_fraction"]) == (7, 60, "topk", 0.0)
    assert "class_counts" not in summary  # unknown without labels
    np.testing.assert_array_equal(np.load(folder / "k.npy"), topk_ref(entropy64(p), 7))


def test_weights_json_summary(files, capsys):
    folder, _, labels = files
    code, out, err = run(["weights", folder / "labels.npy", "--scheme", "power", "--alpha", "0.25",
                          "--num-classes", 6, "-o", folder / "w.npy", "--json", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    w = np.load(folder / "w.npy")
    assert summary.pop("seconds") >= 0.0
    weights = summary.pop("weights")
    np.testing.assert_array_equal(np.array(weights, dtype=np.float32), w)  # the same float32 values as -o
    assert summary == {
        "command": "weights", "labels": str(folder / "labels.npy"), "num_labels": 60, "num_classes": 6,
        "scheme": "power", "alpha": 0.25,
        "class_counts": {str(c): int(m) for c, m in enumerate(np.bincount(labels, minlength=6))},
        "output": str(folder / "w.npy"), "format": "npy",
    }


# ------------------------------------------------------------------------------------------ E: progress
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_terminal_is_one_plain_line_per_stage(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.random.default_rng(1).random(20_000).astype(np.float32))
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 3, "--strategy", "entropy", "-o",
                        tmp_path / "k.txt"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    seconds = r"in \d+\.\d s"
    assert len(lines) == 3, err
    assert re.fullmatch(rf"select: read scores of 20,000 rows {seconds}", lines[0]), lines
    assert re.fullmatch(rf"select: planned \(entropy\) over 20,000 rows {seconds}", lines[1]), lines
    assert re.fullmatch(rf"select: wrote {re.escape(str(tmp_path / 'k.txt'))} with 3 rows {seconds}", lines[2])
    assert "\r" not in err and "%" not in err  # no bar drawn into a log

    labels = np.repeat([0, 1], 10_000)
    np.save(tmp_path / "l.npy", labels)
    code, _, err = run(["weights", tmp_path / "l.npy"], capsys)
    assert code == 0
    assert re.fullmatch(rf"weights: counted labels of 20,000 rows {seconds}\n", err), err


def test_progress_on_terminal_is_a_bar_in_human_units(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "s.npy", np.random.default_rng(1).random(20_000).astype(np.float32))
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    code = main(["select", str(tmp_path / "s.npy"), "--budget", "3", "--strategy", "entropy", "-o",
                 str(tmp_path / "k.npy")])
    monkeypatch.undo()
    assert code == 0
    shown = term.getvalue()
    assert "20.0k" in shown and " rows" in shown  # "20.0k/20.0k [.., 2.58M rows/s]", not "20000/20000"
    assert "20000" not in shown and "20,000" not in shown  # a bar, not the plain lines


def test_no_progress_prints_nothing_to_stderr(files, capsys):
    folder, _, _ = files
    code, _, err = run(["select", folder / "probs.npy", "--budget", 5, "--strategy", "entropy", "-o",
                        folder / "k.npy", "--no-progress"], capsys)
    assert (code, err) == (0, "")
    code, _, err = run(["weights", folder / "labels.npy", "--no-progress"], capsys)
    assert (code, err) == (0, "")


@pytest.fixture
def shards(tmp_path):
    from torch_pretrain_update.data.write import write_shards

    samples = ({"__key__": f"{i:06d}", "cls": i % 3, "npy": np.full(4, i, np.float32)} for i in range(25))
    write_shards(samples, str(tmp_path / "train-%06d.tar"), maxcount=10)
    return tmp_path


def test_inspect_progress_off_terminal_is_one_plain_line(shards, capsys):
    code, _, err = run(["inspect", shards / "train-{000000..000002}.tar"], capsys)
    assert code == 0, err
    assert re.fullmatch(r"inspect: read 3 shards \(25 samples\) in \d+\.\d s\n", err), err


# -------------------------------------------------------------------------------- F: messages that fix
@pytest.mark.parametrize(
    "argv, starts, needles",
    [
        (["select", "z.npy", "--budget", 3, "--strategy", "entropy"], None, ["Pass --from-logits"]),
        (["select", "p.npy", "--budget", 3, "--strategy", "entropy", "--exclude", "far.npy"], "--exclude",
         ["[0, 30)", "100"]),
        (["select", "p.npy", "--budget", 3, "--strategy", "random", "--exclude", "most.npy"], "--budget",
         ["--exclude", "got 3"]),
        (["select", "p.npy", "--budget", 3, "--strategy", "entropy", "--exclude", "most.npy"], "--budget",
         ["--exclude", "got 3"]),
        (["weights", "l.npy", "--scheme", "effective_number", "--beta", 1], "--beta", ["1.0"]),
        (["weights", "l.npy", "--scheme", "power", "--alpha", 2], "--alpha", ["2.0"]),
    ],
)
def test_messages_name_the_flags(tmp_path, capsys, monkeypatch, argv, starts, needles):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.dirichlet(np.ones(3), size=30).astype(np.float32))
    np.save(tmp_path / "z.npy", rng.normal(size=(30, 3)).astype(np.float32))  # logits
    np.save(tmp_path / "far.npy", np.array([100]))
    np.save(tmp_path / "most.npy", np.arange(29))
    np.save(tmp_path / "l.npy", rng.integers(0, 3, 30))
    monkeypatch.chdir(tmp_path)
    code, _, err = run([*argv, "-o", "out.npy", "--no-progress"], capsys)
    line = one_line_error(code, err, *needles)
    message = line.split(": error: ", 1)[1]
    if starts is not None:
        assert message.startswith(starts + " "), message
    library_words = re.sub(r"--[\w-]+", "", message)  # what is left once the flags are taken out
    assert not re.search(r"\b(from_logits|num_samples|k|exclude|beta|alpha)\b", library_words), message
    assert not (tmp_path / "out.npy").exists()


def test_inspect_expands_globs(shards, capsys, monkeypatch):
    monkeypatch.chdir(shards)
    code, out, err = run(["inspect", "*.tar", "--no-progress"], capsys)
    assert code == 0, err
    assert "total: 25 samples in 3 shards" in out and out.strip().endswith("OK")
    names = [line.split()[0] for line in out.splitlines() if line.startswith("train-")]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # sorted

    code, out, err = run(["inspect", str(shards / "train-00000[02].tar"), "--no-manifest", "--json",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert [os.path.basename(s["url"]) for s in json.loads(out)["shards"]] == ["train-000000.tar",
                                                                               "train-000002.tar"]

    code, _, err = run(["inspect", "valid-*.tar", "--no-progress"], capsys)
    one_line_error(code, err, "no shard file matches", "'valid-*.tar'")
