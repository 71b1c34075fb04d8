"""The ``pretrain-update`` command line: select, weights, inspect, help and errors.

Most calls run ``cli.main`` in-process (fast); a few run ``python -m torch_pretrain_update`` as a subprocess to
check what a user sees: exit status 2 and one line on stderr, no traceback. Expected values are recomputed
independently in float64 numpy.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._support.cli import run_cli as run
from tests._support.references import entropy64, topk_ref
from torch_pretrain_update.sampling.entropy_plan import entropy_plan

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("demo", "select", "weights", "inspect")


def assert_usage_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def probs_file(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.5, size=400).astype(np.float32)
    path = tmp_path / "probs.npy"
    np.save(path, p)
    return path, p


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_examples(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert "examples:" in out
    example = "pretrain-update " + (command or "select")
    assert example in out


def test_no_command_is_usage_error(capsys):
    code, _, err = run([], capsys)
    assert code == 2
    assert "usage:" in err


def test_unknown_command_one_line(capsys):
    code, _, err = run(["frobnicate"], capsys)
    assert_usage_error(code, err, "frobnicate")


# --------------------------------------------------------------------------------------------- weights
def effective_number_ref(counts, beta):
    n = np.asarray(counts, dtype=np.float64)
    raw = np.where(n > 0, (1 - beta) / (1 - beta ** np.maximum(n, 1)), 0.0)
    return raw * n.sum() / (n * raw).sum()


def parse_weight_table(out):
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            rows[int(parts[0])] = (int(parts[1]), float(parts[2]))
    return rows


@pytest.mark.parametrize("chunk", [None, 7])
def test_weights_effective_number(tmp_path, capsys, chunk):
    counts = [50, 5, 20, 0, 1]
    labels = np.repeat(np.arange(5), counts).astype(np.int32)
    np.random.default_rng(1).shuffle(labels)
    np.save(tmp_path / "labels.npy", labels)
    out_path = tmp_path / "w.npy"
    argv = ["weights", tmp_path / "labels.npy", "--scheme", "effective_number", "--beta", "0.9", "-o", out_path,
            "--num-classes", "5", "--no-progress"]
    if chunk:
        argv += ["--chunk-rows", chunk]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    expected = effective_number_ref(counts, 0.9)
    rows = parse_weight_table(out)
    assert [rows[c][0] for c in range(5)] == counts
    np.testing.assert_allclose([rows[c][1] for c in range(5)], expected, rtol=1e-5)
    written = np.load(out_path)
    assert written.dtype == np.float32 and written.shape == (5,)
    np.testing.assert_allclose(written, expected, rtol=1e-6)
    assert written[3] == 0.0  # an empty class gets weight 0


def test_weights_inverse_default_classes(tmp_path, capsys):
    labels = np.array([0, 0, 0, 2], dtype=np.int64)
    np.save(tmp_path / "l.npy", labels)
    code, out, _ = run(["weights", tmp_path / "l.npy", "--no-progress"], capsys)
    assert code == 0
    rows = parse_weight_table(out)
    # inverse: w_c ∝ 1/n_c, normalised so that sum_c n_c w_c = N = 4: w = [4/6, 0, 2]
    assert rows[0] == (3, pytest.approx(4 / 6, rel=1e-5))
    assert rows[1] == (0, 0.0)
    assert rows[2] == (1, pytest.approx(2.0, rel=1e-5))


def _bad_npy_files(tmp_path):
    np.save(tmp_path / "two_d.npy", np.zeros((3, 2), dtype=np.int64))
    np.save(tmp_path / "floats.npy", np.zeros(3, dtype=np.float32))
    np.save(tmp_path / "neg.npy", np.array([0, 1, -3, 2]))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("not a numpy file\n")
    with open(tmp_path / "pickle.npy", "wb") as f:
        pickle.dump([1, 2, 3], f)
    np.save(tmp_path / "ok.npy", np.array([0, 1, 1, 2]))


@pytest.mark.parametrize(
    "args, needles",
    [
        (["missing.npy"], ["does not exist"]),
        (["two_d.npy"], ["1-D"]),
        (["floats.npy"], ["integers"]),
        (["neg.npy"], [">= 0", "row 2"]),
        (["objects.npy"], ["objects.npy"]),
        (["text.npy"], ["cannot read"]),
        (["pickle.npy"], ["cannot read"]),
        (["ok.npy", "--num-classes", "2"], ["< --num-classes 2", "row 3"]),
        (["ok.npy", "--scheme", "nope"], ["--scheme"]),
        (["ok.npy", "--scheme", "effective_number", "--beta", "1.0"], ["beta"]),
        (["ok.npy", "--beta", "x"], ["--beta"]),
        (["ok.npy", "-o", "no/such/dir/w.npy"], ["does not exist"]),
    ],
)
def test_weights_bad_inputs(tmp_path, capsys, monkeypatch, args, needles):
    _bad_npy_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["weights", *args, "--no-progress"], capsys)
    assert_usage_error(code, err, *needles)


# ---------------------------------------------------------------------------------------------- select
@pytest.mark.parametrize("chunk", [None, 13])
def test_select_entropy_topk_matches_reference(probs_file, tmp_path, capsys, chunk):
    path, p = probs_file
    out = tmp_path / "keep.npy"
    argv = ["select", path, "--budget", 37, "--strategy", "entropy", "-o", out, "--no-progress"]
    if chunk:
        argv += ["--chunk-rows", chunk]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    got = np.load(out)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, topk_ref(entropy64(p), 37))
    assert "selected 37 of 400 rows" in stdout


@pytest.mark.parametrize("strategy", ["margin", "least_confidence", "entropy"])
def test_select_from_logits(tmp_path, capsys, strategy):
    z = np.random.default_rng(2).normal(size=(300, 7)).astype(np.float32) * 3
    np.save(tmp_path / "z.npy", z)
    code, _, err = run(["select", tmp_path / "z.npy", "--from-logits", "--budget", "0.1", "--strategy", strategy,
                        "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    p = softmax64(z)
    top2 = np.sort(p, axis=1)[:, -2:]
    ref = {"margin": 1 - (top2[:, 1] - top2[:, 0]), "least_confidence": 1 - top2[:, 1], "entropy": entropy64(p)}
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), topk_ref(ref[strategy], 30))  # 0.1 * 300


def test_select_scores_ties_go_to_lower_rows(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.array([1.0, 3.0, 3.0, 3.0, 2.0, 3.0], dtype=np.float32))
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 2, "--strategy", "entropy", "-o",
                        tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "k.npy").tolist() == [1, 2]


def test_select_proportional(tmp_path, capsys):
    rng = np.random.default_rng(3)
    s = rng.random(500).astype(np.float64)
    s[::5] = 0.0  # never drawn
    np.save(tmp_path / "s.npy", s)

    def draw(seed):
        out = tmp_path / f"k{seed}.npy"
        code, _, err = run(["select", tmp_path / "s.npy", "--budget", 120, "--strategy", "entropy", "--mode",
                            "proportional", "--seed", seed, "-o", out, "--no-progress"], capsys)
        assert code == 0, err
        return np.load(out)

    a, b, c = draw(4), draw(4), draw(5)
    assert len(a) == 120 and len(np.unique(a)) == 120 and np.all(np.diff(a) > 0)
    assert not np.any(a % 5 == 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the command is the library's plan, epoch 0, seed as given
    ref = entropy_plan(torch.from_numpy(s), 120, seed=4, epoch=0, mode="proportional", shuffle=False)
    np.testing.assert_array_equal(a, ref.numpy())


def test_select_random_with_exclude(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.zeros(50, dtype=np.float32))
    np.save(tmp_path / "done.npy", np.arange(0, 50, 2))
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 25, "--strategy", "random", "--exclude",
                        tmp_path / "done.npy", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "k.npy").tolist() == list(range(1, 50, 2))  # all that is left
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 26, "--strategy", "random", "--exclude",
                        tmp_path / "done.npy", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert_usage_error(code, err, "26")


def test_select_stratified_quotas(tmp_path, capsys):
    labels = np.repeat([0, 1, 2], [3, 3, 3])
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "s.npy", np.zeros(9, dtype=np.float32))
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 4, "--strategy", "stratified", "--labels",
                        tmp_path / "l.npy", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "k.npy")
    # floors 1, 1, 1; the one left goes to the lowest class index (equal remainders)
    assert np.bincount(labels[got], minlength=3).tolist() == [2, 1, 1]
    assert len(np.unique(got)) == 4

    labels = np.repeat([0, 1, 2, 3], [500, 300, 150, 50])
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "s.npy", np.zeros(1000, dtype=np.float32))
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 0.1, "--strategy", "stratified", "--labels",
                        tmp_path / "l.npy", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    assert np.bincount(labels[np.load(tmp_path / "k.npy")]).tolist() == [50, 30, 15, 5]


def test_select_balanced(tmp_path, capsys):
    labels = np.repeat([0, 1, 2], [40, 3, 10])
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "s.npy", np.zeros(len(labels), dtype=np.float32))
    code, out, err = run(["select", tmp_path / "s.npy", "--budget", 20, "--strategy", "balanced", "--labels",
                          tmp_path / "l.npy", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "k.npy")
    assert np.bincount(labels[got]).tolist() == [6, 6, 6]  # 20 // 3 per class
    small = got[labels[got] == 1]
    assert np.bincount(small, minlength=43)[40:].tolist() == [2, 2, 2]  # 3 samples, 6 copies: each twice
    assert "6 per class x 3 classes" in out


def test_select_random_fraction_and_stratify(tmp_path, capsys):
    rng = np.random.default_rng(6)
    s = rng.permutation(200).astype(np.float32)  # distinct scores
    labels = rng.integers(0, 4, 200)
    np.save(tmp_path / "s.npy", s)
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "ex.npy", np.argsort(-s)[:3])  # the three best are excluded
    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 20, "--strategy", "entropy", "--random-fraction",
                        0.5, "--exclude", tmp_path / "ex.npy", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "k.npy")
    assert len(np.unique(got)) == 20 and not np.isin(np.argsort(-s)[:3], got).any()
    assert np.isin(np.argsort(-s)[3:13], got).all()  # the score half: top 10 of what is left

    code, _, err = run(["select", tmp_path / "s.npy", "--budget", 20, "--strategy", "entropy", "--labels",
                        tmp_path / "l.npy", "--stratify", "-o", tmp_path / "k.npy", "--no-progress"], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "k.npy")
    counts = np.bincount(labels, minlength=4)
    floors = counts * 20 // 200
    rem = counts * 20 % 200
    quotas = floors.copy()
    quotas[np.argsort(-rem, kind="stable")[: 20 - floors.sum()]] += 1
    expected = np.sort(np.concatenate([
        np.flatnonzero(labels == c)[topk_ref(s[labels == c], quotas[c])] for c in range(4) if quotas[c]
    ]))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["missing.npy", "--budget", "3", "--strategy", "entropy"], ["does not exist"]),
        (["p.npy", "--budget", "401", "--strategy", "entropy"], ["401", "400"]),
        (["p.npy", "--budget", "0", "--strategy", "entropy"], ["--budget"]),
        (["p.npy", "--budget", "1.5", "--strategy", "entropy"], ["--budget"]),
        (["p.npy", "--budget", "lots", "--strategy", "entropy"], ["--budget"]),
        (["p.npy", "--budget", "3", "--strategy", "best"], ["--strategy"]),
        (["p.npy", "--budget", "3"], ["--strategy"]),
        (["p.npy", "--budget", "3", "--strategy", "stratified"], ["--labels"]),
        (["p.npy", "--budget", "3", "--strategy", "stratified", "--labels", "short.npy"], ["rows"]),
        (["p.npy", "--budget", "3", "--strategy", "entropy", "--stratify"], ["--stratify"]),
        (["p.npy", "--budget", "3", "--strategy", "random", "--mode", "proportional"], ["--mode"]),
        (["nan.npy", "--budget", "3", "--strategy", "entropy"], ["row 7"]),
        (["unnormalised.npy", "--budget", "3", "--strategy", "entropy"], ["sum to 1", "row 2"]),
        (["s1d.npy", "--budget", "3", "--strategy", "entropy", "--from-logits"], ["--from-logits"]),
        (["s1d_nan.npy", "--budget", "3", "--strategy", "entropy"], ["finite", "row 4"]),
        (["cube.npy", "--budget", "3", "--strategy", "entropy"], ["shape"]),
        (["text.npy", "--budget", "3", "--strategy", "entropy"], ["cannot read"]),
        (["p.npy", "--budget", "3", "--strategy", "entropy", "--exclude", "p.npy"], ["--exclude"]),
    ],
)
def test_select_bad_inputs(tmp_path, capsys, monkeypatch, args, needles):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=400).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    bad = p.copy()
    bad[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    bad = p.copy()
    bad[2] *= 2
    np.save(tmp_path / "unnormalised.npy", bad)
    np.save(tmp_path / "s1d.npy", rng.random(10).astype(np.float32))
    s = rng.random(10)
    s[4] = np.inf
    np.save(tmp_path / "s1d_nan.npy", s)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), dtype=np.float32))
    np.save(tmp_path / "short.npy", np.zeros(5, dtype=np.int64))
    (tmp_path / "text.npy").write_text("hello")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["select", *args, "-o", "out.npy", "--chunk-rows", "5", "--no-progress"], capsys)
    assert_usage_error(code, err, *needles)
    assert not (tmp_path / "out.npy").exists()


# --------------------------------------------------------------------------------------------- inspect
@pytest.fixture
def shards(tmp_path):
    from torch_pretrain_update.data.write import write_shards

    samples = ({"__key__": f"{i:06d}", "cls": i % 3, "npy": np.full(4, i, np.float32)} for i in range(25))
    manifest = write_shards(samples, str(tmp_path / "train-%06d.tar"), maxcount=10)
    return tmp_path, manifest


def test_inspect_healthy(shards, capsys):
    folder, manifest = shards
    pattern = str(folder / "train-{000000..000002}.tar")
    code, out, err = run(["inspect", pattern, "--no-progress"], capsys)
    assert code == 0, err
    assert f"manifest: {manifest}" in out
    assert "total: 25 samples in 3 shards" in out
    assert out.strip().endswith("OK")

    code, out, _ = run(["inspect", pattern, "--json", "--no-progress"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["num_samples"] == 25
    assert [s["count"] for s in report["shards"]] == [10, 10, 5]
    assert report["class_counts"] == {"0": 9, "1": 8, "2": 8}


def test_inspect_finds_damage(shards, capsys):
    folder, _ = shards
    victim = folder / "train-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated mid-shard
    code, out, _ = run(["inspect", str(folder / "train-{000000..000002}.tar"), "--no-progress"], capsys)
    assert code == 1
    assert "DAMAGED" in out
    line = next(x for x in out.splitlines() if x.startswith("train-000001.tar"))
    assert "ok" not in line.split()[-1:]


def test_inspect_without_manifest(shards, capsys):
    folder, _ = shards
    code, out, _ = run(["inspect", str(folder / "train-000000.tar"), "--no-manifest", "--no-progress"], capsys)
    assert code == 0
    assert "manifest: none" in out and "total: 10 samples in 1 shards" in out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["nothing-{000..003}.tar"], ["no such shard file", "nothing-000.tar"]),
        (["train-000000.tar", "--manifest", "gone.json"], ["gone.json"]),
        (["train-000000.tar", "--num-classes", "0"], ["--num-classes"]),
    ],
)
def test_inspect_bad_arguments(shards, capsys, monkeypatch, args, needles):
    folder, _ = shards
    monkeypatch.chdir(folder)
    code, _, err = run(["inspect", *args, "--no-progress"], capsys)
    assert_usage_error(code, err, *needles)


# ------------------------------------------------------------------------------------------ subprocess
def _python_m(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch_pretrain_update", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(240)
def test_python_m_errors_are_one_line(tmp_path, capsys):
    res = _python_m("select", "missing.npy", "--budget", "3", "--strategy", "entropy", "-o", "k.npy", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "pretrain-update select: error: input file 'missing.npy' does not exist"
    assert res.stdout == ""
    # an argparse error (missing argument) through the same main(), here: the subprocess above covers python -m
    code, out, err = run(["weights", "--scheme", "inverse"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_entry_point():
    """The console script ``pretrain-update`` (pyproject ``[project.scripts]``) runs ``cli.main``: checked on
    the installed distribution's metadata, and by running the script when it is installed in this env."""
    from importlib import metadata

    try:
        eps = metadata.entry_points(group="console_scripts")
    except TypeError:  # Python 3.9
        eps = metadata.entry_points().get("console_scripts", [])
    mine = [ep for ep in eps if ep.name == "pretrain-update"]
    if not mine:
        pytest.skip("the package is not installed in this environment (make test installs it)")
    assert mine[0].value == "torch_pretrain_update.cli:main"
    script = Path(sys.executable).parent / "pretrain-update"
    res = subprocess.run([str(script), "weights", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "effective_number" in res.stdout
