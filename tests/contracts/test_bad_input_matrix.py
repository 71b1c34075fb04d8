"""The bad-input matrix: one parametrised test across the whole public surface.

Every case is a small callable fed one bad input (NaN/inf/negative/unnormalised probabilities, wrong dimensions,
empty inputs, labels out of range or of float dtype, budgets larger than N without replacement, zero/negative/NaN
weights, mismatched lengths, unknown option strings, temperature <= 0, alpha outside [0, 1], patterns matching
nothing). Each must raise ``ValueError``/``TypeError`` (CLI: exit status 2 with a one-line message) whose message
names the argument *and* contains the offending value. A case that returns instead fails, saying whether what it
returned holds a NaN (the silent-NaN failure this matrix exists to catch).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torch_pretrain_update import cli
from torch_pretrain_update.data.stages import (
    balance_classes,
    select_by_entropy,
    with_class_weights,
    with_entropy_weights,
)
from torch_pretrain_update.data.weighted_dataset import WeightedDataset
from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
from torch_pretrain_update.sampling.rounds import SelectionRounds
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler
from torch_pretrain_update.sampling.weighted_sampler import WeightedSampler
from torch_pretrain_update.scoring.scores import compute_scores, entropy, least_confidence, margin
from torch_pretrain_update.scoring.weights import class_weights, class_weights_from_counts, sample_weights
from torch_pretrain_update.training.distill import DKDLoss, FeatureHintLoss, KDLoss, PseudoLabelLoss
from torch_pretrain_update.training.freeze import freeze, unfreeze
from torch_pretrain_update.training.gradual import GradualUnfreezing
from torch_pretrain_update.training.optim import partial_optimizer

pytestmark = pytest.mark.timeout(60)

NAN, INF = float("nan"), float("inf")
CLI = "cli"  # marker for the expected outcome of a command-line case: exit status 2, one line on stderr


@dataclass
class Case:
    id: str
    call: Callable[[Path], Any]  # gets a fresh tmp_path
    exc: Any  # an exception type (or tuple), or CLI
    arg: str  # regex: the argument's name must appear in the message
    value: str  # regex: the offending value must appear in the message
    xfail: Optional[str] = None


# ------------------------------------------------------------------------------------------------ fixtures
P_OK = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
LABELS = torch.tensor([0, 1, 1, 2, 2, 2])


def _probs_with(row: int, values: list[float]) -> torch.Tensor:
    p = P_OK.clone()
    p[row] = torch.tensor(values)
    return p


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _gradual(stages: Any = (["2.*"], ["0.*"]), **kw: Any) -> GradualUnfreezing:
    model = _mlp()
    opt = partial_optimizer(model, torch.optim.SGD, trainable="4.*", lr=0.1)
    return GradualUnfreezing(model, opt, list(stages), **kw)


def _gradual_load_bad_stage() -> None:
    _gradual().load_state_dict({"stage": 5, "num_stages": 2, "groups_added": []})


def _stage(stage: Any, samples: list[dict]) -> list[dict]:
    return list(stage(iter(samples)))


def _s(key: str, **members: Any) -> dict:
    return {"__key__": key, "__url__": "shard-000.tar", **members}


def _wds(tmp: Path, **kw: Any) -> Any:
    """A WeightedWebDataset over one real (healthy) shard; ``kw`` overrides the arguments."""
    from torch_pretrain_update.data.stream import WeightedWebDataset
    from torch_pretrain_update.data.write import write_shards

    samples = [{"__key__": f"k{i}", "cls": i % 2, "npy": np.full(2, i, np.float32)} for i in range(6)]
    man = write_shards(samples, str(tmp / "ok-%06d.tar"), maxcount=10)
    args = {"manifest": man, "num_classes": 2, **kw}
    urls = args.pop("urls", None)
    return WeightedWebDataset(urls, **args)


def _wds_iterate_missing(tmp: Path) -> list:
    from torch_pretrain_update.data.stream import WeightedWebDataset

    ds = WeightedWebDataset([str(tmp / "nowhere-000000.tar")], num_classes=2)
    return list(ds)


def _rounds(*args: Any, **kw: Any) -> SelectionRounds:
    return SelectionRounds(*args, **kw)


def _rounds_next(scores: Any) -> Any:
    return _rounds(6, 4, 2, seed=0).next_round(scores)


def _position_beyond_epoch() -> list:
    sampler = RandomSubsetSampler(10, 4)
    sampler.load_state_dict({"epoch": 0, "position": 99})  # saved by a sampler with another budget
    return list(sampler)


def _entropy_stage_state(**changes: Any) -> list:
    stage = with_entropy_weights("p", window=4)
    _stage(stage, [_s("a", p=np.array([0.5, 0.5]))])
    state = {**stage.state_dict(), **changes}
    fresh = with_entropy_weights("p", window=4)
    fresh.load_state_dict(state)
    return [s["weight"] for s in _stage(fresh, [_s("b", p=np.array([0.9, 0.1]))])]


def _class_stage_state(**changes: Any) -> None:
    stage = with_class_weights(num_classes=2)
    stage.load_state_dict({**stage.state_dict(), **changes})

# ------------------------------------------------------------------------------------------------------ CLI
def _npy(tmp: Path, name: str, arr: np.ndarray) -> str:
    path = tmp / name
    np.save(path, arr)
    return str(path)


def _cli(argv_of: Callable[[Path], list[str]]) -> Callable[[Path], tuple[int, str]]:
    """Run ``cli.main(argv)`` in-process; returns (exit status, stderr). argparse errors raise SystemExit(2)."""

    def run(tmp: Path) -> tuple[int, str]:
        argv = argv_of(tmp)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(argv)
            except SystemExit as exc:
                rc = exc.code
        return rc, err.getvalue()

    return run


def _cli_subprocess(argv_of: Callable[[Path], list[str]]) -> Callable[[Path], tuple[int, str]]:
    """The installed ``pretrain-update`` console script (falls back to ``python -m torch_pretrain_update``)."""

    def run(tmp: Path) -> tuple[int, str]:
        exe = Path(sys.executable).with_name("pretrain-update")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch_pretrain_update"]
        proc = subprocess.run([*cmd, *argv_of(tmp)], capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stderr

    return run


def _probs_file(tmp: Path, bad: Optional[tuple[int, list[float]]] = None) -> str:
    p = np.tile(np.array([[0.25, 0.75]], np.float32), (10, 1))
    if bad is not None:
        p[bad[0]] = bad[1]
    return _npy(tmp, "probs.npy", p)


def _out(tmp: Path) -> str:
    return str(tmp / "keep.npy")


# -------------------------------------------------------------------------------------------------- the cases
CASES: list[Case] = [
    # ----- scores
    Case("scores/nan-prob", lambda t: entropy(_probs_with(1, [NAN, 0.5])), ValueError, r"\bx\b", r"\bnan\b"),
    Case("scores/inf-prob", lambda t: margin(_probs_with(2, [INF, 0.0])), ValueError, r"\bx\b", r"\binf\b"),
    Case("scores/negative-prob", lambda t: entropy(_probs_with(0, [-0.25, 1.25])), ValueError, r"\bx\b", r"-0\.25"),
    Case("scores/unnormalised", lambda t: least_confidence(_probs_with(3, [0.5, 0.7])), ValueError, r"\bx\b",
         r"1\.2\b"),
    Case("scores/inf-logit", lambda t: entropy(torch.tensor([[1.0, -INF], [0.0, 1.0]]), from_logits=True),
         ValueError, r"\bx\b", "-inf"),
    Case("scores/1-d", lambda t: entropy(torch.tensor([0.5, 0.5])), ValueError, r"\bx\b", r"\(2,\)"),
    Case("scores/3-d", lambda t: margin(torch.full((2, 2, 2), 0.5)), ValueError, r"\bx\b", r"\(2, 2, 2\)"),
    Case("scores/empty", lambda t: entropy(torch.empty(0, 3)), ValueError, r"\bx\b", r"\(0, 3\)"),
    Case("scores/int-dtype", lambda t: entropy(torch.tensor([[1, 0], [0, 1]])), TypeError, r"\bx\b", "int64"),
    Case("scores/unknown-score", lambda t: compute_scores(P_OK, "entropyy"), ValueError, "score", "'entropyy'"),
    # ----- weights
    Case("weights/float-labels", lambda t: class_weights(torch.tensor([0.0, 1.0])), TypeError, "labels", "float32"),
    Case("weights/label-out-of-range", lambda t: class_weights([0, 1, 5], num_classes=3), ValueError, "labels",
         r"\b5\b"),
    Case("weights/negative-label", lambda t: sample_weights([0, -1, 1]), ValueError, "labels", "-1"),
    Case("weights/empty-labels", lambda t: sample_weights(np.array([], dtype=np.int64)), ValueError, "labels",
         "empty"),
    Case("weights/2-d-labels", lambda t: class_weights(torch.zeros(2, 2, dtype=torch.long)), ValueError, "labels",
         r"\(2, 2\)"),
    Case("weights/zero-counts", lambda t: class_weights_from_counts([0, 0, 0]), ValueError, "counts",
         "all 3 are zero"),
    Case("weights/nan-count", lambda t: class_weights_from_counts([3.0, NAN]), ValueError, "counts", r"\bnan\b"),
    Case("weights/negative-count", lambda t: class_weights_from_counts([3.0, -2.0]), ValueError, "counts", "-2"),
    Case("weights/unknown-scheme", lambda t: class_weights([0, 1], scheme="inverse_sqrt"), ValueError, "scheme",
         "'inverse_sqrt'"),
    Case("weights/alpha>1", lambda t: class_weights([0, 1], scheme="power", alpha=1.5), ValueError, "alpha",
         r"1\.5"),
    Case("weights/alpha<0", lambda t: class_weights([0, 1], scheme="power", alpha=-0.5), ValueError, "alpha",
         r"-0\.5"),
    Case("weights/beta=1", lambda t: class_weights([0, 1], scheme="effective_number", beta=1.0), ValueError, "beta",
         r"1\.0"),
    Case("weights/nan-beta", lambda t: class_weights([0, 1], scheme="effective_number", beta=NAN), ValueError,
         "beta", r"\bnan\b"),
    # ----- samplers
    Case("random/budget>N", lambda t: RandomSubsetSampler(10, 11), ValueError, "num_samples", r"\b11\b"),
    Case("random/budget=0", lambda t: RandomSubsetSampler(10, 0), ValueError, "num_samples", r"\b0\b"),
    Case("random/empty-source", lambda t: RandomSubsetSampler([], 1), ValueError, "data_source", r"\b0\b"),
    Case("random/exclude-out-of-range", lambda t: RandomSubsetSampler(10, 3, exclude=[2, 10]), ValueError,
         "exclude", r"\b10\b"),
    Case("random/float-exclude", lambda t: RandomSubsetSampler(10, 3, exclude=torch.tensor([0.5])), TypeError,
         "exclude", "float"),
    Case("random/budget>pool-after-exclude", lambda t: RandomSubsetSampler(5, 4, exclude=[0, 1]), ValueError,
         "num_samples", r"\b4\b"),
    Case("random/float-budget", lambda t: RandomSubsetSampler(10, 2.5), TypeError, "num_samples", r"2\.5"),
    Case("stratified/float-labels", lambda t: StratifiedSampler(LABELS.float(), 2), TypeError, "labels", "float"),
    Case("stratified/budget>N", lambda t: StratifiedSampler(LABELS, 7), ValueError, "num_samples", r"\b7\b"),
    Case("stratified/2-d-labels", lambda t: StratifiedSampler(LABELS.reshape(2, 3), 2), ValueError, "labels",
         r"\(2, 3\)"),
    Case("stratified/negative-min", lambda t: StratifiedSampler(LABELS, 2, min_per_class=-1), ValueError,
         "min_per_class", "-1"),
    Case("balanced/unknown-option", lambda t: ClassBalancedSampler(LABELS, samples_per_class="maximum"),
         ValueError, "samples_per_class", "'maximum'"),
    Case("balanced/negative-label", lambda t: ClassBalancedSampler(torch.tensor([0, -3, 1])), ValueError, "labels",
         "-3"),
    Case("balanced/zero-per-class", lambda t: ClassBalancedSampler(LABELS, samples_per_class=0), ValueError,
         "samples_per_class", r"\b0\b"),
    Case("balanced/empty-labels", lambda t: ClassBalancedSampler([]), (ValueError, TypeError), "labels", "empty"),
    Case("entropy-sampler/nan-prob", lambda t: EntropySampler(_probs_with(1, [NAN, 1.0]), 2), ValueError, "probs",
         r"\bnan\b"),
    Case("entropy-sampler/unnormalised", lambda t: EntropySampler(_probs_with(2, [0.2, 0.3]), 2), ValueError,
         "probs", r"0\.5\b"),
    Case("entropy-sampler/temperature=0", lambda t: EntropySampler(P_OK, 2, mode="proportional", temperature=0.0),
         ValueError, "temperature", r"\b0(\.0)?\b"),
    Case("entropy-sampler/temperature<0", lambda t: EntropySampler(P_OK, 2, mode="proportional", temperature=-1),
         ValueError, "temperature", r"-1"),
    Case("entropy-sampler/budget>N", lambda t: EntropySampler(P_OK, 5), ValueError, "num_samples", r"\b5\b"),
    Case("entropy-sampler/unknown-mode", lambda t: EntropySampler(P_OK, 2, mode="top"), ValueError, "mode",
         "'top'"),
    Case("entropy-sampler/unknown-score", lambda t: EntropySampler(P_OK, 2, score="bald"), ValueError, "score",
         "'bald'"),
    Case("entropy-sampler/random-fraction>1", lambda t: EntropySampler(P_OK, 2, random_fraction=1.5), ValueError,
         "random_fraction", r"1\.5"),
    Case("entropy-sampler/stratify-length", lambda t: EntropySampler(P_OK, 2, stratify=[0, 1, 1]), ValueError,
         "stratify", r"\b3\b"),
    Case("entropy-sampler/float-stratify", lambda t: EntropySampler(P_OK, 2, stratify=[0.0, 1.0, 1.0, 0.0]),
         TypeError, "stratify", "float"),
    Case("entropy-sampler/inf-scores", lambda t: EntropySampler.from_scores([0.1, INF, 0.3], 1), ValueError,
         "scores", r"\binf\b"),
    Case("entropy-sampler/update-wrong-length", lambda t: EntropySampler(P_OK, 2).update(P_OK[:3]), ValueError,
         "probs", r"\b3\b"),
    Case("weighted/negative", lambda t: WeightedSampler([1.0, -1.0, 2.0], 2), ValueError, "weights", r"-1(\.0)?"),
    Case("weighted/all-zero", lambda t: WeightedSampler([0.0, 0.0, 0.0], 2), ValueError, "weights",
         "all 3 are zero"),
    Case("weighted/nan", lambda t: WeightedSampler([1.0, NAN], 2), ValueError, "weights", r"\bnan\b"),
    Case("weighted/2-d", lambda t: WeightedSampler(torch.ones(2, 2), 2), ValueError, "weights", r"\(2, 2\)"),
    Case("weighted/empty", lambda t: WeightedSampler(torch.ones(0), 1), ValueError, "weights", "empty"),
    Case("weighted/budget>positive-without-replacement",
         lambda t: WeightedSampler([1.0, 0.0, 0.0], 2, replacement=False), ValueError, "num_samples", r"\b2\b"),
    Case("sampler/negative-epoch", lambda t: RandomSubsetSampler(10, 2).set_epoch(-1), ValueError, "epoch", "-1"),
    Case("sampler/rank>=replicas", lambda t: RandomSubsetSampler(10, 2, num_replicas=2, rank=2), ValueError,
         "rank", r"\b2\b"),
    Case("sampler/state-missing-key", lambda t: RandomSubsetSampler(10, 2).load_state_dict({"epoch": 0}),
         ValueError, "state", "position"),
    Case("sampler/state-negative-position",
         lambda t: WeightedSampler([1.0, 2.0], 2).load_state_dict({"epoch": 0, "position": -4}), ValueError,
         "position", "-4"),
    Case("sampler/state-position-beyond-epoch", lambda t: _position_beyond_epoch(), ValueError, "position",
         r"\b99\b"),
    Case("random/num_samples-overflow", lambda t: RandomSubsetSampler(10, 10**20, replacement=True), ValueError,
         "num_samples", str(10**20)),
    Case("weighted/num_samples-overflow", lambda t: WeightedSampler([1.0, 2.0], 10**20), ValueError, "num_samples",
         str(10**20)),
    # ----- WeightedDataset
    Case("weighted-dataset/length-mismatch",
         lambda t: WeightedDataset(TensorDataset(torch.zeros(3, 2)), torch.ones(2)), ValueError, "weights",
         r"len\(weights\)=2"),
    Case("weighted-dataset/negative",
         lambda t: WeightedDataset(TensorDataset(torch.zeros(3, 2)), [1.0, -0.5, 1.0]), ValueError, "weights",
         r"-0\.5"),
    Case("weighted-dataset/nan", lambda t: WeightedDataset(TensorDataset(torch.zeros(2, 2)), [NAN, 1.0]),
         ValueError, "weights", r"\bnan\b"),
    Case("weighted-dataset/callable-nan",
         lambda t: WeightedDataset(TensorDataset(torch.zeros(3, 2)), lambda i: NAN)[1], ValueError, "weights",
         r"\bnan\b"),
    Case("weighted-dataset/callable-negative",
         lambda t: WeightedDataset(TensorDataset(torch.zeros(3, 2)), lambda i: -2.0)[0], ValueError, "weights",
         r"-2(\.0)?"),
    Case("weighted-dataset/empty-key", lambda t: WeightedDataset(TensorDataset(torch.zeros(2, 2)), [1, 1], key=""),
         TypeError, "key", "''"),
    # ----- stages (bad samples fed through them, and bad options)
    Case("class-weights/label-out-of-range", lambda t: _stage(with_class_weights(num_classes=3), [_s("a", cls=5)]),
         ValueError, "'cls'", r"\b5\b"),
    Case("class-weights/float-label", lambda t: _stage(with_class_weights(num_classes=3), [_s("a", cls=1.5)]),
         ValueError, "'cls'", r"1\.5"),
    Case("class-weights/missing-label", lambda t: _stage(with_class_weights(num_classes=3), [_s("a", npy=b"")]),
         ValueError, "'cls'", "missing"),
    Case("class-weights/unknown-scheme", lambda t: with_class_weights(num_classes=3, scheme="bogus"), ValueError,
         "scheme", "'bogus'"),
    Case("class-weights/zero-counts", lambda t: with_class_weights(num_classes=2, counts=[0, 0]), ValueError,
         "counts", "all 2 are zero"),
    Case("entropy-weights/nan-probs",
         lambda t: _stage(with_entropy_weights("p"), [_s("a", p=np.array([0.5, 0.5])), _s("b", p=np.array([NAN, 1]))]),
         ValueError, "'p'", r"\bnan\b"),
    Case("entropy-weights/unnormalised", lambda t: _stage(with_entropy_weights("p"), [_s("a", p=np.array([0.5, 0.7]))]),
         ValueError, "'p'", r"1\.2\b"),
    Case("entropy-weights/inf-logits",
         lambda t: _stage(with_entropy_weights("p", from_logits=True), [_s("a", p=np.array([1.0, INF]))]),
         ValueError, "'p'", r"\binf\b"),
    Case("entropy-weights/2-d", lambda t: _stage(with_entropy_weights("p"), [_s("a", p=np.full((2, 3), 1 / 3))]),
         ValueError, "'p'", r"\(2, 3\)"),
    Case("entropy-weights/window=0", lambda t: with_entropy_weights("p", window=0), ValueError, "window",
         r"\b0\b"),
    Case("entropy-weights/non-numeric-list", lambda t: _stage(with_entropy_weights("p"), [_s("a", p=["x", "y"])]),
         ValueError, "'p'", "'x'"),
    Case("entropy-weights/state-nan-window-sum", lambda t: _entropy_stage_state(window_sum=NAN), ValueError,
         "window_sum", r"\bnan\b"),
    Case("entropy-weights/state-negative-since-resum", lambda t: _entropy_stage_state(since_resum=-5), ValueError,
         "since_resum", "-5"),
    Case("class-weights/state-stats-not-a-dict", lambda t: _class_stage_state(stats=[1, 2]), TypeError, "stats",
         r"\[1, 2\]"),
    Case("class-weights/state-stats-not-counts", lambda t: _class_stage_state(stats={"seen": "x"}), TypeError,
         "seen", "'x'"),
    Case("balance/negative-target", lambda t: balance_classes(num_classes=2, target=[1.0, -1.0]), ValueError,
         "target", r"-1(\.0)?"),
    Case("balance/target-length", lambda t: balance_classes(num_classes=3, target=[1.0, 1.0]), ValueError,
         "target", r"\b2\b"),
    Case("balance/label-out-of-range", lambda t: _stage(balance_classes(num_classes=2), [_s("a", cls=b"9")]),
         ValueError, "'cls'", r"\b9\b"),
    Case("balance/correction>1", lambda t: balance_classes(num_classes=2, correction=1.5), ValueError,
         "correction", r"1\.5"),
    Case("select/k=0", lambda t: select_by_entropy(0, score_key="s"), ValueError, r"\bk\b", r"\b0\b"),
    Case("select/nan-score", lambda t: _stage(select_by_entropy(1, score_key="s"), [_s("a", s=1.0), _s("b", s=NAN)]),
         ValueError, "'s'", r"\bnan\b"),
    Case("select/negative-reservoir-weight",
         lambda t: _stage(select_by_entropy(1, score_key="s", mode="reservoir"), [_s("a", s=-1.0)]), ValueError,
         "'s'", r"-1(\.0)?"),
    Case("select/unknown-mode", lambda t: select_by_entropy(1, score_key="s", mode="greedy"), ValueError, "mode",
         "'greedy'"),
    # ----- WeightedWebDataset constructor arguments
    Case("stream/num_classes=0", lambda t: _wds(t, num_classes=0), ValueError, "num_classes", r"\b0\b"),
    Case("stream/unknown-split", lambda t: _wds(t, split="rows"), ValueError, "split", "'rows'"),
    Case("stream/unknown-scheme", lambda t: _wds(t, scheme="log"), ValueError, "scheme", "'log'"),
    Case("stream/negative-counts", lambda t: _wds(t, counts=[3, -1]), ValueError, "counts", "-1"),
    Case("stream/nan-balance-target", lambda t: _wds(t, balance=True, balance_target=[NAN, 1.0]), ValueError,
         "target", r"\bnan\b"),
    Case("stream/shuffle_buffer=0", lambda t: _wds(t, shuffle_buffer=0), ValueError, "shuffle_buffer", r"\b0\b"),
    Case("stream/float-seed", lambda t: _wds(t, seed=0.5), TypeError, "seed", r"0\.5"),
    Case("stream/empty-urls", lambda t: _wds(t, manifest=None, urls=[]), ValueError, "urls", r"\[\]"),
    Case("stream/pattern-matching-nothing", _wds_iterate_missing, ValueError, "shard|cannot be opened",
         "nowhere-000000.tar"),
    Case("stream/momentum>1-with-known-counts", lambda t: _wds(t, momentum=5.0), ValueError, "momentum", r"5(\.0)?"),
    Case("stream/2-d-counts", lambda t: _wds(t, counts=[[3, 3]]), ValueError, "counts", r"\(1, 2\)"),
    # ----- losses
    Case("kd/temperature=0", lambda t: KDLoss(temperature=0.0), ValueError, "temperature", r"\b0(\.0)?\b"),
    Case("kd/temperature<0", lambda t: KDLoss(temperature=-2.0), ValueError, "temperature", r"-2(\.0)?"),
    Case("kd/alpha>1", lambda t: KDLoss(alpha=1.5), ValueError, "alpha", r"1\.5"),
    Case("kd/alpha<0", lambda t: KDLoss(alpha=-0.1), ValueError, "alpha", r"-0\.1"),
    Case("kd/float-target", lambda t: KDLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0])),
         TypeError, "target", "float"),
    Case("kd/target-out-of-range", lambda t: KDLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3])),
         ValueError, "target", r"\b3\b"),
    Case("kd/nan-student",
         lambda t: KDLoss()(torch.tensor([[0.0, NAN, 1.0], [0.0, 0.0, 0.0]]), torch.zeros(2, 3), torch.tensor([0, 1])),
         ValueError, "student_logits", r"\bnan\b"),
    Case("kd/teacher-shape", lambda t: KDLoss()(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1])),
         ValueError, "teacher_logits", r"\(2, 4\)"),
    Case("kd/negative-weight",
         lambda t: KDLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]),
                            weight=torch.tensor([1.0, -1.0])),
         ValueError, "weight", r"-1(\.0)?"),
    Case("kd/1-d-logits", lambda t: KDLoss(alpha=1.0)(torch.zeros(3), torch.zeros(3)), ValueError,
         "student_logits", r"\(3,\)"),
    Case("dkd/negative-beta", lambda t: DKDLoss(beta=-1.0), ValueError, "beta", r"-1(\.0)?"),
    Case("dkd/temperature=0", lambda t: DKDLoss(temperature=0), ValueError, "temperature", r"\b0(\.0)?\b"),
    Case("dkd/inf-teacher",
         lambda t: DKDLoss()(torch.zeros(2, 3), torch.tensor([[0.0, INF, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 1])),
         ValueError, "teacher_logits", r"\binf\b"),
    Case("pseudo/threshold>1", lambda t: PseudoLabelLoss(threshold=1.5), ValueError, "threshold", r"1\.5"),
    Case("pseudo/threshold=0", lambda t: PseudoLabelLoss(threshold=0.0), ValueError, "threshold", r"\b0(\.0)?\b"),
    Case("pseudo/nan-teacher",
         lambda t: PseudoLabelLoss()(torch.zeros(2, 3), torch.tensor([[0.0, 0.0, 0.0], [NAN, 0.0, 0.0]])),
         ValueError, "teacher_logits", r"\bnan\b"),
    Case("hint/student_dim=0", lambda t: FeatureHintLoss(0, 4), ValueError, "student_dim", r"\b0\b"),
    Case("hint/wrong-channels", lambda t: FeatureHintLoss(4, 6)(torch.zeros(2, 5), torch.zeros(2, 6)), ValueError,
         "student_features", r"\(2, 5\)"),
    Case("hint/nan-weight",
         lambda t: FeatureHintLoss(4, 6)(torch.zeros(2, 4), torch.zeros(2, 6), weight=torch.tensor([1.0, NAN])),
         ValueError, "weight", r"\bnan\b"),
    Case("hint/empty-batch", lambda t: FeatureHintLoss(2, 2)(torch.zeros(0, 2), torch.zeros(0, 2)), ValueError,
         "student_features", r"\(0, 2\)"),
    # ----- partial updates
    Case("freeze/pattern-matching-nothing", lambda t: freeze(_mlp(), "encoder.*"), ValueError, "patterns",
         r"'encoder\.\*'"),
    Case("freeze/not-a-pattern", lambda t: freeze(_mlp(), 3), TypeError, "patterns", r"\b3\b"),
    Case("freeze/empty-patterns", lambda t: freeze(_mlp(), []), ValueError, "patterns", "empty"),
    Case("freeze/not-a-model", lambda t: freeze("resnet", "0.*"), TypeError, "model", "'resnet'"),
    Case("unfreeze/pattern-matching-nothing", lambda t: unfreeze(_mlp(), ["0.*", "head.*"]), ValueError,
         "patterns", r"'head\.\*'"),
    Case("unfreeze/negative-lr",
         lambda t: unfreeze(_mlp(), "0.*", optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                            lr=-1.0), ValueError, r"\blr\b", r"-1(\.0)?"),
    Case("partial-optimizer/pattern-matching-nothing",
         lambda t: partial_optimizer(_mlp(), torch.optim.SGD, trainable="fc.*", lr=0.1), ValueError, "trainable",
         r"'fc\.\*'"),
    Case("partial-optimizer/class-name-string",
         lambda t: partial_optimizer(_mlp(), "SGD", trainable="0.*", lr=0.1), TypeError, "optimizer_cls", "'SGD'"),
    Case("partial-optimizer/layer_decay>1",
         lambda t: partial_optimizer(_mlp(), torch.optim.SGD, trainable="0.*", lr=0.1, layer_decay=1.5), ValueError,
         "layer_decay", r"1\.5"),
    Case("gradual/pattern-matching-nothing", lambda t: _gradual([["2.*"], ["9.*"]]), ValueError, r"stages\[1\]",
         r"'9\.\*'"),
    Case("gradual/lr_factor=0", lambda t: _gradual(lr_factor=0.0), ValueError, "lr_factor", r"\b0(\.0)?\b"),
    Case("gradual/state-stage-out-of-range", lambda t: _gradual_load_bad_stage(), ValueError, "stage", r"\b5\b"),
    # ----- SelectionRounds (issue 9)
    Case("rounds/budget>pool", lambda t: _rounds(10, 20, 2), ValueError, "budget", r"\b20\b"),
    Case("rounds/rounds=0", lambda t: _rounds(10, 5, 0), ValueError, "rounds", r"\b0\b"),
    Case("rounds/unknown-strategy", lambda t: _rounds(10, 5, 2, strategy="bogus"), ValueError, "strategy",
         "'bogus'"),
    Case("rounds/random-fraction>1", lambda t: _rounds(10, 5, 2, random_fraction=1.5), ValueError,
         "random_fraction", r"1\.5"),
    Case("rounds/nan-scores", lambda t: _rounds_next([0.1, NAN, 0.2, 0.3, 0.4, 0.5]), ValueError, "scores", r"\bnan\b"),
    Case("rounds/scores-length", lambda t: _rounds_next([0.1, 0.2, 0.3]), ValueError, "scores", r"\b3\b"),
    # ----- CLI (exit status 2, one line naming the option and the value)
    Case("cli/unknown-strategy",
         _cli(lambda t: ["select", _probs_file(t), "--budget", "3", "--strategy", "bogus", "-o", _out(t)]), CLI,
         "--strategy", "'bogus'"),
    Case("cli/budget=0", _cli(lambda t: ["select", _probs_file(t), "--budget", "0", "--strategy", "entropy",
                                         "-o", _out(t)]), CLI, "--budget", "'0'"),
    Case("cli/budget>N", _cli(lambda t: ["select", _probs_file(t), "--budget", "100", "--strategy", "random",
                                         "-o", _out(t)]), CLI, "--budget", r"\b100\b"),
    Case("cli/nan-probs", _cli(lambda t: ["select", _probs_file(t, (4, [NAN, 0.5])), "--budget", "3",
                                          "--strategy", "entropy", "-o", _out(t)]), CLI, "probs.npy", r"\bnan\b"),
    Case("cli/unnormalised-probs", _cli(lambda t: ["select", _probs_file(t, (2, [0.5, 0.9])), "--budget", "3",
                                                   "--strategy", "margin", "-o", _out(t)]), CLI, "probs.npy",
         r"1\.4\b"),
    Case("cli/3-d-input", _cli(lambda t: ["select", _npy(t, "cube.npy", np.full((2, 2, 2), 0.5, np.float32)),
                                          "--budget", "1", "--strategy", "entropy", "-o", _out(t)]), CLI,
         "cube.npy", r"\(2, 2, 2\)"),
    Case("cli/random-fraction>1", _cli(lambda t: ["select", _probs_file(t), "--budget", "3", "--strategy",
                                                  "entropy", "--random-fraction", "1.5", "-o", _out(t)]), CLI,
         "--random-fraction", r"1\.5"),
    Case("cli/float-labels", _cli(lambda t: ["select", _probs_file(t), "--budget", "3", "--strategy",
                                             "stratified", "--labels",
                                             _npy(t, "lab.npy", np.zeros(10, np.float64)), "-o", _out(t)]), CLI,
         "lab.npy", "float64"),
    Case("cli/labels-length", _cli(lambda t: ["select", _probs_file(t), "--budget", "3", "--strategy",
                                              "stratified", "--labels", _npy(t, "lab.npy", np.zeros(7, np.int64)),
                                              "-o", _out(t)]), CLI, "--labels", r"\b7\b"),
    Case("cli/weights-unknown-scheme", _cli(lambda t: ["weights", _npy(t, "y.npy", np.array([0, 1, 1])),
                                                       "--scheme", "log"]), CLI, "--scheme", "'log'"),
    Case("cli/weights-alpha>1", _cli(lambda t: ["weights", _npy(t, "y.npy", np.array([0, 1, 1])), "--scheme",
                                                "power", "--alpha", "1.5"]), CLI, "alpha", r"1\.5"),
    Case("cli/weights-label-out-of-range", _cli(lambda t: ["weights", _npy(t, "y.npy", np.array([0, 1, 5])),
                                                           "--num-classes", "3"]), CLI, "labels", r"\b5\b"),
    Case("cli/weights-empty-labels", _cli(lambda t: ["weights", _npy(t, "y.npy", np.array([], np.int64))]), CLI,
         "y.npy", "empty"),
    Case("cli/inspect-pattern-matching-nothing",
         _cli(lambda t: ["inspect", str(t / "none-{000000..000002}.tar"), "--no-progress"]), CLI, "shard",
         "none-000000.tar"),
    Case("cli/subprocess-weights-negative-label",
         _cli_subprocess(lambda t: ["weights", _npy(t, "y.npy", np.array([0, -4, 1]))]), CLI, "labels", "-4"),
]


# -------------------------------------------------------------------------------------------------- checks
def _holds_nan(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and bool(torch.isnan(value.detach()).any())
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f" and bool(np.isnan(value).any())
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_holds_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_nan(v) for v in value)
    return False


def _params() -> list[Any]:
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_matrix_is_large_and_ids_unique():
    assert len(CASES) >= 45
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, tmp_path: Path) -> None:
    if case.exc == CLI:
        rc, err = case.call(tmp_path)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, f"exit status {rc} (want 2); stderr: {err!r}"
        assert len(lines) == 1, f"want a one-line message; stderr: {err!r}"
        msg = lines[0]
        assert "Traceback" not in err
    else:
        try:
            result = case.call(tmp_path)
        except case.exc as exc:
            msg = str(exc)
        else:
            pytest.fail(
                f"no error raised; returned {type(result).__name__}"
                + (" holding a NaN (a silent NaN)" if _holds_nan(result) else "")
            )
    assert re.search(case.arg, msg), f"message does not name the argument /{case.arg}/: {msg!r}"
    assert re.search(case.value, msg), f"message lacks the value /{case.value}/: {msg!r}"
