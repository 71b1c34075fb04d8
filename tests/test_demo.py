"""``pretrain-update demo``: the quick run writes its three files with the expected content, the scenario is
built as documented, and bad arguments are one-line errors.

The quick run is executed once (module fixture) through the command line's ``main``; every check below reads
its outputs. Counts are checked exactly (a one-shot selection uses exactly the budget, the multi-round ones
too, all-new uses the whole pool) and derived numbers are recomputed from the per-seed values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from torch_pretrain_update import demo
from torch_pretrain_update.cli import main

STRATEGY_KEYS = [k for k, _ in demo.STRATEGIES]
UPDATE_KEYS = [k for k, _ in demo.UPDATES]


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    import io
    import sys

    buf_out, buf_err = io.StringIO(), io.StringIO()
    mp.setattr(sys, "stdout", buf_out)
    mp.setattr(sys, "stderr", buf_err)
    try:
        code = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    finally:
        mp.undo()
    assert code == 0, buf_err.getvalue()
    results = json.loads((out / "results.json").read_text())
    return out, results, buf_out.getvalue()


def rows_of(results, update):
    return [r for r in results["rows"] if r["update"] == update]


@pytest.mark.timeout(240)
def test_writes_three_files(quick):
    out, results, stdout = quick
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
    _, results, stdout = quick
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
    _, results, _ = quick
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
    _, results, _ = quick
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
    _, results, _ = quick
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
    out, results, stdout = quick
    report = (out / "report.md").read_text()
    assert "![new vs old accuracy per strategy](results.png)" in report
    table = stdout.split("\n\nwrote")[0].strip()
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

    from torch_pretrain_update.data.shards import iter_shard_samples

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
    from torch_pretrain_update.data.shards import write_shards

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
    from torch_pretrain_update.data.shards import write_shards

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
    """Seeds run in spawned processes give exactly the numbers of the in-process run (only times differ)."""
    base = dict(seeds=2, pretrain_epochs=2, update_epochs=1, data_fraction=0.3, progress=False)
    results = []
    for workers in (1, 2):
        cfg = demo.DemoConfig.quick_config(out=str(tmp_path / f"w{workers}"), workers=workers, **base)
        results.append(demo.run_demo(cfg)["results"])
    assert [r["environment"]["processes"] for r in results] == [1, 2]
    for a, b in zip(results[0]["rows"], results[1]["rows"]):
        for metric in ("new_acc", "old_acc", "minority_recall", "samples_used", "rare_share"):
            assert a["metrics"][metric]["per_seed"] == b["metrics"][metric]["per_seed"], (a["strategy"], metric)
