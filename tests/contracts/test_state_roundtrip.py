"""State dicts of every stateful object survive ``json.dumps``/``json.loads`` and ``torch.save``/``torch.load(
weights_only=True)``, and the object restored from them continues exactly like the original (next outputs equal).

Objects: every sampler mid-epoch (and one on rank 1 of 2, one after ``EntropySampler.update``), WeightedWebDataset
mid-epoch (with and without balancing), each stage object mid-pass, GradualUnfreezing between stages,
SelectionRounds between rounds, and StatefulDataLoader (0 and 2 workers) driving our sampler or our stream.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support.resume_harness import to_py
from torch_pretrain_update.data.stages import (
    balance_classes,
    select_by_entropy,
    with_class_weights,
    with_entropy_weights,
)
from torch_pretrain_update.data.stream import WeightedWebDataset
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
from torch_pretrain_update.sampling.rounds import SelectionRounds
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler
from torch_pretrain_update.sampling.weighted_sampler import WeightedSampler
from torch_pretrain_update.training.gradual import GradualUnfreezing
from torch_pretrain_update.training.optim import partial_optimizer

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------------ round trips
def _plain(value: Any) -> bool:
    """Only JSON types: dict (str keys), list, str, int, finite float, bool, None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def via_json(state: Any) -> Any:
    return json.loads(json.dumps(state, allow_nan=False))


def via_torch(state: Any) -> Any:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


ROUND_TRIPS = {"json": via_json, "torch": via_torch}


def _check_state(state: Any, how: str) -> Any:
    """The state is plain data; returns it after the round trip (which must not change it)."""
    assert _plain(state), f"state holds non-JSON values: {state!r}"[:500]
    back = ROUND_TRIPS[how](state)
    assert back == state
    return back


# ---------------------------------------------------------------------------------------------------- samplers
LABELS = torch.tensor([i % 5 if i % 3 else 0 for i in range(60)])  # 5 classes, class 0 over-represented
_G = torch.Generator().manual_seed(0)
PROBS = torch.softmax(torch.randn(60, 4, generator=_G), dim=1)
WEIGHTS = torch.rand(60, generator=_G) * (torch.arange(60) % 7 != 0)  # some zero weights


def _entropy_updated() -> EntropySampler:
    s = EntropySampler(PROBS, 15, mode="proportional", random_fraction=0.4, stratify=LABELS, seed=5)
    s.update(PROBS.flip(0))
    return s


SAMPLERS: dict[str, Callable[[], Any]] = {
    "random": lambda: RandomSubsetSampler(60, 25, seed=1),
    "random-replacement-exclude": lambda: RandomSubsetSampler(60, 40, replacement=True, exclude=[0, 5, 9], seed=2),
    "stratified": lambda: StratifiedSampler(LABELS, 23, min_per_class=2, exclude=torch.arange(60) < 4, seed=3),
    "class-balanced": lambda: ClassBalancedSampler(LABELS, samples_per_class="max", seed=4),
    "class-balanced-replacement": lambda: ClassBalancedSampler(LABELS, samples_per_class=7, replacement=True),
    "entropy-topk": lambda: EntropySampler(PROBS, 12, score="margin", exclude=[1, 2], seed=6),
    "entropy-proportional-updated": _entropy_updated,
    "weighted-replacement": lambda: WeightedSampler(WEIGHTS, 45, seed=7),
    "weighted-no-replacement": lambda: WeightedSampler(WEIGHTS, 20, replacement=False, seed=8),
    "weighted-rank1-of-2": lambda: WeightedSampler(WEIGHTS, 33, seed=9, num_replicas=2, rank=1),
}


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_state_mid_epoch(name: str, how: str) -> None:
    make = SAMPLERS[name]
    sampler = make()
    sampler.set_epoch(1)
    it = iter(sampler)
    k = len(sampler) // 3
    head = [next(it) for _ in range(k)]
    state = _check_state(sampler.state_dict(), how)
    assert state["epoch"] == 1 and state["position"] == k
    rest = list(it)
    sampler.set_epoch(2)
    next_epoch = list(sampler)

    fresh = make()
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # what a resumed loop calls: keeps the loaded position (same epoch)
    assert list(fresh) == rest
    fresh.set_epoch(2)
    assert list(fresh) == next_epoch
    assert len(head) + len(rest) == len(sampler) and len(rest) > 0


# ------------------------------------------------------------------------------------------------------ stream
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("roundtrip")
    samples = [{"__key__": f"s{i:04d}", "cls": int(LABELS[i]), "npy": np.full(3, i, np.float32)} for i in range(60)]
    return write_shards(samples, str(d / "rt-%06d.tar"), maxcount=12)


def _stream_out(it: Any) -> list[tuple[str, int, float]]:
    return [(s["__key__"], s["cls"], float(s["weight"])) for s in it]


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("balance", [False, True], ids=["plain", "balance"])
def test_stream_state_mid_epoch(shards: str, balance: bool, how: str) -> None:
    def make() -> WeightedWebDataset:
        return WeightedWebDataset(None, manifest=shards, num_classes=5, balance=balance, seed=11, shuffle_buffer=5)

    ds = make()
    ds.set_epoch(1)
    it = iter(ds)
    head = [next(it) for _ in range(23)]
    state = _check_state(ds.state_dict(), how)
    rest = _stream_out(it)
    fresh = make()
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert _stream_out(fresh) == rest
    assert len(head) + len(rest) == 60


# ------------------------------------------------------------------------------------------------------ stages
def _samples() -> list[dict]:
    """Fresh dicts each call (the one-to-one stages write the weight into the sample)."""
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(40, 3, generator=g) * 2, dim=1).numpy()
    return [{"__key__": f"k{i:03d}", "__url__": "mem", "cls": int(LABELS[i]) % 3, "p": probs[i],
             "s": float(probs[i].max())} for i in range(40)]


def _stage_out(it: Any) -> list[tuple]:
    return [(s["__key__"], round(float(s["weight"]), 7) if "weight" in s else None) for s in it]


STAGES: dict[str, tuple[Callable[[], Any], bool]] = {
    # name: (factory, replay from the start on resume)
    "class-weights-running": (lambda: with_class_weights(num_classes=3), False),
    "class-weights-ema": (lambda: with_class_weights(num_classes=3, scheme="effective_number", momentum=0.2), False),
    "entropy-weights": (lambda: with_entropy_weights("p", window=6), False),
    "balance": (lambda: balance_classes(num_classes=3, seed=4, target=[0.2, 0.3, 0.5]), False),
    "balance-poisson-counter": (lambda: balance_classes(num_classes=3, seed=4, repeat="poisson", rng="counter"),
                                False),
    "select-topk": (lambda: select_by_entropy(9, probs_key="p"), True),
    "select-reservoir": (lambda: select_by_entropy(9, score_key="s", mode="reservoir", seed=2), True),
}


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_state_mid_pass(name: str, how: str) -> None:
    make, from_start = STAGES[name]
    stage = make()
    stage.set_epoch(1)
    list(stage(iter(_samples())))  # a first pass: running estimates carry over to the next one
    stage.set_epoch(2)
    it = stage(iter(_samples()))
    k = 5
    head = [next(it) for _ in range(k)]
    state = _check_state(stage.state_dict(), how)
    rest = _stage_out(it)
    assert len(head) == k and len(rest) > 0

    fresh = make()
    fresh.load_state_dict(state)
    fresh.set_epoch(2)
    feed = _samples() if from_start else _samples()[state["position"]:]
    assert _stage_out(fresh(iter(feed))) == rest
    assert fresh.stats == stage.stats
    # and the pass after that is the same too (running state carried over)
    stage.set_epoch(3)
    fresh.set_epoch(3)
    assert _stage_out(fresh(iter(_samples()))) == _stage_out(stage(iter(_samples())))


# ------------------------------------------------------------------------------------------- GradualUnfreezing
def _unfreezing() -> tuple[nn.Module, torch.optim.Optimizer, Any, GradualUnfreezing]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = partial_optimizer(model, torch.optim.SGD, trainable="5.*", lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gu = GradualUnfreezing(model, opt, [["3.*"], ["0.*", "1.*"]], schedulers=[sched], lr_factor=0.5)
    return model, opt, sched, gu


def _groups(opt: torch.optim.Optimizer) -> list[tuple]:
    return [(len(g["params"]), g["lr"], g["weight_decay"], g.get("initial_lr")) for g in opt.param_groups]


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_gradual_unfreezing_state(how: str) -> None:
    model, opt, sched, gu = _unfreezing()
    opt.step()
    sched.step()
    assert gu.step() == ["3.weight", "3.bias"]
    state = _check_state(gu.state_dict(), how)

    model2, opt2, sched2, gu2 = _unfreezing()
    model2.load_state_dict(model.state_dict())
    gu2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert [p.requires_grad for p in model2.parameters()] == [p.requires_grad for p in model.parameters()]
    assert _groups(opt2) == _groups(opt)
    # continues identically: the next stage adds the same groups, the schedule moves them the same way
    sched.step()
    sched2.step()
    assert gu2.step() == gu.step() == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert _groups(opt2) == _groups(opt)
    assert gu2.state_dict() == gu.state_dict()
    model.train()
    model2.train()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model2(x), model(x))
    assert [m.training for m in model2.modules()] == [m.training for m in model.modules()]


# ---------------------------------------------------------------------------------------------- SelectionRounds
@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_selection_rounds_state(how: str) -> None:
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(50, generator=g) for _ in range(4)]

    def make() -> SelectionRounds:
        return SelectionRounds(50, 20, 4, random_fraction=0.5, seed=3)

    rounds = make()
    first = [rounds.next_round(scores[0]), rounds.next_round(scores[1])]
    state = _check_state(rounds.state_dict(), how)
    fresh = make()
    fresh.load_state_dict(state)
    assert sorted(torch.as_tensor(fresh.chosen).tolist()) == sorted(torch.as_tensor(rounds.chosen).tolist())
    for s in scores[2:]:
        assert torch.as_tensor(fresh.next_round(s)).tolist() == torch.as_tensor(rounds.next_round(s)).tolist()
    assert len(set(torch.cat([torch.as_tensor(f) for f in first]).tolist())) == sum(len(f) for f in first)


# ------------------------------------------------------------------------------------------ StatefulDataLoader
def _loader_with_sampler(num_workers: int) -> tuple[StatefulDataLoader, Any]:
    sampler = ClassBalancedSampler(LABELS, samples_per_class=9, seed=12)
    ds = TensorDataset(torch.arange(60), LABELS)
    return StatefulDataLoader(ds, batch_size=4, sampler=sampler, num_workers=num_workers), sampler.set_epoch


def _loader_with_stream(num_workers: int, manifest: str) -> tuple[StatefulDataLoader, Any]:
    ds = WeightedWebDataset(None, manifest=manifest, num_classes=5, seed=13, balance=True)

    def collate(batch: list[dict]) -> dict:
        return {"key": [s["__key__"] for s in batch], "weight": torch.stack([s["weight"] for s in batch])}

    return StatefulDataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate), ds.set_epoch


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("what", ["sampler", "stream"])
def test_stateful_dataloader_state(shards: str, what: str, num_workers: int, how: str) -> None:
    def make() -> tuple[StatefulDataLoader, Any]:
        if what == "sampler":
            return _loader_with_sampler(num_workers)
        return _loader_with_stream(num_workers, shards)

    loader, set_epoch = make()
    set_epoch(1)
    it = iter(loader)
    head = [to_py(next(it)) for _ in range(5)]
    state = ROUND_TRIPS[how](loader.state_dict())
    json.dumps(state)  # still JSON-serialisable after torch.load (the loader's own state is plain too)
    rest = [to_py(b) for b in it]
    fresh, fresh_set_epoch = make()
    fresh.load_state_dict(state)
    fresh_set_epoch(1)
    assert [to_py(b) for b in fresh] == rest
    assert len(head) == 5 and len(rest) > 0
