"""``pretrain-update demo lm``: the quick run writes its three files with finite numbers, every strategy selects
exactly the budget through its sampler, the de-duplicated strategy never selects a planted copy, the selection is a
pure function of the seed, the partial update leaves the lower part untouched, and ``demo`` alone still runs the
digits demo.

The quick run is executed once (module fixture) through the command line's ``main`` with stdout and stderr
captured (not a terminal: plain progress lines); the other checks use tiny inputs: a fake standard library
directory of a few real source files (no other text in it) and an untrained model.
"""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._support.cli import run_cli_captured
from torch_pretrain_update.cli import build_parser, demo, demo_lm, main
from torch_pretrain_update.demo.lm import (
    LM_METRICS,
    LM_SMOKE_TEST_NOTE,
    LM_STRATEGIES,
    LM_UPDATES,
    OLD_DIFFERENCE_PANEL,
    ByteLM,
    LMConfig,
    budget_count,
    build_corpus,
    encode,
    find_sources,
    lm_results_figure,
    lower_part,
    score_pool,
    select,
    train_lm,
)
from torch_pretrain_update.demo.lm.data import texts
from torch_pretrain_update.demo.plot import DIFFERENCE_PANEL

STRATEGIES = [k for k, _ in LM_STRATEGIES]
UPDATES = [k for k, _ in LM_UPDATES]
# small modules present in every CPython 3.9+ standard library
_FILES = ("abc.py", "bisect.py", "colorsys.py", "copyreg.py", "fnmatch.py", "genericpath.py", "keyword.py",
          "opcode.py", "stat.py", "this.py", "token.py", "types.py")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_lm")
    code, stdout, stderr = run_cli_captured(["demo", "lm", "--quick", "--out", out])
    assert code == 0, stderr
    return out, json.loads((out / "results.json").read_text()), stdout, stderr


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in _FILES:
        shutil.copy(stdlib / name, root / name)
    (root / "site-packages").mkdir()
    shutil.copy(stdlib / "abc.py", root / "site-packages" / "skipped.py")
    return find_sources(str(root))


def _tiny_cfg(**kw):
    return LMConfig.quick_config(old_train=24, test=8, target=8, pool_code=40, pool_prose=40, pool_other=20,
                                 clusters=3, **kw)


def _tiny_scores(sources, seed, cfg):
    corpus = build_corpus(sources, seed, cfg)
    torch.manual_seed(0)
    model = ByteLM(cfg.seq_len, cfg.d_model, cfg.layers, cfg.heads)
    pool = encode(corpus.pool, cfg.seq_len)
    return corpus, score_pool(model, pool, texts(corpus.pool), texts(corpus.target), seed, cfg)


@pytest.mark.timeout(300)
def test_quick_run_writes_its_files(quick):
    out, results, stdout, stderr = quick
    for name in ("report.md", "results.json", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report.splitlines()[0].endswith("(--quick: smoke test)")
    assert LM_SMOKE_TEST_NOTE in report
    assert stdout.startswith("QUICK RUN: A SMOKE TEST, NOT EVIDENCE.")
    assert "wrote" in stdout and "report.md" in stdout
    lines = stderr.splitlines()  # not a terminal: one plain line per stage, no bars
    assert lines and all(line.startswith("demo: ") for line in lines)
    assert sum("pretraining the old model" in line for line in lines) == 2
    assert sum(line.endswith("s]") and "done (18 runs" in line for line in lines) == 2
    assert results["config"]["quick"] is True and len(results["seeds"]) == 2
    assert results["strategies"] == STRATEGIES and results["updates"] == UPDATES


def test_quick_run_numbers_are_finite(quick):
    _, results, stdout, _ = quick
    keys = {(r["strategy"], r["update"]) for r in results["rows"]}
    assert keys == {("pretrained", "-")} | {(s, u) for s in STRATEGIES for u in UPDATES}
    assert len([line for line in stdout.splitlines() if line.startswith("| ")]) == 1 + len(keys)  # + header
    for row in results["rows"]:
        for metric in ("new_bpb", "old_bpb"):
            stat = row["metrics"][metric]
            assert len(stat["per_seed"]) == 2
            assert all(0.0 < v < 8.0 for v in stat["per_seed"])  # bytes: at most 8 bits if better than uniform
            assert stat["mean"] == pytest.approx(np.mean(stat["per_seed"]))
            assert stat["std"] == pytest.approx(np.std(stat["per_seed"], ddof=1))
            diff = row[f"{metric}_minus_random"]
            if row["strategy"] in ("pretrained", "random"):
                assert diff is None
                continue
            rnd = next(r for r in results["rows"] if r["strategy"] == "random" and r["update"] == row["update"])
            expect = [a - b for a, b in zip(stat["per_seed"], rnd["metrics"][metric]["per_seed"])]
            assert diff["per_seed"] == pytest.approx(expect)
        if row["kind"] == "strategy":
            assert all(math.isfinite(row["metrics"][m]["mean"]) for m in LM_METRICS)


def test_every_selection_is_the_budget(quick):
    _, results, _, _ = quick
    for seed in results["seeds"]:
        z = seed["sizes"]
        assert z["pool"] == z["pool_code"] + z["pool_prose"] + z["pool_other"] + z["planted_exact"] + z[
            "planted_near"]
        assert seed["budget"] == round(0.1 * z["pool"])
    budgets = [float(s["budget"]) for s in results["seeds"]]
    for row in results["rows"]:
        if row["kind"] == "reference":
            continue
        m = row["metrics"]
        assert m["selected"]["per_seed"] == budgets, row["strategy"]
        shares = np.add(np.add(m["code_share"]["per_seed"], m["prose_share"]["per_seed"]), m["other_share"]["per_seed"])
        assert shares == pytest.approx([1.0, 1.0])
        if row["strategy"] == "cluster":  # class-balanced over clusters repeats the chunks of a small cluster
            assert all(1 <= d <= b for d, b in zip(m["distinct"]["per_seed"], budgets))
        else:  # without replacement
            assert m["distinct"]["per_seed"] == budgets, row["strategy"]


def test_dedup_strategy_selects_no_planted_copy(quick):
    _, results, _, _ = quick
    for seed in results["seeds"]:
        dup = seed["duplicates"]
        assert dup["planted"] == seed["sizes"]["planted_exact"] + seed["sizes"]["planted_near"] > 0
        assert dup["planted_dropped"] == dup["planted"]  # every planted copy is found ...
    for update in UPDATES:
        row = next(r for r in results["rows"] if r["strategy"] == "dedup_target" and r["update"] == update)
        assert row["metrics"]["planted"]["per_seed"] == [0.0, 0.0]  # ... so none is selected


def test_selection_is_a_pure_function_of_the_seed(tiny_sources):
    cfg = _tiny_cfg()
    assert tiny_sources.text_files == [] and "site-packages/skipped.py" not in tiny_sources.code_files
    corpus, scores = _tiny_scores(tiny_sources, 3, cfg)
    again, scores2 = _tiny_scores(tiny_sources, 3, cfg)
    assert corpus.pool == again.pool and corpus.sizes()["pool_other"] == 0  # no other text: none in the pool
    for name in ("nll", "log_ratio", "drop", "clusters"):
        assert torch.equal(getattr(scores, name), getattr(scores2, name)), name
    budget = budget_count(cfg, len(corpus.pool))
    picks = {}
    for strategy in STRATEGIES:
        picks[strategy] = select(strategy, scores, budget, 3, cfg)
        assert picks[strategy].numel() == budget
        assert torch.equal(picks[strategy], select(strategy, scores2, budget, 3, cfg)), strategy
    assert not scores.drop[picks["dedup_target"]].any()
    top = torch.argsort(scores.nll, descending=True, stable=True)[:budget]
    assert sorted(picks["ppl_topk"].tolist()) == sorted(top.tolist())
    other_seed = build_corpus(tiny_sources, 4, cfg)
    assert other_seed.pool != corpus.pool
    assert not torch.equal(select("random", scores, budget, 4, cfg), picks["random"])


def test_partial_update_trains_only_the_upper_part(tiny_sources):
    cfg = _tiny_cfg(layers=3, frozen_blocks=2)
    corpus = build_corpus(tiny_sources, 0, cfg)
    torch.manual_seed(0)
    model = ByteLM(cfg.seq_len, cfg.d_model, cfg.layers, cfg.heads)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_lm(model, encode(corpus.pool[:32], cfg.seq_len), steps=3, lr=1e-2, cfg=cfg, seed=0, stream=1,
             method="partial")
    frozen, _ = lower_part(cfg)
    assert frozen == ["tok_emb.*", "pos_emb.*", "blocks.0.*", "blocks.1.*"]
    for name, value in model.state_dict().items():
        lower = name.startswith(("tok_emb.", "pos_emb.", "blocks.0.", "blocks.1."))
        assert torch.equal(value, before[name]) == lower, name


def test_figure_has_both_difference_panels(quick):
    _, results, _, _ = quick
    fig = lm_results_figure(results)
    panels = {ax.get_label(): ax for ax in fig.axes}
    for label in (DIFFERENCE_PANEL, OLD_DIFFERENCE_PANEL):
        bars = {c.get_label() for c in panels[label].containers}
        assert bars == {f"{s}|{u}" for s in STRATEGIES if s != "random" for u in UPDATES}


def test_demo_alone_still_runs_the_digits(capsys):
    parser = build_parser()
    assert parser.parse_args(["demo", "--quick"]).func is demo.run
    args = parser.parse_args(["demo", "lm", "--quick", "--seeds", "3", "--out", "x"])
    assert args.func is demo_lm.run and args.quick and args.seeds == 3 and args.out == "x"
    try:
        code = main(["demo", "lm", "--seeds", "0"])
    except SystemExit as exc:  # argparse's own errors exit
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain-update demo lm: error:") and "--seeds" in err[0]
