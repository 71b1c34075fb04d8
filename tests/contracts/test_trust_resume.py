"""Resume at an epoch boundary, and states refused by a differently built object.

torchdata 0.11's ``StatefulDataLoader.load_state_dict`` only stores the state: the sampler (or the dataset, in
each worker) gets it when the next ``iter(loader)`` starts, i.e. *after* the resumed loop's ``set_epoch``. A
checkpoint taken when an epoch's loop has finished (or right after the next ``set_epoch``) must resume as "that
epoch is finished": the concatenated stream of all epochs equals the unbroken run's, nothing replayed, nothing
skipped. Every case runs the user's loop as written, in fresh objects, through JSON.

A state also belongs to the object that made it: one loaded into an object built with other inputs (size, seed,
ranks, weights, labels, shards, shuffle settings) is refused with a ``ValueError`` that says what differs; the
rank is not part of it (each rank may load any rank's state of a lockstep sampler).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from tests._support import shard_fixtures as fx
from tests._support.resume_harness import IndexDataset, to_py
from torch_pretrain_update.data.stages import balance_classes, select_by_entropy, with_class_weights
from torch_pretrain_update.data.stream import WeightedWebDataset
from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler
from torch_pretrain_update.sampling.weighted_sampler import WeightedSampler

pytestmark = pytest.mark.timeout(120)

N = 22
BATCH = 4
EPOCHS = 3
LABELS = torch.tensor([i % 3 if i % 4 else 0 for i in range(N)])
_G = torch.Generator().manual_seed(0)
PROBS = torch.softmax(torch.randn(N, 3, generator=_G) * 2, dim=1)
WEIGHTS = torch.rand(N, generator=_G) + 0.05


def via_json(state: Any) -> Any:
    return json.loads(json.dumps(state, allow_nan=False))


# ------------------------------------------------------------------------------------------------- the user's loop
def train(make: Callable[[], tuple[Any, Callable[[int], None]]], *, start: int = 0, state: Any = None,
          stop_at: int | None = None, at: str = "end") -> tuple[list[list[Any]], Any]:
    """``for epoch in range(start, EPOCHS): set_epoch(epoch); for batch in loader: ...`` with a checkpoint at the
    end of each epoch's loop (``at="end"``) or right after ``set_epoch`` before the loop (``at="start"``).
    With ``stop_at`` the run stops (a crash) right after that epoch's checkpoint. Returns the batches of every
    epoch seen and the last checkpoint (through JSON)."""
    loader, set_epoch = make()
    if state is not None:
        loader.load_state_dict(state)
    seen, ckpt = [], None
    for epoch in range(start, EPOCHS):
        set_epoch(epoch)
        if at == "start":
            ckpt = via_json(loader.state_dict())
            if epoch == stop_at:
                return seen, ckpt
        seen.append([to_py(b) for b in loader])
        if at == "end":
            ckpt = via_json(loader.state_dict())
            if epoch == stop_at:
                return seen, ckpt
    return seen, ckpt


def check_epoch_boundaries(make: Callable[[], tuple[Any, Callable[[int], None]]], at: str, *,
                           quick: bool = False) -> int:
    """Crash after the checkpoint of an epoch, resume in fresh objects: the epochs seen equal the unbroken run's.
    Every epoch (``quick``: the middle one only, for the slower runs with worker processes)."""
    full, _ = train(make)
    assert all(len(e) > 0 for e in full)
    assert full[0] != full[1] != full[2], "epochs must differ, else a replayed epoch would go unnoticed"
    checked = 0
    for stop in (1,) if quick else (0, 1) if at == "end" else (1, 2):
        head, ckpt = train(make, stop_at=stop, at=at)
        resume_from = stop + 1 if at == "end" else stop  # the loop's own bookkeeping of where it was
        tail, _ = train(make, start=resume_from, state=ckpt, at=at)
        assert head + tail == full, f"checkpoint at the {at} of epoch {stop}: resumed epochs differ"
        checked += 1
    return checked


SAMPLERS: dict[str, Callable[[], Any]] = {
    "random_subset": lambda: RandomSubsetSampler(N, 15, seed=1),
    "stratified": lambda: StratifiedSampler(LABELS, 15, seed=2),
    "entropy": lambda: EntropySampler(PROBS, 13, mode="proportional", seed=3),
    "class_balanced": lambda: ClassBalancedSampler(LABELS, samples_per_class=5, seed=4),
    "weighted": lambda: WeightedSampler(WEIGHTS, 18, seed=5),
    "distributed": lambda: DistributedSampler(IndexDataset(N), num_replicas=1, rank=0, seed=6),  # the reference
}


def _sampler_loader(name: str, num_workers: int, drop_last: bool = False):
    def make():
        sampler = SAMPLERS[name]()
        loader = StatefulDataLoader(IndexDataset(N), batch_size=BATCH, sampler=sampler, num_workers=num_workers,
                                    drop_last=drop_last)
        return loader, sampler.set_epoch

    return make


@pytest.mark.parametrize("at", ["end", "start"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_checkpoint_at_epoch_boundary(name: str, num_workers: int, at: str) -> None:
    assert check_epoch_boundaries(_sampler_loader(name, num_workers), at, quick=num_workers > 0) >= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sampler_epoch_end_with_a_dropped_last_batch(num_workers: int) -> None:
    # 15 indices in batches of 4 with drop_last: the state's position is 12 < 15, yet the loader's epoch is over
    make = _sampler_loader("random_subset", num_workers, drop_last=True)
    assert check_epoch_boundaries(make, "end", quick=num_workers > 0) >= 1


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("trust_resume")
    return fx.write(d, fx.make_samples(40, seed=1, vary=False), maxcount=10)


def _keys(batch: list[dict]) -> list[str]:
    return [s["__key__"] for s in batch]


def _stream_loader(manifest: str, num_workers: int, **kw: Any):
    def make():
        ds = WeightedWebDataset(None, manifest=manifest, num_classes=3, seed=7, shuffle_buffer=5, **kw)
        return StatefulDataLoader(ds, batch_size=BATCH, num_workers=num_workers, collate_fn=_keys), ds.set_epoch

    return make


@pytest.mark.parametrize("at", ["end", "start"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_checkpoint_at_epoch_boundary(manifest: str, num_workers: int, at: str) -> None:
    assert check_epoch_boundaries(_stream_loader(manifest, num_workers), at, quick=num_workers > 0) >= 1


def test_stream_checkpoint_at_epoch_boundary_with_balancing(manifest: str) -> None:
    assert check_epoch_boundaries(_stream_loader(manifest, 0, balance=True), "end") == 2


@pytest.mark.parametrize("order", ["load_then_set_epoch", "set_epoch_then_load"])
def test_stage_state_from_a_finished_pass(order: str) -> None:
    """A stage's state at the end of pass e resumes as "pass e finished" in either call order (a Stateful dataset
    wrapping a stage under StatefulDataLoader loads it after the loop's set_epoch)."""
    samples = [{"__key__": f"k{i:03d}", "cls": int(LABELS[i])} for i in range(N)]

    def run(stage, epoch=None):
        if epoch is not None:
            stage.set_epoch(epoch)
        return [s["__key__"] for s in stage(dict(s) for s in samples)]

    ref = balance_classes(num_classes=3, seed=4, target=[0.5, 0.25, 0.25])
    full = [run(ref, e) for e in range(EPOCHS)]
    assert full[0] != full[1]
    stage = balance_classes(num_classes=3, seed=4, target=[0.5, 0.25, 0.25])
    run(stage, 0)
    state = via_json(stage.state_dict())
    fresh = balance_classes(num_classes=3, seed=4, target=[0.5, 0.25, 0.25])
    if order == "load_then_set_epoch":
        fresh.load_state_dict(state)
        fresh.set_epoch(1)
    else:
        fresh.set_epoch(1)
        fresh.load_state_dict(state)
    assert [run(fresh), run(fresh, 2)] == full[1:]


# ------------------------------------------------------------------------------------- a state from another object
MISMATCHES: dict[str, tuple[Callable[[], Any], Callable[[], Any], list[str]]] = {
    # name: (saving sampler, loading sampler, fragments the message must contain)
    "random-N": (lambda: RandomSubsetSampler(100, 10), lambda: RandomSubsetSampler(120, 10),
                 ["RandomSubsetSampler with num_items=100", "this one has num_items=120"]),
    "random-num_samples": (lambda: RandomSubsetSampler(100, 10), lambda: RandomSubsetSampler(100, 12),
                           ["num_samples=10;", "num_samples=12"]),
    "random-seed": (lambda: RandomSubsetSampler(100, 10, seed=0), lambda: RandomSubsetSampler(100, 10, seed=1),
                    ["seed=0;", "seed=1"]),
    "random-shuffle": (lambda: RandomSubsetSampler(100, 10), lambda: RandomSubsetSampler(100, 10, shuffle=False),
                       ["shuffle=True;", "shuffle=False"]),
    "random-exclude": (lambda: RandomSubsetSampler(100, 10, exclude=[1, 2]),
                       lambda: RandomSubsetSampler(100, 10, exclude=[1, 3]), ["exclude=sha256:"]),
    "random-replacement": (lambda: RandomSubsetSampler(100, 10),
                           lambda: RandomSubsetSampler(100, 10, replacement=True), ["replacement=False;"]),
    "random-num_replicas": (lambda: RandomSubsetSampler(100, 40, num_replicas=2, rank=0),
                            lambda: RandomSubsetSampler(100, 40, num_replicas=4, rank=0),
                            ["num_replicas=2;", "num_replicas=4"]),
    "random-drop_last": (lambda: RandomSubsetSampler(100, 41, num_replicas=2, rank=0),
                         lambda: RandomSubsetSampler(100, 41, num_replicas=2, rank=0, drop_last=True),
                         ["drop_last=False;", "drop_last=True"]),
    "stratified-labels": (lambda: StratifiedSampler(LABELS, 10), lambda: StratifiedSampler(LABELS.flip(0), 10),
                          ["StratifiedSampler with labels=sha256:"]),
    "balanced-per-class": (lambda: ClassBalancedSampler(LABELS, samples_per_class=5),
                           lambda: ClassBalancedSampler(LABELS, samples_per_class=6),
                           ["num_per_class=5;", "num_per_class=6"]),
    "balanced-labels": (lambda: ClassBalancedSampler(LABELS, samples_per_class=5),
                        lambda: ClassBalancedSampler(LABELS.roll(1), samples_per_class=5), ["labels=sha256:"]),
    "weighted-weights": (lambda: WeightedSampler(WEIGHTS, 10), lambda: WeightedSampler(WEIGHTS.flip(0), 10),
                         ["WeightedSampler with weights=sha256:"]),
    "weighted-replacement": (lambda: WeightedSampler(WEIGHTS, 10),
                             lambda: WeightedSampler(WEIGHTS, 10, replacement=False), ["replacement=True;"]),
    "entropy-num_samples": (lambda: EntropySampler(PROBS, 10), lambda: EntropySampler(PROBS, 11),
                            ["EntropySampler with num_samples=10;", "num_samples=11"]),
    "entropy-scores": (lambda: EntropySampler(PROBS, 10), lambda: EntropySampler(PROBS.flip(0), 10),
                       ["plan_fingerprint"]),
}


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_state_from_a_differently_built_sampler_is_refused(name: str) -> None:
    make_a, make_b, fragments = MISMATCHES[name]
    a = make_a()
    a.set_epoch(1)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = via_json(a.state_dict())
    b = make_b()
    with pytest.raises(ValueError) as info:
        b.load_state_dict(state)
    for f in fragments:
        assert f in str(info.value), str(info.value)
    make_a().load_state_dict(state)  # the same build takes it


def test_state_refused_through_the_loader() -> None:
    a, _ = _sampler_loader("weighted", 0)()
    it = iter(a)
    next(it)
    state = via_json(a.state_dict())
    other = WeightedSampler(WEIGHTS.flip(0), 18, seed=5)
    b = StatefulDataLoader(IndexDataset(N), batch_size=BATCH, sampler=other)
    b.load_state_dict(state)
    with pytest.raises(ValueError, match="WeightedSampler with weights=sha256:"):
        list(b)


def test_another_rank_and_an_old_state_are_accepted() -> None:
    def make(rank: int) -> RandomSubsetSampler:
        s = RandomSubsetSampler(50, 20, num_replicas=2, rank=rank, seed=3)
        s.set_epoch(2)
        return s

    r0 = make(0)
    it = iter(r0)
    for _ in range(4):
        next(it)
    state = via_json(r0.state_dict())
    assert torch.load(_saved(state), weights_only=True) == state
    r1 = make(1)
    r1.load_state_dict(state)  # rank 0's state on rank 1 (a lockstep checkpoint saved by rank 0 only)
    r1.set_epoch(2)
    assert list(r1) == list(make(1))[4:]
    old = make(1)
    old.load_state_dict({"epoch": 2, "position": 4})  # saved before states recorded what they belong to
    assert list(old) == list(make(1))[4:]


def _saved(state: Any):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _stream_state(ds: WeightedWebDataset, k: int = 5) -> dict:
    ds.set_epoch(1)
    it = iter(ds)
    for _ in range(k):
        next(it)
    return via_json(ds.state_dict())


def test_stream_state_from_another_stream_is_refused(manifest: str, tmp_path) -> None:
    other = fx.write(tmp_path, fx.make_samples(40, seed=2, vary=False, prefix="t"), maxcount=10)

    def ds(**kw: Any) -> WeightedWebDataset:
        opts = {"manifest": manifest, "num_classes": 3, "seed": 7, "shuffle_buffer": 5}
        opts.update(kw)
        return WeightedWebDataset(None, **opts)

    state = _stream_state(ds())
    assert torch.load(_saved(state), weights_only=True) == state
    cases = [
        (ds(manifest=other), "shards=sha256:"),
        (ds(shuffle_buffer=6), "shuffle_buffer=5; this one has shuffle_buffer=6"),
        (ds(shuffle=False), "shuffle=True"),
        (ds(world_size=2, rank=0), "world_size=1, samples_per_rank=40; this one has world_size=2, samples_per_rank=20"),
        (ds(samples_per_rank=30), "samples_per_rank=40; this one has samples_per_rank=30"),
        (ds(balance=True), "balance=False; this one has balance=True"),
    ]
    for target, fragment in cases:
        with pytest.raises(ValueError) as info:
            target.load_state_dict(state)
        assert fragment in str(info.value) and "WeightedWebDataset" in str(info.value), str(info.value)
    # the same build takes it and continues; a state without the record (older format) too, unchecked
    ref = ds()
    ref.set_epoch(1)
    rest = [s["__key__"] for s in ref][5:]
    for st in (state, {k: v for k, v in state.items() if k != "config"}):
        fresh = ds()
        fresh.load_state_dict(st)
        fresh.set_epoch(1)
        assert [s["__key__"] for s in fresh] == rest


def test_stage_state_from_another_stage_is_refused() -> None:
    samples = [{"__key__": f"k{i:03d}", "cls": int(LABELS[i]), "s": float(PROBS[i, 0])} for i in range(N)]
    pairs = [
        (balance_classes(num_classes=3, target=[1, 1, 2]), balance_classes(num_classes=3, target=[1, 2, 1]),
         "target=sha256:"),
        (with_class_weights(num_classes=3), with_class_weights(num_classes=3, scheme="sqrt_inverse"),
         "scheme='inverse'; this one has scheme='sqrt_inverse'"),
        (select_by_entropy(5, score_key="s"), select_by_entropy(6, score_key="s"), "k=5; this one has k=6"),
    ]
    for a, b, fragment in pairs:
        it = a(dict(s) for s in samples)
        next(it)
        state = via_json(a.state_dict())
        with pytest.raises(ValueError) as info:
            b.load_state_dict(state)
        assert fragment in str(info.value), str(info.value)


def test_stream_state_refused_in_the_workers(manifest: str) -> None:
    loader, set_epoch = _stream_loader(manifest, 2)()
    set_epoch(0)
    it = iter(loader)
    next(it)
    next(it)
    state = via_json(loader.state_dict())
    del it
    other, other_set_epoch = _stream_loader(manifest, 2, shuffle=False)()
    other.load_state_dict(state)
    other_set_epoch(0)
    with pytest.raises(ValueError, match="shuffle=True, shuffle_buffer=5; this one has shuffle=False, shuffle_buf"):
        list(other)
