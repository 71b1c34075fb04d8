"""``pretrain-update demo``: the quick run writes its three files with the expected content, says what it is
doing on stderr and that it is a smoke test, the scenario is built as documented, the figure has the
paired-difference panel, and bad arguments are one-line errors.

The quick run is executed once (module fixture) through the command line's ``main`` with stderr captured (not a
terminal); every check below reads its outputs. Counts are checked exactly (a one-shot selection uses exactly
the budget, the multi-round ones too, all-new uses the whole pool) and derived numbers are recomputed from the
per-seed values. The figure and report checks that need no training use a synthetic results dict built by the
demo's own aggregation.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._support.cli import run_cli as run
from tests._support.cli import run_cli_captured
from torch_pretrain_update import demo
from torch_pretrain_update.demo.results import aggregate

STRATEGY_KEYS = [k for k, _ in demo.STRATEGIES]
UPDATE_KEYS = [k for k, _ in demo.UPDATES]



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # seeds in this process (spawning two workers costs each an import of torch, ~8 s of CPU; the worker processes
    # have their own test below)
    code, stdout, stderr = run_cli_captured(["demo", "--quick", "--workers", "1", "--out", out])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    return out, results, stdout, stderr


def rows_of(results, update):
    return [r for r in results["rows"] if r["update"] == update]


@pytest.mark.timeout(240)
def test_writes_three_files(quick):
    out, results, stdout, _ = quick
    for name in ("report.md", "results.json", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "results.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 200
    for key in ("config", "environment", "data", "strategies", "updates", "references", "metrics", "seeds", "rows",
                "wall_s", "cpu_s"):
        assert key in results
    assert results["config"]["quick"] is True
    assert results["strategies"] == STRATEGY_KEYS and results["updates"] == UPDATE_KEYS
    assert results["data"]["samples"] == 1797 and results["data"]["num_classes"] == 10
    assert results["data"]["input_shape"] == [8, 8]
    assert len(results["data"]["shards"]) == 9  # 1797 samples, 200 per shard
    assert "wrote" in stdout and "report.md" in stdout


def test_one_row_per_strategy_and_update(quick):
    _, results, stdout, _ = quick
    for update in UPDATE_KEYS:
        keys = [r["strategy"] for r in rows_of(results, update)]
        assert sorted(keys) == sorted(STRATEGY_KEYS + ["all_new"])
    assert [r["strategy"] for r in rows_of(results, "-")] == ["pretrained"]
    table_rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table_rows) == len(results["rows"]) == 1 + len(UPDATE_KEYS) * (len(STRATEGY_KEYS) + 1)
    labels = dict(demo.STRATEGIES)
    for _, ulabel in demo.UPDATES:
        for key in STRATEGY_KEYS:
            assert sum(f"| {ulabel} | {labels[key]} |" in line for line in table_rows) == 1


def test_metrics_per_seed_and_stats(quick):
    _, results, _, _ = quick
    n_seeds = results["config"]["seeds"]
    assert n_seeds == len(results["seeds"]) == 2
    for row in results["rows"]:
        for metric in demo.METRICS:
            stat = row["metrics"][metric]
            values = stat["per_seed"]
            assert len(values) == n_seeds
            if stat["mean"] is None:  # only the old model's share of rare samples (it used none)
                assert row["strategy"] == "pretrained" and metric == "rare_share"
                continue
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["std"] == pytest.approx(np.std(values, ddof=1))
            assert stat["min"] == min(values) and stat["max"] == max(values)
        for metric in ("new_acc", "old_acc", "minority_recall"):
            assert all(0.0 <= v <= 1.0 for v in row["metrics"][metric]["per_seed"])


def test_samples_used_match_the_budget(quick):
    _, results, _, _ = quick
    budgets = [s["budget"] for s in results["seeds"]]
    pools = [s["split"]["pool"] for s in results["seeds"]]
    for s in results["seeds"]:
        assert s["budget"] == round(results["config"]["budget"] * s["split"]["pool"])
    for row in results["rows"]:
        used = row["metrics"]["samples_used"]["per_seed"]
        if row["strategy"] == "pretrained":
            assert used == [0.0] * len(budgets)
        elif row["strategy"] == "all_new":
            assert used == [float(p) for p in pools]
        elif row["strategy"] == "class_balanced":  # budget // classes of each class, no class short here
            assert used == [float(b // 10 * 10) for b in budgets]
        else:
            assert used == [float(b) for b in budgets], row["strategy"]


def test_difference_to_random_is_paired(quick):
    _, results, _, _ = quick
    for update in UPDATE_KEYS:
        rows = {r["strategy"]: r for r in rows_of(results, update)}
        base = rows["random"]["metrics"]["new_acc"]["per_seed"]
        assert rows["random"]["new_acc_minus_random"] is None
        for key in STRATEGY_KEYS[1:]:
            diff = rows[key]["new_acc_minus_random"]
            expected = [a - b for a, b in zip(rows[key]["metrics"]["new_acc"]["per_seed"], base)]
            assert diff["per_seed"] == pytest.approx(expected)
            assert diff["mean"] == pytest.approx(np.mean(expected))


def test_report_contents(quick):
    out, results, stdout, _ = quick
    report = (out / "report.md").read_text()
    assert "![new vs old accuracy per strategy, and the paired difference to random](results.png)" in report
    table = stdout.split("\n\nwrote")[0].split("\n\n")[-1].strip()  # after the smoke-test note
    assert table.startswith("| update | strategy |")
    assert table in report  # the printed table is the report's table
    assert "## What this run shows" in report
    for _, ulabel in demo.UPDATES:
        assert f"**{ulabel}**" in report
    pre = next(r for r in results["rows"] if r["strategy"] == "pretrained")["metrics"]["new_acc"]["mean"]
    assert f"{pre * 100:.1f}" in report


# ------------------------------------------------------------------------------------------ scenario parts
def test_make_split_is_a_partition_with_rare_classes():
    y = np.repeat(np.arange(10), 180)
    split = demo.make_split(y, 10, seed=3)
    parts = [split.old_train, split.old_test, split.pool, split.new_test]
    union = np.concatenate(parts)
    assert len(union) == len(y) and len(np.unique(union)) == len(y)  # disjoint and complete
    assert len(split.rare) == 5
    counts = {name: np.bincount(y[p], minlength=10) for name, p in zip(("train", "test", "pool", "new"), parts)}
    rare = np.isin(np.arange(10), split.rare)
    assert (counts["train"][rare] == int(0.04 * 180)).all() and (counts["train"][~rare] == int(0.40 * 180)).all()
    assert (counts["new"] == int(0.17 * 180)).all()
    assert counts["pool"][rare].min() > 2 * counts["pool"][~rare].max()  # the old-rare classes dominate the pool
    again = demo.make_split(y, 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.old_train, again.old_test, again.pool,
                                                             again.new_test]))
    other = demo.make_split(y, 10, seed=4)
    assert not np.array_equal(other.pool, split.pool)
    half = demo.make_split(y, 10, seed=3, fraction=0.5)
    assert sum(len(p) for p in (half.old_train, half.old_test, half.pool, half.new_test)) == len(y) // 2


def test_shift_is_a_translation_with_zero_fill():
    rng = np.random.default_rng(0)
    x = rng.random((40, 6, 5)).astype(np.float32)
    out = demo.shift_and_noise(x, seed=1, noise=0.0, max_shift=1)
    seen = set()
    for a, b in zip(x, out):
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = np.zeros_like(a)
                ref[max(dy, 0) : 6 + min(dy, 0), max(dx, 0) : 5 + min(dx, 0)] = \
                    a[max(-dy, 0) : 6 - max(dy, 0), max(-dx, 0) : 5 - max(dx, 0)]
                if np.array_equal(ref, b):
                    matches.append((dy, dx))
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 4  # shifts vary between samples
    np.testing.assert_array_equal(out, demo.shift_and_noise(x, seed=1, noise=0.0, max_shift=1))
    noisy = demo.shift_and_noise(x, seed=1, noise=0.1, max_shift=0)
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and not np.array_equal(noisy, x)
    assert abs(float(np.std(noisy - x)) - 0.1) < 0.02


def test_digits_shards_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    manifest = demo.write_digits_shards(tmp_path)
    arrays = demo.load_shard_arrays(str(tmp_path / "shards" / "digits-{000000..000008}.tar"), progress=False)
    assert arrays.manifest == manifest  # found next to the shards
    digits = load_digits()
    np.testing.assert_array_equal(arrays.y, digits.target)
    np.testing.assert_array_equal(arrays.x, (digits.images / 16.0).astype(np.float32))
    assert arrays.num_classes == 10


def test_manifest_count_mismatch_is_an_error(tmp_path):
    """A shard that is a well-formed tar but lost a whole sample: only the manifest's count reveals it."""
    import webdataset as wds

    from torch_pretrain_update.data.tar_reader import iter_shard_samples

    demo.write_digits_shards(tmp_path)
    victim = str(tmp_path / "shards" / "digits-000002.tar")
    kept = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
            for s in iter_shard_samples(victim)][:-1]
    with wds.TarWriter(victim) as sink:
        for sample in kept:
            sink.write(sample)
    with pytest.raises(ValueError, match="digits-000002.tar.*holds 199 samples but its manifest says 200"):
        demo.load_shard_arrays(str(tmp_path / "shards" / "digits-{000000..000008}.tar"), progress=False)


def test_one_shot_selection_is_the_samplers_first_epoch(tmp_path):
    from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
    from torch_pretrain_update.sampling.samplers import StratifiedSampler

    y = np.repeat(np.arange(4), 40)
    arrays = demo.Arrays(x=np.random.default_rng(0).random((160, 8)).astype(np.float32), y=y, num_classes=4,
                         source="test")
    cfg = demo.DemoConfig(out=str(tmp_path))
    scen = demo.build_scenario(arrays, 0, cfg)
    logits = torch.randn(len(scen.y_pool), 4, generator=torch.Generator().manual_seed(0))
    got = demo.select_one_shot("stratified", scen, logits, 12, 5, cfg)
    sampler = StratifiedSampler(scen.y_pool, 12, seed=5)
    assert got.tolist() == list(sampler)
    got = demo.select_one_shot("entropy_topk", scen, logits, 12, 5, cfg)
    assert sorted(got.tolist()) == EntropySampler(logits, 12, from_logits=True, shuffle=False).plan(0).tolist()
    got = demo.select_one_shot("entropy_mix", scen, logits, 12, 5, cfg)
    assert len(set(got.tolist())) == 12


# ------------------------------------------------------------------------------------------ user data
@pytest.mark.timeout(240)
def test_demo_on_user_shards(tmp_path, capsys):
    from torch_pretrain_update.data.write import write_shards

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 3

    def samples():
        for i in range(180):
            c = i % 3
            yield {"__key__": f"s{i:04d}", "label.cls": c,
                   "feat.npy": (centers[c] + rng.normal(size=16)).astype(np.float32)}

    write_shards(samples(), str(tmp_path / "mine-%03d.tar"), maxcount=60, label_key="label.cls")
    out = tmp_path / "out"
    code, stdout, err = run(["demo", "--quick", "--seeds", "1", "--data", str(tmp_path / "mine-{000..002}.tar"),
                             "--label-key", "label.cls", "--input-key", "feat.npy", "--out", out, "--no-progress"],
                            capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["samples"] == 180 and results["data"]["input_shape"] == [16]
    assert results["data"]["manifest"] is not None
    assert not (out / "shards").exists()  # the digits are not written when --data is given
    assert len(results["rows"]) == 1 + len(UPDATE_KEYS) * (len(STRATEGY_KEYS) + 1)
    assert all(not math.isnan(r["metrics"]["new_acc"]["mean"]) for r in results["rows"])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--budget", "0"], ["--budget"]),
        (["--budget", "1.5"], ["--budget"]),
        (["--seeds", "0"], ["--seeds"]),
        (["--rounds", "1"], ["rounds"]),
        (["--data", "missing-{000..001}.tar"], ["missing-000.tar", "does not exist"]),
        (["--data", "one-0.tar", "--label-key", "nope"], ["no label member 'nope'"]),
    ],
)
def test_demo_bad_arguments(tmp_path, capsys, monkeypatch, args, needles):
    from torch_pretrain_update.data.write import write_shards

    write_shards(({"__key__": f"{i}", "cls": i % 2, "npy": np.zeros(3, np.float32)} for i in range(20)),
                 str(tmp_path / "one-%d.tar"), maxcount=100)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["demo", "--quick", "--out", "o", "--no-progress", *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.timeout(240)
def test_numbers_do_not_depend_on_worker_processes(tmp_path):
    """Seeds run in spawned processes give exactly the numbers of the in-process run (only times differ).

    The shards are written and read once, and no report is drawn: the seeds' runs are what the processes change.
    """
    from torch_pretrain_update.demo import runner

    base = dict(seeds=2, pretrain_epochs=1, update_epochs=1, data_fraction=0.2, progress=False)
    arrays = runner._load(demo.DemoConfig.quick_config(out=str(tmp_path), **base), tmp_path, demo.Progress(False))
    results = []
    for workers in (1, 2):
        cfg = demo.DemoConfig.quick_config(out=str(tmp_path), workers=workers, **base)
        per_seed = runner._run_seeds(arrays, cfg, demo.Progress(False))
        results.append(aggregate(per_seed, arrays, cfg, processes=runner.num_workers(cfg)))
    assert [r["environment"]["processes"] for r in results] == [1, 2]
    for a, b in zip(results[0]["rows"], results[1]["rows"]):
        for metric in ("new_acc", "old_acc", "minority_recall", "samples_used", "rare_share"):
            assert a["metrics"][metric]["per_seed"] == b["metrics"][metric]["per_seed"], (a["strategy"], metric)


# ------------------------------------------------------------------------------------------ progress (stderr)
class _Clock:
    """A fake ``time.perf_counter``: each call returns the next value."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self):
        return self.values.pop(0)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_plain_line_per_stage_when_not_a_terminal():
    stream = io.StringIO()
    progress = demo.Progress(stream=stream, clock=_Clock(10.0, 10.0, 12.25, 75.0))
    assert progress.mode == "lines" and not progress.bars
    progress.stage("writing shards")
    progress.start_bars({"update": (54, "run")})  # no bars without a terminal
    progress.event("update", 0)
    progress.event("stage", 3, "pretraining the old model")
    progress.event("pretrain", 3)
    progress.stage("writing report.md")
    progress.close()
    assert stream.getvalue() == (
        "demo: writing shards [0.0 s]\n"
        "demo: seed 3: pretraining the old model [2.2 s]\n"
        "demo: writing report.md [65.0 s]\n"
    )


def test_progress_off_writes_nothing_and_terminal_gets_status_line_and_bars():
    quiet = io.StringIO()
    off = demo.Progress(False, stream=quiet)
    off.stage("writing shards")
    off.start_bars({"update": (3, "run")})
    off.event("update", 0)
    off.close()
    assert off.mode == "off" and quiet.getvalue() == ""

    tty = _Terminal()
    bars = demo.Progress(stream=tty)
    assert bars.mode == "bars" and bars.bars
    bars.stage("starting 2 worker processes")
    bars.start_bars({"pretrain": (4, "epoch"), "update": (3, "run")})
    bars.event("update", 0)
    bars.event("update", 1)
    bars.event("stage", 1, "pretraining the old model")
    text = tty.getvalue()
    bars.close()
    assert "demo: starting 2 worker processes [00:00]" in text
    assert "demo: seed 1: pretraining the old model [00:00]" in text
    assert "| 0/4 [" in text and "| 0/3 [" in text and "\r" in text  # bars below it, redrawn in place


def test_quick_run_says_what_it_does_on_stderr(quick):
    """The quick run's stderr (captured: not a terminal) has one line per stage, in order, with elapsed times."""
    _, results, _, stderr = quick
    lines = stderr.splitlines()
    assert lines, "the run wrote nothing to stderr"
    assert "\r" not in stderr  # no bars redrawn in place: not a terminal
    times = []
    for line in lines:
        match = re.fullmatch(r"demo: (.+) \[(\d+\.\d) s\]", line)
        assert match, line
        times.append(float(match.group(2)))
    assert times == sorted(times)
    processes = results["environment"]["processes"]
    assert lines[0].startswith("demo: writing scikit-learn's digits to WebDataset shards in ")
    assert lines[1].startswith("demo: reading the 9 shards back ")
    assert lines[2].startswith(f"demo: 2 seeds x 27 runs (8 strategies and all new data, x 3 update methods) = 54 "
                               f"runs, in {processes} process{'es' if processes > 1 else ''} with 1 torch thread ")
    assert lines[-1].startswith("demo: all seeds done; writing report.md, results.json and results.png to ")
    for seed in (0, 1):
        mine = [line.split(": ", 2)[2] for line in lines if line.startswith(f"demo: seed {seed}: ")]
        assert [m.split(" ")[0] for m in mine] == ["pretraining", "pretrained", "multi-round", "all", "done"], mine
        epochs = demo.DemoConfig.quick_config().pretrain_epochs
        assert mine[0].startswith(f"pretraining the old model ({epochs} epochs on ")
        assert re.match(r"pretrained in \d+\.\d s; one-shot strategies: 6 x 3 update runs on \d+ of \d+ new", mine[1])
        assert mine[2].startswith("multi-round strategies: 2 x 3 update runs, 2 rounds")
        assert mine[4].startswith("done (27 runs in ")


# ------------------------------------------------------------------------------------------ figure and report
OFFSETS = {"random": 0.0, "stratified": 0.04, "entropy_topk": -0.03, "entropy_proportional": -0.01,
           "class_balanced": 0.02, "entropy_mix": 0.01, "rounds_topk": -0.02, "rounds_mix": 0.001, "all_new": 0.3}


def synthetic_results(quick, n_seeds=3):
    """A results dict built by the demo's own aggregation from made-up per-seed accuracies (no training)."""
    rng = np.random.default_rng(0)
    cfg = demo.DemoConfig(quick=quick, seeds=n_seeds)
    arrays = demo.Arrays(x=np.zeros((20, 8, 8), np.float32), y=np.arange(20) % 10, num_classes=10, source="made up")
    per_seed = []
    for seed in range(n_seeds):
        runs = {("pretrained", "-"): {"new_acc": 0.4, "old_acc": 0.95, "minority_recall": 0.3, "samples_used": 0.0,
                                      "rare_share": float("nan"), "time_s": 0.0}}
        for u, method in enumerate(UPDATE_KEYS):
            for strategy in STRATEGY_KEYS + ["all_new"]:
                runs[(strategy, method)] = {
                    "new_acc": 0.5 + OFFSETS[strategy] + 0.01 * u + float(rng.normal(0, 0.01)),
                    "old_acc": 0.85 + 0.04 * u + float(rng.normal(0, 0.01)), "minority_recall": 0.6,
                    "samples_used": 50.0, "rare_share": 0.7, "time_s": 0.1}
        per_seed.append({"seed": seed, "budget": 50, "rare_classes": [0, 1, 2, 3, 4], "pool_rare_share": 0.8,
                         "split": {"old_train": 100, "old_test": 40, "pool": 500, "new_test": 60},
                         "pretrain_s": 1.0, "runs": runs})
    results = demo.aggregate(per_seed, arrays, cfg, processes=1)
    results.update(wall_s=1.0, cpu_s=1.0, date="2025-01-01 00:00")
    return results, per_seed


def test_figure_has_the_paired_difference_panel():
    results, per_seed = synthetic_results(quick=False)
    fig = demo.results_figure(results)
    panels = [ax for ax in fig.axes if ax.get_label() == demo.DIFFERENCE_PANEL]
    assert len(panels) == 1
    ax = panels[0]
    # sorted by the mean difference over the update methods, best on top (matplotlib lists ticks bottom-up)
    labels = dict(demo.STRATEGIES)
    expected = ["entropy_topk", "rounds_topk", "entropy_proportional", "rounds_mix", "entropy_mix", "class_balanced",
                "stratified"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [labels[s] for s in expected]
    assert "minus random" in ax.get_xlabel() and "mean ± std over 3 seeds" in ax.get_xlabel()
    texts = {t.get_text(): t for t in ax.texts}
    assert texts["better than random →"].xy == (0.0, 1.0)  # at the zero line, on its right
    assert "← worse than random" in texts
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.lines)  # the zero line
    lo, hi = ax.get_xlim()
    assert lo == -hi
    containers = {c.get_label(): c for c in ax.containers}
    assert len(containers) == len(expected) * len(UPDATE_KEYS)
    for strategy in expected:
        for method in UPDATE_KEYS:
            diffs = [r["runs"][(strategy, method)]["new_acc"] - r["runs"][("random", method)]["new_acc"]
                     for r in per_seed]
            mean, std = np.mean(diffs) * 100, np.std(diffs, ddof=1) * 100
            data_line, _, (bars,) = containers[f"{strategy}|{method}"].lines
            assert data_line.get_xdata()[0] == pytest.approx(mean)
            (x0, y0), (x1, y1) = bars.get_segments()[0]
            assert (x0, x1) == (pytest.approx(mean - std), pytest.approx(mean + std)) and y0 == y1
            assert lo < x0 and x1 < hi
    scatter = [a for a in fig.axes if a.get_title() in dict(demo.UPDATES).values()]
    assert [a.get_title() for a in scatter] == [label for _, label in demo.UPDATES]
    assert all("better ↗" in [t.get_text() for t in a.texts] for a in scatter)


def test_quick_report_and_summary_start_with_the_smoke_test_note():
    results, _ = synthetic_results(quick=True)
    table = demo.format_table(results)
    lines = demo.format_report(results, table).splitlines()
    assert lines[0].endswith("(--quick: smoke test)")
    assert lines[2].startswith("> **Quick run: a smoke test, not evidence.** `--quick` uses 2 seeds")
    summary = demo.console_summary(results, table)
    assert summary.splitlines()[0].startswith("QUICK RUN: A SMOKE TEST, NOT EVIDENCE. --quick uses 2 seeds")
    assert summary.endswith("\n\n" + table)
    fig = demo.results_figure(results)
    assert "--quick: a smoke test, not evidence" in fig.get_suptitle()

    full, _ = synthetic_results(quick=False)
    full_table = demo.format_table(full)
    assert "smoke test" not in demo.format_report(full, full_table).lower()
    assert demo.console_summary(full, full_table) == full_table
    assert "smoke test" not in demo.results_figure(full).get_suptitle()


def test_quick_run_output_says_smoke_test_first(quick):
    out, _, stdout, _ = quick
    assert stdout.startswith("QUICK RUN: A SMOKE TEST, NOT EVIDENCE.")
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("> **Quick run: a smoke test, not evidence.**")


# ------------------------------------------------------------------------------------------ layering
def test_demo_uses_only_public_library_names():
    """The demo is an application: it imports the library's top-level names (plus the two private top-level
    helpers and the manifest finder), never an underscore name or another subpackage's module."""
    import torch_pretrain_update

    allowed = {"torch_pretrain_update", "torch_pretrain_update._checks", "torch_pretrain_update._rng",
               "torch_pretrain_update.data.manifest_find"}
    folder = Path(demo.__file__).parent
    seen = set()
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch_pretrain_update"):
                seen.add(node.module)
                if node.module.startswith("torch_pretrain_update.demo"):
                    continue
                assert node.module in allowed, (path.name, node.module)
                for alias in node.names:
                    if node.module == "torch_pretrain_update":
                        assert alias.name in torch_pretrain_update.__all__, (path.name, alias.name)
                    elif node.module == "torch_pretrain_update.data.manifest_find":
                        assert not alias.name.startswith("_"), (path.name, alias.name)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("torch_pretrain_update") for a in node.names), path.name
    assert "torch_pretrain_update" in seen
    for path in sorted(folder.glob("*.py")):
        assert len(path.read_text().splitlines()) <= 500, path.name


def test_find_manifest_next_to_the_shards(tmp_path):
    from torch_pretrain_update.data.manifest_find import find_manifest
    from torch_pretrain_update.data.write import write_shards

    manifest = write_shards(({"__key__": f"{i}", "cls": i % 2} for i in range(6)), str(tmp_path / "tr-%04d.tar"),
                            maxcount=4)
    assert find_manifest([str(tmp_path / "tr-0001.tar"), str(tmp_path / "tr-0000.tar")]) == manifest
    assert find_manifest([str(tmp_path / "other-0000.tar")]) is None
    assert find_manifest(["https://host/tr-0000.tar"]) is None and find_manifest(["pipe:cat x"]) is None
    assert find_manifest([]) is None
