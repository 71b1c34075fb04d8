"""WeightedWebDataset composed and taken apart: the rank x worker partition as a pure function (hypothesis), the
cursor's JSON, user stages, a plan of indices, ``__index__`` for scoring, epochs that advance by themselves,
the README's configuration, resuming with another ``num_workers``, and one-pass balancing of sorted input.

Real shards (tests/_support/shard_fixtures.py), real StatefulDataLoader with 0 and 2 workers, states through JSON.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

import torch_pretrain_update as tpu
from tests._support import shard_fixtures as fx
from tests._support.resume_harness import check_resume, to_py
from torch_pretrain_update import WeightedWebDataset, balance_classes

pytestmark = pytest.mark.timeout(120)

N = 60
SETTINGS = settings(max_examples=40, deadline=None)


def keys(batch: list[dict]) -> list[str]:
    return [s["__key__"] for s in batch]


def index_of(key: str) -> int:
    return int(key[1:])  # make_samples' keys are s00000, s00001, ... in written (= manifest) order


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, list[dict]]:
    """60 samples in 7 shards of 10 (the last 0..9 differ by maxsize: uneven), 3 classes."""
    d = tmp_path_factory.mktemp("compose")
    samples = fx.make_samples(N, num_classes=3, seed=2)
    return fx.write(d, samples, maxcount=10, maxsize=6000), samples


def stream(man: str, **kw: Any) -> WeightedWebDataset:
    return WeightedWebDataset(None, manifest=man, num_classes=3, seed=kw.pop("seed", 5), shuffle_buffer=4, **kw)


# ------------------------------------------------------------------------------------------ partition: a pure function
def _epoch_positions(layout: Any, plan: Any, epoch: int) -> list[int]:
    """A reader's samples as positions in the epoch's order (shard order, then positions in the shard)."""
    from torch_pretrain_update.data.partition import shard_order

    order = shard_order(layout, epoch)
    start, at = {}, 0
    for s in order:
        start[s] = at
        at += layout.counts[s]
    return [start[seg.shard] + p for seg in plan.segments for p in range(seg.start, seg.stop)]


counts_st = st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=7).filter(lambda c: sum(c) > 0)


@SETTINGS
@given(counts=counts_st, world=st.integers(1, 4), workers=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       epoch=st.integers(0, 20), shuffle=st.booleans(), drop_last=st.booleans())
def test_partition_every_sample_once_per_epoch(counts, world, workers, seed, epoch, shuffle, drop_last):
    from torch_pretrain_update.data.partition import Layout, partition, rank_length

    total = sum(counts)
    if drop_last and total < world:
        return
    length = rank_length(total, world, drop_last=drop_last)
    layout = Layout(num_shards=len(counts), counts=tuple(counts), num_replicas=world, seed=seed, shuffle=shuffle,
                    length=length)
    ranks = []
    for r in range(world):
        pieces = [partition(layout, rank=r, num_workers=workers, worker_id=w, epoch=epoch) for w in range(workers)]
        assert [p.quota for p in pieces] == [len(_epoch_positions(layout, p, epoch)) for p in pieces]
        assert sum(p.quota for p in pieces) == length and max(p.quota for p in pieces) - min(
            p.quota for p in pieces) <= 1
        seq = [x for p in pieces for x in _epoch_positions(layout, p, epoch)]
        # the rank's samples and their order do not depend on the number of workers, and calls are pure
        alone = partition(layout, rank=r, num_workers=1, worker_id=0, epoch=epoch)
        assert _epoch_positions(layout, alone, epoch) == seq
        assert partition(layout, rank=r, num_workers=workers, worker_id=0, epoch=epoch) == pieces[0]
        ranks.append(seq)
    assert {len(s) for s in ranks} == {length}  # equal per-rank counts
    everything = [x for s in ranks for x in s]
    # every sample exactly once, in epoch order, then at most W - 1 padding repeats from the start (or truncated)
    assert everything == [i % total for i in range(world * length)]
    assert (world * length - total <= world - 1) if not drop_last else (total - world * length <= world - 1)


@SETTINGS
@given(num_shards=st.integers(1, 9), world=st.integers(1, 3), workers=st.integers(1, 3), seed=st.integers(0, 999),
       epoch=st.integers(0, 9))
def test_partition_by_shards_gives_each_shard_to_one_reader(num_shards, world, workers, seed, epoch):
    from torch_pretrain_update.data.partition import Layout, partition

    layout = Layout(num_shards=num_shards, counts=None, num_replicas=world, seed=seed, split="shards")
    readers = [(r, w) for r in range(world) for w in range(workers)]
    if num_shards < world * workers:
        with pytest.raises(ValueError, match=rf"{num_shards} shard\(s\) for {world} rank\(s\) x {workers} DataLoader"):
            partition(layout, rank=0, num_workers=workers, worker_id=0, epoch=epoch)
        return
    got = [seg.shard for r, w in readers
           for seg in partition(layout, rank=r, num_workers=workers, worker_id=w, epoch=epoch).segments]
    assert sorted(got) == list(range(num_shards))


@SETTINGS
@given(counts=counts_st, data=st.data(), world=st.integers(1, 3), workers=st.integers(1, 3))
def test_partition_of_a_plan_reads_it_in_order(counts, data, world, workers):
    from torch_pretrain_update.data.partition import Layout, partition, rank_length

    total = sum(counts)
    plan = data.draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=40))
    length = rank_length(len(plan), world)
    layout = Layout(num_shards=len(counts), counts=tuple(counts), num_replicas=world, length=length,
                    indices=np.asarray(plan, dtype=np.int64))
    starts = layout.starts()
    for r in range(world):
        got = []
        for w in range(workers):
            for seg in partition(layout, rank=r, num_workers=workers, worker_id=w, epoch=3).segments:
                assert list(seg.picks) == sorted(seg.picks) and seg.start == seg.picks[0] < seg.stop
                assert seg.stop == seg.picks[-1] + 1 <= counts[seg.shard]
                got += [starts[seg.shard] + p for p in seg.picks]
        assert got == [plan[i % len(plan)] for i in range(r * length, (r + 1) * length)]


# ------------------------------------------------------------------------------------------------ the cursor's JSON
def test_cursor_json_round_trip_and_an_older_state(data):
    from torch_pretrain_update.data.cursor import Cursor

    man, _ = data
    ds = stream(man, balance=True)
    it = iter(ds)
    head = [next(it)["__key__"] for _ in range(23)]
    state = json.loads(json.dumps(ds.state_dict()))
    rest = [s["__key__"] for s in it]
    cursor = state["cursor"]
    assert Cursor.from_json(cursor).to_json(cursor["stats"]) == cursor
    assert len(head) + len(rest) == N
    # a state saved before the loader's num_workers was recorded (the previous layout) still resumes
    old = json.loads(json.dumps(state))
    del old["loader_workers"], old["cursor"]["loader_workers"]
    fresh = stream(man, balance=True)
    fresh.load_state_dict(old)
    assert [s["__key__"] for s in fresh] == rest
    broken = json.loads(json.dumps(state))
    del broken["cursor"]["segment"]
    with pytest.raises(ValueError, match=r"state\['cursor'\] lacks 'segment'"):
        stream(man, balance=True).load_state_dict(broken)
    broken["cursor"]["segment"] = -1
    with pytest.raises(ValueError, match=r"state\['cursor'\]\['segment'\] must be >= 0"):
        stream(man, balance=True).load_state_dict(broken)


# ---------------------------------------------------------------------------------------------- one spelling of ranks
def test_world_size_is_a_deprecated_alias_of_num_replicas(data):
    man, _ = data
    with pytest.warns(DeprecationWarning, match="world_size= is deprecated; pass num_replicas="):
        old = stream(man, rank=1, world_size=2)
    new = stream(man, rank=1, num_replicas=2)
    assert [s["__key__"] for s in old] == [s["__key__"] for s in new] and new.num_replicas == 2
    with pytest.warns(DeprecationWarning, match="world_size is deprecated; use num_replicas"):
        assert new.world_size == 2
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="num_replicas=2, world_size=3"):
        stream(man, rank=1, num_replicas=2, world_size=3)


def test_each_stage_has_one_public_form():
    assert tpu.with_class_weights is tpu.ClassWeightStage
    assert tpu.with_entropy_weights is tpu.EntropyWeightStage
    assert tpu.balance_classes is tpu.BalanceStage
    assert tpu.select_by_entropy is tpu.SelectStage
    assert isinstance(tpu.balance_classes(num_classes=2), tpu.BalanceStage)


def test_keyed_draws_are_the_blake2b_formula():
    """The stages' per-sample draws: BLAKE2b of the sample's identity keyed by (seed, epoch, draw id)."""
    import hashlib

    from torch_pretrain_update._rng import KEYED_ACCEPT, KEYED_POISSON, keyed_seed, keyed_uniform

    h = hashlib.blake2b(b"k7\x00mem", digest_size=8, key=b"3:2:1").digest()
    assert keyed_seed(3, 2, b"k7\x00mem", KEYED_POISSON) == int.from_bytes(h, "little")
    h = hashlib.blake2b(b"k7", digest_size=8, key=b"3:2:0").digest()
    assert keyed_uniform(3, 2, b"k7", KEYED_ACCEPT) == ((int.from_bytes(h, "little") >> 11) + 0.5) / 2.0**53


# ------------------------------------------------------------------------------------------------------ user stages
class RunningCount:
    """A stateful user stage: writes how many samples it has passed in this epoch into each one."""

    def __init__(self) -> None:
        self.n = 0

    def set_epoch(self, epoch: int) -> None:
        self.n = 1000 * epoch

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]

    def __call__(self, src):
        for s in src:
            self.n += 1
            s["running"] = self.n
            yield s


def test_user_stages_run_after_the_checks_and_before_the_weights(data):
    man, samples = data
    urls = tpu.read_manifest(man).urls
    seen = []

    def relabel(s: dict) -> dict:
        seen.append(type(s["cls"]))
        s["cls"] = s["cls"] % 2  # what the weights must see
        return s

    ds = WeightedWebDataset(urls, num_classes=3, shuffle=False, stages=[wds.map(relabel), RunningCount()])
    out = list(ds)
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples] and set(seen) == {int}
    assert [s["running"] for s in out] == list(range(1, N + 1))
    ref = tpu.with_class_weights(num_classes=3)([{"cls": s["cls"] % 2} for s in samples])
    assert [float(s["weight"]) for s in out] == [float(r["weight"]) for r in ref]
    # a filtering stage with a manifest: the fixed length per rank is kept by padding repeats
    odd = stream(man, shuffle=False, stages=[wds.select(lambda s: s["__index__"] % 2 == 1)])
    got = [s["__index__"] for s in odd]
    assert got == list(range(1, N, 2)) + list(range(1, N, 2)) and odd.stats["padded_samples"] == N // 2
    with pytest.raises(TypeError, match=r"stages\[1\] must be callable"):
        stream(man, stages=[wds.map(relabel), 3])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_user_stage_state_resumes_exactly(data, num_workers):
    man, _ = data

    def make():
        ds = stream(man, stages=[RunningCount(), wds.map(lambda s: {**s, "twice": 2 * s["running"]})], balance=True)
        collate = lambda b: [(s["__key__"], s["running"], s["twice"], float(s["weight"])) for s in b]  # noqa: E731
        return StatefulDataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate), ds.set_epoch

    assert check_resume(make, epochs=2, break_points=[0, 3, 8] if num_workers else [0, 1, 6, 14, 15]) >= 6


# ------------------------------------------------------------------------------------------------ a plan of indices
PLAN = [5, 3, 3, 40, 41, 42, 0, 59, 17, 18, 2, 33, 33, 33, 10, 51, 9, 26]


def test_indices_stream_the_plan_in_order(data):
    man, samples = data
    got = list(stream(man, indices=PLAN))
    assert [s["__index__"] for s in got] == PLAN and [index_of(s["__key__"]) for s in got] == PLAN
    assert got[1] is not got[2] and got[1]["__key__"] == got[2]["__key__"]  # a repeat is a copy
    # two ranks x two workers: each rank streams its contiguous piece of the plan (padding wraps to the start)
    for r in range(2):
        ds = stream(man, indices=torch.tensor(PLAN), rank=r, num_replicas=2)
        b = list(StatefulDataLoader(ds, batch_size=3, num_workers=2, collate_fn=keys))
        piece = [k for x in b[0::2] for k in x] + [k for x in b[1::2] for k in x]  # worker 0's half, then 1's
        assert [index_of(k) for k in piece] == PLAN[9 * r: 9 * r + 9]
    with pytest.raises(ValueError, match=r"indices: 60 is out of range \[0, 60\)"):
        stream(man, indices=[1, 60])
    with pytest.raises(ValueError, match="indices needs per-shard counts"):
        WeightedWebDataset(tpu.read_manifest(man).urls, num_classes=3, indices=[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_indices_resume_exactly(data, num_workers):
    man, _ = data
    plan = np.random.default_rng(0).integers(0, N, 45)

    def make():
        ds = stream(man, indices=plan, balance=True)
        return StatefulDataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=keys), ds.set_epoch

    assert check_resume(make, epochs=2, break_points=[0, 5, 12] if num_workers else [0, 1, 7, 11, 12]) >= 6


def test_index_is_the_global_index_and_scores_the_data(data):
    man, _ = data
    shard_ds = tpu.ShardDataset(man)
    out = list(stream(man))
    assert sorted(s["__index__"] for s in out) == list(range(N))
    assert all(shard_ds[s["__index__"]]["__key__"] == s["__key__"] for s in out)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    from_stream = tpu.score_dataset(model, stream(man, seed=8), input_key="npy", batch_size=7)
    from_map = tpu.score_dataset(model, shard_ds, input_key="npy", batch_size=7)
    torch.testing.assert_close(from_stream, from_map, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True)])
def test_epochs_advance_without_set_epoch(data, num_workers, persistent):
    man, _ = data

    def loader(ds):
        return StatefulDataLoader(ds, batch_size=8, num_workers=num_workers, persistent_workers=persistent,
                                  collate_fn=keys)

    explicit, ds = [], stream(man)
    ref = loader(ds)
    for e in range(3):
        ds.set_epoch(e)
        explicit.append([to_py(b) for b in ref])
    auto = stream(man)
    auto_loader = loader(auto)
    assert [[to_py(b) for b in auto_loader] for _ in range(3)] == explicit
    assert explicit[0] != explicit[1] != explicit[2]
    assert auto.epoch == 2 and ds.epoch == 2


def test_epochs_advance_in_the_main_process_and_under_torchdata_nodes(data):
    from torchdata.nodes import IterableWrapper, Loader

    man, _ = data
    ref = stream(man)
    by_epoch = []
    for e in range(3):
        ref.set_epoch(e)
        by_epoch.append([s["__key__"] for s in ref])
    ds = stream(man)
    assert [[s["__key__"] for s in ds] for _ in range(2)] == by_epoch[:2]
    assert json.loads(json.dumps(ds.state_dict()))["epoch"] == 1  # the epoch in the state: the one just read
    ds.set_epoch(0)  # set_epoch wins, like DistributedSampler's
    assert [s["__key__"] for s in ds] == by_epoch[0]
    nodes = Loader(IterableWrapper(stream(man)))
    assert [[s["__key__"] for s in nodes] for _ in range(3)] == by_epoch


def _train_without_set_epoch(make, epochs: int, *, state=None, stop=None):
    """A Lightning-style loop (no set_epoch); with ``stop=(epoch, k)`` it checkpoints after k batches of that
    epoch (k=None: at the epoch's end) and stops. Returns (batches per epoch, checkpoint)."""
    loader = make()
    if state is not None:
        loader.load_state_dict(state)
    seen = []
    for e in range(epochs):
        batches = []
        for b in loader:
            batches.append(to_py(b))
            if stop is not None and stop[0] == e and stop[1] == len(batches):
                return seen + [batches], json.loads(json.dumps(loader.state_dict()))
        seen.append(batches)
        if stop is not None and stop == (e, None):
            return seen, json.loads(json.dumps(loader.state_dict()))
    return seen, None


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [(1, 3), (1, None), (0, None)], ids=["mid-epoch", "end-of-epoch-1", "end-of-epoch-0"])
def test_resume_without_set_epoch_continues_the_epochs(data, num_workers, stop):
    man, _ = data

    def make():
        return StatefulDataLoader(stream(man), batch_size=8, num_workers=num_workers, collate_fn=keys)

    full, _ = _train_without_set_epoch(make, 3)
    head, ckpt = _train_without_set_epoch(make, 3, stop=stop)
    left = 3 - stop[0] - (stop[1] is None)
    tail, _ = _train_without_set_epoch(make, left, state=ckpt)
    if stop[1] is not None:  # the interrupted epoch goes on where it stopped
        head[-1] += tail.pop(0)
    assert head + tail == full and len(full) == 3 and full[0] != full[1] != full[2]


# ------------------------------------------------------------------------------------------------- README snippet
def test_readme_configuration_one_shard_four_workers(tmp_path):
    """README: write_shards(maxcount=10_000) into one shard, StatefulDataLoader(num_workers=4): every sample once."""
    samples = fx.make_samples(45, seed=4)
    man = tpu.write_shards(samples, str(tmp_path / "data-%06d.tar"), maxcount=10_000)
    assert len(tpu.read_manifest(man).shards) == 1
    ds = WeightedWebDataset(None, manifest=man, num_classes=3, scheme="inverse", seed=0)
    loader = StatefulDataLoader(ds, batch_size=8, num_workers=4)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["__key__"]) == sorted(s["__key__"] for s in samples)
    assert batches[0]["weight"].dtype == torch.float32 and batches[0]["npy"].shape[1:] == (4,)
    assert len(batches) == ds.batches_per_rank(8, num_workers=4)


# ------------------------------------------------------------------------------------ resuming with other num_workers
# (3, 2) fails the same way but torchdata then takes ~10 s to shut the refused loader's workers down
@pytest.mark.parametrize("saved, resumed", [(2, 3), (2, 1), (1, 2)])
def test_resume_with_another_num_workers_names_both(data, saved, resumed):
    man, _ = data

    def loader(nw):
        return StatefulDataLoader(stream(man), batch_size=4, num_workers=nw, collate_fn=keys)

    a = loader(saved)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))
    del it, a  # its workers end here, not in the next loader's forked workers
    b = loader(resumed)
    b.load_state_dict(state)
    try:
        list(b)
    except ValueError as exc:  # kept as text: a traceback kept alive keeps the failed loader's workers (~10 s)
        msg = str(exc)
    else:
        pytest.fail("a state saved with another num_workers was accepted")
    assert f"saved by a DataLoader with num_workers={saved}; this one has num_workers={resumed}" in msg, msg
    assert f"build the loader with num_workers={saved}" in msg


# ------------------------------------------------------------------------------------- one-pass balancing: mixed input
def _labelled(labels: list[int]) -> list[dict]:
    return [{"__key__": f"k{i:05d}", "cls": y} for i, y in enumerate(labels)]


def test_balancing_sorted_input_warns_once_and_counts_the_runs():
    sorted_input = _labelled([0] * 300 + [1] * 300 + [2] * 300)
    stage = balance_classes(num_classes=3, seed=0)
    with pytest.warns(UserWarning, match="looks sorted or clustered by class") as record:
        out = [s["cls"] for s in stage(sorted_input)]
    assert len([w for w in record if "sorted" in str(w.message)]) == 1  # once per stage
    assert stage.stats["long_runs"] == 2  # the runs of classes 1 and 2 (a first run cannot be judged)
    shares = np.bincount(out, minlength=3) / len(out)
    assert np.abs(shares - 1 / 3).max() > 0.1, shares  # why it warns: far from the target
    mixed = _labelled(random.Random(0).sample([0] * 300 + [1] * 300 + [2] * 300, 900))
    stage = balance_classes(num_classes=3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = [s["cls"] for s in stage(mixed)]
    assert stage.stats["long_runs"] == 0
    assert np.abs(np.bincount(out, minlength=3) / len(out) - 1 / 3).max() < 0.03


def test_balancing_a_large_imbalanced_mixed_stream_never_warns():
    labels = np.random.default_rng(1).choice(3, 20_000, p=[0.01, 0.09, 0.9]).tolist()
    stage = balance_classes(num_classes=3, seed=1, prior_counts=[200, 1800, 18000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in stage(_labelled(labels)):
            pass
    assert stage.stats["long_runs"] == 0


def test_balancing_run_state_resumes_and_an_older_state_loads():
    inputs = _labelled([0] * 50 + [1] * 50)
    with pytest.warns(UserWarning):
        full = [s["__key__"] for s in balance_classes(num_classes=2, seed=3)(inputs)]
    stage = balance_classes(num_classes=2, seed=3)
    it = stage(inputs)
    head = [next(it)["__key__"] for _ in range(40)]
    state = json.loads(json.dumps(stage.state_dict()))
    assert state["run"][1] > 0 and state["stats"]["long_runs"] == 0
    fresh = balance_classes(num_classes=2, seed=3)
    fresh.load_state_dict(state)
    with pytest.warns(UserWarning):
        assert head + [s["__key__"] for s in fresh(inputs[state["position"]:])] == full
    assert fresh.stats["long_runs"] == 1
    del state["run"], state["stats"]["long_runs"]  # saved before runs were watched
    balance_classes(num_classes=2, seed=3).load_state_dict(state)


def test_readme_pipeline_balances_class_sorted_shards(tmp_path):
    """README's pipeline (a shuffle before balance_classes) over shards written class by class."""
    samples = [{"__key__": f"s{i:05d}", "cls": i // 200, "npy": np.zeros(2, np.float32)} for i in range(600)]
    man = tpu.write_shards(samples, str(tmp_path / "sorted-%06d.tar"), maxcount=100)
    urls = tpu.read_manifest(man).urls
    for seed in range(2):
        pipe = wds.DataPipeline(wds.SimpleShardList(urls), tpu.strict_tarfile_to_samples(),
                                wds.shuffle(1000, seed=seed), tpu.safe_decode(),
                                tpu.with_class_weights(num_classes=3, momentum=0.01),
                                balance_classes(num_classes=3, seed=0))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            out = [s["cls"] for s in pipe]
        assert math.isclose(len(out), 600, rel_tol=0.1)
        assert np.abs(np.bincount(out, minlength=3) / len(out) - 1 / 3).max() < 0.05
