"""Multi-process correctness on real ``torch.distributed`` (gloo) process groups on this machine.

One spawned group per world size runs several checks (process start-up dominates the cost on 2 cores); each
rank saves what it saw and the parent process compares against single-process references it computes itself.
Every launch has a deadline after which its processes are terminated, so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from torch_pretrain_update.distributed import broadcast_seed, score_dataset, score_shares

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DEADLINE_S = 150


# ----- launching a group --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, tasks: list[str]) -> None:
    """Entry point of a spawned rank: join the group, run each task, save ``{task: result or error}``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        for name in tasks:
            try:
                results[name] = TASKS[name](rank, world, Path(out_dir))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
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
        start_method="spawn",
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


# ----- tasks run inside the ranks ------------------------------------------------------------------------------
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


TASKS: dict[str, Callable[[int, int, Path], Any]] = {
    "score": _task_score,
    "score_failure": _task_score_failure,
    "length_mismatch": _task_length_mismatch,
    "broadcast_seed": _task_broadcast_seed,
}

GROUP2_TASKS = ["score", "score_failure", "length_mismatch", "broadcast_seed"]


@pytest.fixture(scope="module")
def group2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(2, GROUP2_TASKS, tmp_path_factory.mktemp("group2"))


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


def test_broadcast_seed_without_group() -> None:
    assert broadcast_seed(5) == 5
    a, b = broadcast_seed(None), broadcast_seed(None)
    assert 0 <= a < 2**63 and 0 <= b < 2**63 and a != b
    with pytest.raises(TypeError, match="seed must be an int"):
        broadcast_seed(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="src must be <= 0; got 1"):
        broadcast_seed(1, src=1)


# ----- score_dataset and broadcast_seed on 2 ranks -------------------------------------------------------------
@pytest.mark.timeout(240)
def test_score_dataset_two_ranks_equals_single_process(group2: list[dict]) -> None:
    per_rank = task_result(group2, "score")
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
def test_score_dataset_failure_on_one_rank_raises_on_all(group2: list[dict]) -> None:
    failure = task_result(group2, "score_failure")
    assert failure[1]["raised"] == "ValueError" and "finite logits" in failure[1]["message"]
    assert failure[0]["raised"] == "RuntimeError" and "rank(s) [1]" in failure[0]["message"]
    mismatch = task_result(group2, "length_mismatch")
    for res in mismatch:
        assert res["raised"] == "ValueError"
        assert "len(dataset) [50, 51]" in res["message"]


@pytest.mark.timeout(240)
def test_broadcast_seed_two_ranks(group2: list[dict]) -> None:
    seeds = task_result(group2, "broadcast_seed")
    assert [s["given"] for s in seeds] == [1000, 1000]
    assert [s["from_last"] for s in seeds] == [2001, 2001]
    assert seeds[0]["random"] == seeds[1]["random"]
