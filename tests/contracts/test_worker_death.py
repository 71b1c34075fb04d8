"""A DataLoader worker that dies (``os._exit``, SIGKILL), hangs or raises surfaces as an error naming the worker
within a deadline: never a hang, never a silently shorter epoch.

The worker is killed from inside our own code paths: the weight lookup of :class:`WeightedDataset` (tensor
weights with a dying base dataset, and a dying weight callable) driven by our samplers, and the decoder hook of
:class:`WeightedWebDataset`, under both ``torch.utils.data.DataLoader`` and torchdata's ``StatefulDataLoader``.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from torch_pretrain_update.data.decode import safe_decode
from torch_pretrain_update.data.stream import WeightedWebDataset
from torch_pretrain_update.data.weighted_dataset import WeightedDataset
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler
from torch_pretrain_update.sampling.weighted_sampler import WeightedSampler

pytestmark = pytest.mark.timeout(60)

N = 40
LOADER_TIMEOUT = 3  # seconds: DataLoader's deadline per batch (also bounds how late a dead worker is noticed)
DEADLINE = 45.0  # seconds: the error must surface well before this
HANG_S = 3.0  # a "hanging" worker sleeps this long; the loaders' timeout is 1 s
DIED = r"DataLoader worker \(pid\(?s?\)? ?[\d, ]+\) (exited unexpectedly|is killed by signal)"


def _fail(how: str) -> None:
    """Kill, stall or fail the current process, but only inside a DataLoader worker."""
    if get_worker_info() is None:
        return
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":  # longer than the loaders' timeout below; then exit, so that shutting down is quick
        time.sleep(HANG_S)
        os._exit(0)
    if how == "raise":
        raise ValueError("this sample is corrupt")


class Fragile(Dataset):
    """``N`` samples ``(index, label)``; loading index ``bad`` in a worker fails in the way ``how`` says."""

    def __init__(self, how: str, bad: int) -> None:
        self.how, self.bad = how, bad

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        if i == self.bad:
            _fail(self.how)
        return torch.tensor(i), torch.tensor(i % 4)


class FragileWeight:
    """A weight callable for WeightedDataset that fails at index ``bad``."""

    def __init__(self, how: str, bad: int) -> None:
        self.how, self.bad = how, bad

    def __call__(self, i: int) -> float:
        if i == self.bad:
            _fail(self.how)
        return 1.0 + i % 3


class FragileDecoder:
    """A WeightedWebDataset decoder hook: safe_decode, except that worker 0 fails on its ``nth`` sample."""

    def __init__(self, how: str, nth: int = 0) -> None:
        self.how, self.nth = how, nth
        self.decode = safe_decode(image=None)
        self.count = 0

    def __call__(self, sample: dict) -> dict:
        info = get_worker_info()
        if info is not None and info.id == 0:
            if self.count == self.nth:
                _fail(self.how)
            self.count += 1
        return self.decode(sample)


LABELS = torch.arange(N) % 4
SAMPLERS = {
    "random": lambda: RandomSubsetSampler(N, N, seed=1),
    "class-balanced": lambda: ClassBalancedSampler(LABELS, samples_per_class=12, seed=2),
    "weighted": lambda: WeightedSampler(torch.rand(N, generator=torch.Generator().manual_seed(0)), 3 * N, seed=3),
}
LOADERS = {"torch": DataLoader, "stateful": StatefulDataLoader}


def _run_until_error(loader: Any) -> tuple[BaseException | None, int, float]:
    """Drain ``loader``; return (the exception raised or None, batches received, seconds taken).

    The iterator's workers are always shut down afterwards (``_shutdown_workers`` is what DataLoader's own
    ``__del__`` calls) with torch's SIGCHLD handler set aside meanwhile: that handler raises, asynchronously and
    wherever the main thread happens to be, for a dead worker of an iterator that is still registered (the other
    worker exiting during the shutdown triggers it), and a failed iterator kept alive would make it fire later.
    """
    t0 = time.monotonic()
    it = None
    n = 0
    err: BaseException | None = None
    try:
        try:
            it = iter(loader)  # a worker dying at once can already raise here
            for _ in it:
                n += 1
                assert time.monotonic() - t0 < DEADLINE, "the loader kept going past the deadline"
        except Exception as exc:  # noqa: BLE001 - returned to the caller to check
            err = exc
    except RuntimeError as late:  # the SIGCHLD handler firing inside the handler above
        err = err or late
    finally:
        took = time.monotonic() - t0
        handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            if it is not None:
                it._shutdown_workers()
        finally:
            signal.signal(signal.SIGCHLD, handler)
    if err is not None:
        err.__traceback__ = None
    return err, n, took


def _expect_died(loader: Any) -> None:
    exc, _, took = _run_until_error(loader)
    assert isinstance(exc, RuntimeError) and re.search(DIED, str(exc)), f"got {exc!r}"
    assert took < DEADLINE


# ------------------------------------------------------------------------------------ map-style, our samplers
@pytest.mark.parametrize("loader_name", sorted(LOADERS))
@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_worker_dying_in_weighted_dataset(how: str, sampler_name: str, loader_name: str) -> None:
    """The first index of the epoch (worker 0's first batch) kills its worker: a RuntimeError naming it."""
    sampler = SAMPLERS[sampler_name]()
    bad = next(iter(sampler))
    ds = WeightedDataset(Fragile(how, bad), torch.rand(N, generator=torch.Generator().manual_seed(0)))
    loader = LOADERS[loader_name](ds, batch_size=4, sampler=sampler, num_workers=2, timeout=LOADER_TIMEOUT)
    _expect_died(loader)


@pytest.mark.parametrize("loader_name", sorted(LOADERS))
def test_worker_dying_in_the_weight_callable(loader_name: str) -> None:
    sampler = RandomSubsetSampler(N, N, seed=4)
    bad = next(iter(sampler))
    ds = WeightedDataset(Fragile("none", -1), FragileWeight("exit", bad))
    _expect_died(LOADERS[loader_name](ds, batch_size=4, sampler=sampler, num_workers=2, timeout=LOADER_TIMEOUT))


@pytest.mark.parametrize("loader_name", sorted(LOADERS))
def test_worker_dying_mid_epoch_is_an_error_not_a_hang(loader_name: str) -> None:
    """Death after the worker has sent batches: still an error within the deadline and never a complete epoch.

    torch re-raises as ``RuntimeError: DataLoader worker (pid(s) ...) exited unexpectedly``, except in a race it
    does not cover: when the dead worker's last batch is still being received (file-descriptor sharing), the
    receive fails first (``ConnectionResetError`` or ``EOFError``) while the worker is not yet reaped.
    """
    sampler = RandomSubsetSampler(N, N, seed=5)
    order = list(sampler)
    bad = order[20]  # worker 0's third batch (batches of 4 alternate between the 2 workers)
    ds = WeightedDataset(Fragile("exit", bad), torch.ones(N))
    loader = LOADERS[loader_name](ds, batch_size=4, sampler=sampler, num_workers=2, timeout=LOADER_TIMEOUT)
    exc, n, took = _run_until_error(loader)
    assert exc is not None and took < DEADLINE
    died = isinstance(exc, RuntimeError) and re.search(DIED, str(exc))
    assert died or isinstance(exc, (ConnectionResetError, EOFError)), repr(exc)
    assert n < N // 4


@pytest.mark.parametrize("loader_name", sorted(LOADERS))
def test_hanging_worker_times_out(loader_name: str) -> None:
    sampler = RandomSubsetSampler(N, N, seed=6)
    ds = WeightedDataset(Fragile("hang", next(iter(sampler))), torch.ones(N))
    exc, _, took = _run_until_error(LOADERS[loader_name](ds, batch_size=4, sampler=sampler, num_workers=2,
                                                          timeout=1))
    assert isinstance(exc, RuntimeError) and "DataLoader timed out after 1 seconds" in str(exc), repr(exc)
    assert took < HANG_S  # the timeout fired; nothing waited for the stalled worker


@pytest.mark.parametrize("loader_name", sorted(LOADERS))
def test_raising_worker_reraises_naming_the_worker(loader_name: str) -> None:
    sampler = RandomSubsetSampler(N, N, seed=7)
    ds = WeightedDataset(Fragile("raise", next(iter(sampler))), torch.ones(N))
    exc, _, _ = _run_until_error(LOADERS[loader_name](ds, batch_size=4, sampler=sampler, num_workers=2,
                                                       timeout=LOADER_TIMEOUT))
    assert isinstance(exc, ValueError) and "this sample is corrupt" in str(exc), repr(exc)
    assert re.search(r"in DataLoader worker process \d", str(exc)), str(exc)


# --------------------------------------------------------------------------------------------- WeightedWebDataset
@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("dying")
    samples = [{"__key__": f"k{i:04d}", "cls": i % 4, "npy": np.full(2, i, np.float32)} for i in range(N)]
    return write_shards(samples, str(d / "w-%06d.tar"), maxcount=10)


def _collate(batch: list[dict]) -> dict:
    return {"key": [s["__key__"] for s in batch], "weight": torch.stack([s["weight"] for s in batch])}


@pytest.mark.parametrize("how", ["exit", "sigkill"])
@pytest.mark.parametrize("loader_name", sorted(LOADERS))
def test_worker_dying_in_the_stream_decoder(manifest: str, loader_name: str, how: str) -> None:
    ds = WeightedWebDataset(None, manifest=manifest, num_classes=4, seed=0, decoder=FragileDecoder(how))
    _expect_died(LOADERS[loader_name](ds, batch_size=4, num_workers=2, collate_fn=_collate, timeout=LOADER_TIMEOUT))


def test_worker_hanging_in_the_stream_decoder_times_out(manifest: str) -> None:
    ds = WeightedWebDataset(None, manifest=manifest, num_classes=4, seed=0, decoder=FragileDecoder("hang"))
    exc, _, took = _run_until_error(StatefulDataLoader(ds, batch_size=4, num_workers=2, collate_fn=_collate,
                                                       timeout=1))
    assert isinstance(exc, RuntimeError) and "DataLoader timed out after 1 seconds" in str(exc), repr(exc)
    assert took < HANG_S


# ------------------------------------------------------------------------------------------------- controls
def test_control_map_style_completes() -> None:
    """The same datasets and hooks without a failure drain completely (every index once)."""
    ds = WeightedDataset(Fragile("none", -1), FragileWeight("none", -1))
    loader = DataLoader(ds, batch_size=4, sampler=RandomSubsetSampler(N, N, seed=1), num_workers=2,
                        timeout=LOADER_TIMEOUT)
    assert sorted(int(i) for (x, _), _w in loader for i in x) == list(range(N))


def test_control_stream_completes(manifest: str) -> None:
    ds = WeightedWebDataset(None, manifest=manifest, num_classes=4, seed=0, decoder=FragileDecoder("none"))
    loader = StatefulDataLoader(ds, batch_size=4, num_workers=2, collate_fn=_collate, timeout=LOADER_TIMEOUT)
    assert sorted(k for b in loader for k in b["key"]) == [f"k{i:04d}" for i in range(N)]
