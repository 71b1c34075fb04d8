"""Multi-process correctness on real ``torch.distributed`` (gloo) process groups on this machine.

One spawned group per world size runs several checks (process start-up dominates the cost on 2 cores); each
rank saves what it saw and the parent process compares against single-process references it computes itself.
Every launch has a deadline after which its processes are terminated, so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from torch_pretrain_update.data.stream import WeightedWebDataset
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler
from torch_pretrain_update.sampling.weighted_sampler import WeightedSampler
from torch_pretrain_update.scoring.distributed import broadcast_seed, score_dataset, score_shares
from torch_pretrain_update.training.distill import KDLoss
from torch_pretrain_update.training.freeze import FrozenCheck
from torch_pretrain_update.training.optim import partial_optimizer

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_DEADLINE_S = 150


# ----- launching a group --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, tasks: list[str]) -> None:
    """Entry point of a spawned rank: join the group, run each task, save ``{task: result or error}``."""
    torch.set_num_threads(1)
    # A spawned process defaults to spawning its own children; torchrun's ranks (fresh interpreters) fork their
    # DataLoader workers. Do the same: spawning workers would re-import everything (~10 s each on 2 cores).
    mp.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t0 = time.perf_counter()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Any] = {"seconds": {"init": time.perf_counter() - t0}}
    try:
        for name in tasks:
            t0 = time.perf_counter()
            try:
                results[name] = TASKS[name](rank, world, Path(out_dir))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
            results["seconds"][name] = time.perf_counter() - t0
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def launch(world: int, tasks: list[str], out_dir: Path, deadline_s: float = LAUNCH_DEADLINE_S) -> list[dict]:
    """Run ``tasks`` on a fresh ``world``-rank gloo group; return each rank's results (rank order)."""
    ctx = mp.start_processes(
        _rank_main,
        args=(world, _free_port(), str(out_dir), tasks),
        nprocs=world,
        join=False,
        # forked, like the DataLoader workers everywhere in this suite: a spawned rank re-imports torch, this
        # package and this module (~4 s of CPU each, 5 ranks per run); each rank still builds its own group
        start_method="fork",
    )
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() > end:
                raise TimeoutError(f"{world}-rank group did not finish {tasks} within {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def task_result(results: list[dict], name: str) -> list[Any]:
    """One task's per-rank results; fails the test with the rank's traceback if it raised."""
    out = []
    for rank, res in enumerate(results):
        value = res.get(name)
        if value is None:
            pytest.fail(f"task {name!r} did not run on rank {rank}")
        if isinstance(value, dict) and "error" in value:
            pytest.fail(f"task {name!r} failed on rank {rank}:\n{value['error']}")
        out.append(value)
    return out


# ----- shared fixtures: models and data identical on every process ---------------------------------------------
def _score_data(n: int = 1003, d: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return TensorDataset(x, y)


def _score_model(d: int = 12, c: int = 5) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(d, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.5), nn.Linear(48, c))
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode matters
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()  # score_dataset must switch to eval (dropout off) and back
    return model


# ----- sampler configurations: built with num_replicas/rank left None inside the ranks ------------------------
N_ITEMS = 103  # not a multiple of 2 or 3: the rank split pads (or truncates)


def _labels() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.multinomial(torch.tensor([0.6, 0.25, 0.1, 0.05]), N_ITEMS, replacement=True, generator=g)


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    w = torch.rand(N_ITEMS, generator=g, dtype=torch.float64)
    w[::7] = 0.0  # never drawn
    return w


def _probs() -> torch.Tensor:
    g = torch.Generator().manual_seed(13)
    return torch.softmax(3 * torch.randn(N_ITEMS, 4, generator=g), dim=1)


SAMPLERS: dict[str, Callable[..., Any]] = {
    "random_subset": lambda **kw: RandomSubsetSampler(N_ITEMS, 61, seed=5, **kw),
    "random_subset_replacement_drop_last": lambda **kw: RandomSubsetSampler(
        N_ITEMS, 150, replacement=True, seed=5, drop_last=True, **kw
    ),
    "stratified": lambda **kw: StratifiedSampler(_labels(), 50, min_per_class=2, seed=5, **kw),
    "class_balanced": lambda **kw: ClassBalancedSampler(_labels(), samples_per_class="max", seed=5, **kw),
    "class_balanced_unshuffled": lambda **kw: ClassBalancedSampler(
        _labels(), samples_per_class=20, shuffle=False, seed=5, **kw
    ),
    "weighted_replacement": lambda **kw: WeightedSampler(_weights(), 70, replacement=True, seed=5, **kw),
    "weighted_no_replacement": lambda **kw: WeightedSampler(_weights(), 41, replacement=False, seed=5, **kw),
    "entropy_topk_random": lambda **kw: EntropySampler(_probs(), 40, random_fraction=0.3, seed=5, **kw),
    "entropy_proportional_replacement": lambda **kw: EntropySampler.from_scores(
        _weights(), 77, mode="proportional", replacement=True, seed=5, **kw
    ),
    "entropy_stratified_drop_last": lambda **kw: EntropySampler(
        _probs(), 58, score="margin", stratify=_labels(), mode="proportional", seed=5, drop_last=True, **kw
    ),
}
EPOCHS = (0, 3)


# ----- tasks run inside the ranks ------------------------------------------------------------------------------
def _task_samplers(rank: int, world: int, out: Path) -> dict:
    res = {}
    for name, make in SAMPLERS.items():
        sampler = make()  # num_replicas and rank from the process group
        streams = []
        for epoch in EPOCHS:
            sampler.set_epoch(epoch)
            streams.append(list(sampler))
        res[name] = {"world": sampler.num_replicas, "rank": sampler.rank, "len": len(sampler), "streams": streams}
    return res


def _keys(batch: list[dict]) -> list[str]:
    return [s["__key__"] for s in batch]


STREAM_BATCH = 4


def _task_stream(rank: int, world: int, out: Path) -> dict:
    from torch.utils.data import DataLoader

    ds = WeightedWebDataset(None, manifest=out / "shards" / "train-manifest.json", num_classes=3, seed=13)
    loader = DataLoader(ds, batch_size=STREAM_BATCH, num_workers=2, collate_fn=_keys)
    epochs = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        batches = []
        for batch in loader:
            batches.append(batch)
            # what DDP does every step: a collective over all ranks (would hang on unequal batch counts)
            dist.all_reduce(torch.ones(1))
        epochs.append(batches)
    return {
        "world": ds.world_size,
        "rank": ds.rank,
        "epochs": epochs,
        "batches_per_rank": ds.batches_per_rank(STREAM_BATCH, num_workers=2),
    }


def _task_score(rank: int, world: int, out: Path) -> dict:
    model, ds = _score_model(), _score_data()
    res = {}
    for batch_size in (100, 256, 1003, 4096):  # 11 / 4 / 1 / 1 batches: uneven shares and empty ranks
        res[batch_size] = score_dataset(model, ds, batch_size=batch_size)
    res["margin"] = score_dataset(model, ds, score="margin", batch_size=64, num_workers=2)
    res["training_after"] = model.training
    res["empty"] = score_dataset(model, _score_data(0), batch_size=8)
    return res


class _FailOnRankOne(nn.Module):
    """Emits NaN logits on rank 1 only: every rank must raise (not hang in the all-gather)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3)
        if dist.get_rank() == 1:
            out[0, 0] = float("nan")
        return out


def _task_score_failure(rank: int, world: int, out: Path) -> dict:
    try:
        score_dataset(_FailOnRankOne(), _score_data(40), batch_size=8)
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}


def _task_length_mismatch(rank: int, world: int, out: Path) -> dict:
    try:
        score_dataset(_score_model(), _score_data(50 + rank), batch_size=8)
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}


def _task_broadcast_seed(rank: int, world: int, out: Path) -> dict:
    return {
        "given": broadcast_seed(1000 + rank),
        "random": broadcast_seed(None),
        "from_last": broadcast_seed(2000 + rank, src=world - 1),
    }


DDP_N, DDP_DIM, DDP_CLASSES = 96, 10, 4
DDP_SELECT, DDP_BATCH, DDP_STEPS = 48, 8, 3  # 48 selected / 2 ranks / batches of 8 = 3 steps per rank


def _ddp_data() -> TensorDataset:
    g = torch.Generator().manual_seed(21)
    x = torch.randn(DDP_N, DDP_DIM, generator=g)
    y = torch.randint(0, DDP_CLASSES, (DDP_N,), generator=g)
    return TensorDataset(x, y)


def _ddp_models() -> tuple[nn.Module, nn.Module]:
    """(teacher, pretrained student): the same weights on every process, as if loaded from a checkpoint."""
    torch.manual_seed(22)
    teacher = nn.Sequential(nn.Linear(DDP_DIM, 32), nn.ReLU(), nn.Linear(32, DDP_CLASSES)).eval()
    student = nn.Sequential(
        nn.Linear(DDP_DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    with torch.no_grad():
        student[1].running_mean.normal_()
        student[1].running_var.uniform_(0.5, 2.0)
    return teacher, student


def _ddp_setup(student: nn.Module) -> Any:
    """Freeze the backbone (Linear + BatchNorm), train the two top layers with momentum and weight decay."""
    return partial_optimizer(
        student, torch.optim.SGD, trainable=["3.*", "5.*"], lr=0.2, momentum=0.9, weight_decay=0.01
    )


def _ddp_step(model: nn.Module, teacher: nn.Module, kd: nn.Module, optimizer: Any, x: Any, y: Any) -> None:
    with torch.no_grad():
        t = teacher(x)
    loss = kd(model(x), t, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _task_ddp(rank: int, world: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    teacher, student = _ddp_models()
    ds = _ddp_data()
    scores = score_dataset(student, ds, batch_size=32)  # student's uncertainty, gathered on every rank
    sampler = EntropySampler.from_scores(scores, DDP_SELECT, random_fraction=0.25, seed=broadcast_seed(9))
    optimizer = _ddp_setup(student)
    frozen = FrozenCheck(student)
    model = DistributedDataParallel(student)
    kd = KDLoss(temperature=2.0, alpha=0.7)
    model.train()
    sampler.set_epoch(0)
    seen = []
    for x, y in DataLoader(ds, batch_size=DDP_BATCH, sampler=sampler):
        seen.append(x)
        _ddp_step(model, teacher, kd, optimizer, x, y)
    indices = [ds.tensors[0].tolist().index(row) for b in seen for row in b.tolist()]
    rescored = score_dataset(model, ds, batch_size=40)  # a DDP wrapper: unwrapped; shares of 1 and 2 batches
    return {
        "scores": scores,
        "rescored": rescored,
        "training_after": model.training,
        "indices": indices,
        "steps": len(seen),
        "changed_frozen": frozen.changed(),
        "frozen_names": frozen.names,
        "state": {k: v.detach().clone() for k, v in student.state_dict().items()},
    }


def _task_subgroup(rank: int, world: int, out: Path) -> dict:
    """score_dataset and broadcast_seed on the subgroup {0, 2} of 3 ranks; rank 1 stays out."""
    sub = dist.new_group([0, 2])  # every rank must create it
    if rank == 1:
        return {"skipped": True}
    return {
        "scores": score_dataset(_score_model(), _score_data(), batch_size=100, group=sub),
        "seed": broadcast_seed(500 + rank, src=1, group=sub),  # group rank 1 = global rank 2
    }


TASKS: dict[str, Callable[[int, int, Path], Any]] = {
    "subgroup": _task_subgroup,
    "ddp": _task_ddp,
    "samplers": _task_samplers,
    "stream": _task_stream,
    "score": _task_score,
    "score_failure": _task_score_failure,
    "length_mismatch": _task_length_mismatch,
    "broadcast_seed": _task_broadcast_seed,
}

GROUP2_TASKS = ["samplers", "stream", "ddp", "score", "score_failure", "length_mismatch", "broadcast_seed"]
GROUP3_TASKS = ["samplers", "score", "subgroup"]
STREAM_SAMPLES = 51  # 2 ranks: 26 each, one padding repeat; 8 shards of <= 7 for 2 ranks x 2 workers


def _write_stream_shards(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"s{i:04d}", "cls": int(i % 3), "npy": rng.standard_normal(4).astype(np.float32)}
        for i in range(STREAM_SAMPLES)
    ]
    write_shards(samples, str(root / "shards" / "train-%06d.tar"), maxcount=7, mtime=0)
    return [s["__key__"] for s in samples]


@pytest.fixture(scope="module")
def group2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("group2")
    keys = _write_stream_shards(out)
    return {"results": launch(2, GROUP2_TASKS, out), "keys": keys}


@pytest.fixture(scope="module")
def group3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"results": launch(3, GROUP3_TASKS, tmp_path_factory.mktemp("group3"))}


# ----- score_dataset without a process group -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "batch_size", "world"), [(0, 4, 3), (1, 4, 3), (10, 3, 2), (1003, 100, 3), (7, 1, 7), (5, 8, 2)]
)
def test_score_shares_partition_on_batch_boundaries(n: int, batch_size: int, world: int) -> None:
    shares = score_shares(n, batch_size, world)
    assert len(shares) == world
    covered = [i for start, stop in shares for i in range(start, stop)]
    assert covered == list(range(n))  # contiguous, in order, disjoint, complete
    batches = [math.ceil((stop - start) / batch_size) for start, stop in shares]
    assert max(batches) - min(batches) <= 1
    for start, _ in shares:
        assert start % batch_size == 0 or start == n


def test_score_shares_world_size_is_a_deprecated_alias_of_num_replicas() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library's spelling warns about nothing
        assert score_shares(10, 3, num_replicas=2) == [(0, 6), (6, 10)]
        assert score_shares(10, 3, 2) == [(0, 6), (6, 10)]
    with pytest.warns(DeprecationWarning, match="score_shares: world_size= is deprecated; pass num_replicas=") as rec:
        assert score_shares(10, 3, world_size=2) == [(0, 6), (6, 10)]
    assert rec[0].filename == __file__  # the warning points at the caller's line
    with pytest.warns(DeprecationWarning):
        assert score_shares(7, 1, 3, world_size=3) == [(0, 2), (2, 4), (4, 7)]  # both, agreeing
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="num_replicas=2, world_size=3"):
        score_shares(10, 3, 2, world_size=3)
    with pytest.raises(TypeError, match="missing required argument: 'num_replicas'"):
        score_shares(10, 3)
    with pytest.raises(ValueError, match="num_replicas must be >= 1; got 0"):
        score_shares(10, 3, 0)


def test_a_group_without_a_process_group_is_refused_by_name() -> None:
    model, ds = _score_model(), _score_data(20)
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        score_dataset(model, ds, group=object())
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        broadcast_seed(3, group=object())


def test_score_dataset_input_key_must_be_a_non_empty_str_or_none() -> None:
    model, ds = _score_model(), _score_data(20)
    for bad in ("", 3, b"npy"):
        with pytest.raises(TypeError, match=r"input_key must be None or a non-empty str; got "):
            score_dataset(model, ds, input_key=bad)  # type: ignore[arg-type]


def test_score_dataset_single_process_matches_float64_reference() -> None:
    model, ds = _score_model(), _score_data()
    scores = score_dataset(model, ds, batch_size=100)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        logits = model(ds.tensors[0]).double().numpy()
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ref = -(np.exp(logp) * logp).sum(1)
    assert scores.dtype == torch.float32 and scores.shape == (len(ds),)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_score_dataset_bad_input() -> None:
    model, ds = _score_model(), _score_data(20)
    with pytest.raises(TypeError, match="dataset must be a map-style"):
        score_dataset(model, iter(ds))
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        score_dataset(model, ds, batch_size=0)
    with pytest.raises(ValueError, match="score must be one of"):
        score_dataset(model, ds, score="gini")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        score_dataset(lambda x: x, ds)
    bad_shape = r"model output must be a \(batch, classes\) tensor; got \(96,\) for a batch of 8"
    with pytest.raises(ValueError, match=bad_shape):
        score_dataset(nn.Flatten(0), ds, batch_size=8)
    nan_model = nn.Linear(12, 3)
    with torch.no_grad():
        nan_model.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"model output must be finite logits.*dataset indices 0\.\.7"):
        score_dataset(nan_model, ds, batch_size=8)
    assert not torch.is_inference_mode_enabled()


def test_score_dataset_custom_forward_for_dict_samples() -> None:
    model, base = _score_model(), _score_data(50)
    dicts = [{"x": base[i][0], "y": base[i][1]} for i in range(len(base))]
    got = score_dataset(model, dicts, batch_size=16, forward=lambda m, b: m(b["x"]), score="least_confidence")
    assert torch.equal(got, score_dataset(model, base, batch_size=16, score="least_confidence"))
    with pytest.raises(TypeError, match="Pass forward="):
        score_dataset(model, dicts, batch_size=16)


def test_broadcast_seed_without_group() -> None:
    assert broadcast_seed(5) == 5
    a, b = broadcast_seed(None), broadcast_seed(None)
    assert 0 <= a < 2**63 and 0 <= b < 2**63 and a != b
    with pytest.raises(TypeError, match="seed must be an int"):
        broadcast_seed(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="src must be <= 0; got 1"):
        broadcast_seed(1, src=1)


# ----- score_dataset and broadcast_seed on ranks ------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_score_dataset_on_ranks_equals_single_process(
    world: int, group2: dict[str, Any], group3: dict[str, Any]
) -> None:
    per_rank = task_result({2: group2, 3: group3}[world]["results"], "score")
    assert len(per_rank) == world
    torch.set_num_threads(1)  # the ranks ran with one thread: score the reference the same way
    try:
        model, ds = _score_model(), _score_data()
        for batch_size in (100, 256, 1003, 4096):
            ref = score_dataset(model, ds, batch_size=batch_size)
            for rank, res in enumerate(per_rank):
                assert torch.equal(res[batch_size], ref), (batch_size, rank)
        ref_margin = score_dataset(model, ds, score="margin", batch_size=64)
    finally:
        torch.set_num_threads(2)
    for res in per_rank:
        assert torch.equal(res["margin"], ref_margin)
        assert res["training_after"] is True
        assert res["empty"].shape == (0,)


@pytest.mark.timeout(240)
def test_score_dataset_and_broadcast_seed_on_a_subgroup(group3: dict[str, Any]) -> None:
    per_rank = task_result(group3["results"], "subgroup")
    assert per_rank[1] == {"skipped": True}
    torch.set_num_threads(1)
    try:
        ref = score_dataset(_score_model(), _score_data(), batch_size=100)
    finally:
        torch.set_num_threads(2)
    for rank in (0, 2):
        assert torch.equal(per_rank[rank]["scores"], ref)
        assert per_rank[rank]["seed"] == 502


@pytest.mark.timeout(240)
def test_score_dataset_failure_on_one_rank_raises_on_all(group2: dict[str, Any]) -> None:
    failure = task_result(group2["results"], "score_failure")
    assert failure[1]["raised"] == "ValueError" and "finite logits" in failure[1]["message"]
    assert failure[0]["raised"] == "RuntimeError" and "rank(s) [1]" in failure[0]["message"]
    mismatch = task_result(group2["results"], "length_mismatch")
    for res in mismatch:
        assert res["raised"] == "ValueError"
        assert "len(dataset) [50, 51]" in res["message"]


@pytest.mark.timeout(240)
def test_broadcast_seed_two_ranks(group2: dict[str, Any]) -> None:
    seeds = task_result(group2["results"], "broadcast_seed")
    assert [s["given"] for s in seeds] == [1000, 1000]
    assert [s["from_last"] for s in seeds] == [2001, 2001]
    assert seeds[0]["random"] == seeds[1]["random"]


# ----- samplers on 2 and 3 ranks ------------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_rank_streams_are_the_single_process_plan_split(
    name: str, world: int, group2: dict[str, Any], group3: dict[str, Any]
) -> None:
    group = {2: group2, 3: group3}[world]
    per_rank = [res[name] for res in task_result(group["results"], "samplers")]
    assert [(r["world"], r["rank"]) for r in per_rank] == [(world, r) for r in range(world)]
    single = SAMPLERS[name](num_replicas=1, rank=0)
    for e, epoch in enumerate(EPOCHS):
        single.set_epoch(epoch)
        plan = list(single)  # the single-process plan, independent of the world size
        assert len(plan) == len(single)
        n = len(plan)
        if single.drop_last:
            per = n // world
            padded = plan[: per * world]
        else:
            per = math.ceil(n / world)
            padded = plan + plan[: per * world - n]  # DistributedSampler padding: repeat the plan's start
        streams = [r["streams"][e] for r in per_rank]
        for rank, stream in enumerate(streams):
            assert per_rank[rank]["len"] == per == len(stream)
            assert stream == padded[rank::world], (name, world, epoch, rank)
        # gathered, the ranks hold exactly the padded plan: no index on two ranks beyond the padding
        assert Counter(i for s in streams for i in s) == Counter(padded)
        if len(set(plan)) == len(plan):  # a plan without repeats: ranks overlap only in the padded indices
            for a in range(world):
                for b in range(a + 1, world):
                    assert set(streams[a]) & set(streams[b]) <= set(plan[: per * world - n])
    first = [r["streams"][0] for r in per_rank]
    second = [r["streams"][1] for r in per_rank]
    if name != "class_balanced_unshuffled":
        assert first != second  # set_epoch changes the plan (so the comparison above is not vacuous)


# ----- WeightedWebDataset: 2 ranks x 2 DataLoader workers over real shards ------------------------------------
@pytest.mark.timeout(240)
def test_weighted_webdataset_two_ranks_two_workers(group2: dict[str, Any]) -> None:
    per_rank = task_result(group2["results"], "stream")
    keys = group2["keys"]
    assert [(r["world"], r["rank"]) for r in per_rank] == [(2, 0), (2, 1)]
    per = math.ceil(len(keys) / 2)
    for e in range(2):
        batches = [r["epochs"][e] for r in per_rank]
        counts = [len(b) for b in batches]
        assert counts[0] == counts[1] == per_rank[0]["batches_per_rank"]  # equal batch counts per rank
        got = [[k for b in rb for k in b] for rb in batches]
        assert [len(g) for g in got] == [per, per]
        seen = Counter(got[0] + got[1])
        assert set(seen) == set(keys)  # every sample in the epoch
        assert sum(seen.values()) - len(keys) == 2 * per - len(keys) == 1  # the one documented padding repeat
        assert len(set(got[0])) == per and len(set(got[1])) == per  # no sample twice on one rank
    # epochs differ (the shuffle is seeded by epoch), so the checks above saw two different splits
    assert per_rank[0]["epochs"][0] != per_rank[0]["epochs"][1]


# ----- DDP: EntropySampler + partial_optimizer + KDLoss, 2 ranks, 3 steps --------------------------------------
@pytest.mark.timeout(240)
def test_ddp_update_two_ranks(group2: dict[str, Any]) -> None:
    per_rank = task_result(group2["results"], "ddp")
    teacher, student = _ddp_models()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    ds = _ddp_data()
    torch.set_num_threads(1)
    try:
        scores = score_dataset(student, ds, batch_size=32)
    finally:
        torch.set_num_threads(2)
    # scoring: every rank holds the single-process scores; the sampler plan is split as documented
    single = EntropySampler.from_scores(scores, DDP_SELECT, random_fraction=0.25, seed=9, num_replicas=1, rank=0)
    plan = list(single)
    for rank, res in enumerate(per_rank):
        assert torch.equal(res["scores"], scores)
        assert res["steps"] == DDP_STEPS
        assert res["indices"] == plan[rank::2]
    assert not set(per_rank[0]["indices"]) & set(per_rank[1]["indices"])  # ranks trained on different samples

    # parameters (and buffers) identical across ranks afterwards
    states = [res["state"] for res in per_rank]
    assert states[0].keys() == states[1].keys() == initial.keys()
    for key in initial:
        assert torch.equal(states[0][key], states[1][key]), key
    # frozen parameters and the frozen BatchNorm statistics unchanged (bit for bit), trainable ones moved
    for res in per_rank:
        assert res["changed_frozen"] == []
        assert {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"} <= set(
            res["frozen_names"]
        )
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(states[0][key], initial[key]), key
    assert int(states[0]["1.num_batches_tracked"]) == int(initial["1.num_batches_tracked"])
    for key in ("3.weight", "3.bias", "5.weight", "5.bias"):
        assert not torch.equal(states[0][key], initial[key]), key
    # score_dataset through the DDP wrapper after training = single-process scoring of the trained weights
    trained = _ddp_models()[1]
    trained.load_state_dict(states[0])
    torch.set_num_threads(1)
    try:
        rescored = score_dataset(trained, ds, batch_size=40)
    finally:
        torch.set_num_threads(2)
    for res in per_rank:
        assert torch.equal(res["rescored"], rescored)
        assert res["training_after"] is True

    # DDP averaged the gradients: the same as one process stepping on both ranks' batches together
    optimizer = _ddp_setup(student)
    kd = KDLoss(temperature=2.0, alpha=0.7)
    student.train()
    for step in range(DDP_STEPS):
        window = slice(step * DDP_BATCH, (step + 1) * DDP_BATCH)
        idx = torch.tensor(plan[0::2][window] + plan[1::2][window])
        _ddp_step(student, teacher, kd, optimizer, ds.tensors[0][idx], ds.tensors[1][idx])
    for key, value in student.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


# ----- the torchrun example ------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_torchrun_example_exits_zero() -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    cmd.append(str(ROOT / "examples" / "ddp_torchrun.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started (their own session)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun example did not finish in 180 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert "parameters identical on all ranks" in output
