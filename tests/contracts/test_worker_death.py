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
import threading
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
RESEND = 100  # SIGCHLD re-sends while the main thread is not waiting on a queue (see _only_while_waiting)
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
    """``N`` samples ``(index, label)``; loading index ``bad`` in a worker fails in the way ``how`` says.

    ``worker`` limits the failure to that worker id. Samplers that draw with replacement repeat ``bad``, and
    without the limit the *other* worker may die too, right after sending a batch: the main process then fails
    receiving that batch's tensors (torch shares them by file descriptor, fetched from the sender) with a
    ``ConnectionResetError`` before torch notices the death, a race inside torch, not the case under test.
    """

    def __init__(self, how: str, bad: int, worker: int | None = None) -> None:
        self.how, self.bad, self.worker = how, bad, worker

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        info = get_worker_info()
        if i == self.bad and (self.worker is None or (info is not None and info.id == self.worker)):
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


def _only_while_waiting(torch_handler: Any) -> Any:
    """Wrap torch's SIGCHLD handler so that it raises only while the main thread waits on a queue.

    torch's handler raises ``RuntimeError`` for a dead worker asynchronously, wherever the main thread happens
    to be. Landing inside ``with notempty:`` of a ``multiprocessing.Queue.put`` (the loader feeding indices), it
    leaves that lock held and the queue's finalizer deadlocks the test process later (seen: a run hung in
    ``Queue._finalize_close``). Raised from the poll in ``selectors`` (the loader blocked in
    ``data_queue.get``), it unwinds through ``try/finally`` blocks only, and the loader re-raises it as "DataLoader
    worker (pid(s) ...) exited unexpectedly". Elsewhere the signal is sent again 20 ms later (at most
    ``RESEND`` times in a row), so the error still comes promptly; the loader's own liveness check on its next
    queue timeout (``_try_get_data``, within ``LOADER_TIMEOUT``) would also name the dead worker, only later.
    """
    resent = [0]

    def handler(signum: int, frame: Any) -> None:
        if frame is not None and frame.f_code.co_filename.endswith("selectors.py"):
            resent[0] = 0
            torch_handler(signum, frame)
        elif resent[0] < RESEND:
            resent[0] += 1
            threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGCHLD)).start()

    return handler


@pytest.fixture(autouse=True, scope="module")
def _sigchld_raises_only_while_waiting():
    """torch installs its handler once per process, on the first multi-worker iterator: run one, then wrap it."""
    assert list(DataLoader(range(2), num_workers=1)) == [torch.tensor([0]), torch.tensor([1])]
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if callable(torch_handler):
        signal.signal(signal.SIGCHLD, _only_while_waiting(torch_handler))
    yield
    signal.signal(signal.SIGCHLD, torch_handler)


def _run_until_error(loader: Any) -> tuple[BaseException | None, int, float]:
    """Drain ``loader``; return (the exception raised or None, batches received, seconds taken).

    The iterator's workers are always shut down afterwards (``_shutdown_workers`` is what DataLoader's own
    ``__del__`` calls) with SIGCHLD handling set aside meanwhile: the shutdown joins the live worker (a wait in
    ``selectors``), and its exit would otherwise make the handler raise for the dead one inside the shutdown.
    """
    t0 = time.monotonic()
    it = None
    n = 0
    err: BaseException | None = None
    try:
        it = iter(loader)  # a worker dying at once can already raise here
        for _ in it:
            n += 1
            assert time.monotonic() - t0 < DEADLINE, "the loader kept going past the deadline"
    except Exception as exc:  # noqa: BLE001 - returned to the caller to check
        err = exc
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
    """The first index of the epoch (worker 0's first batch) kills its worker: a RuntimeError naming it.

    ``bad`` comes from a twin of the loader's sampler: WeightedSampler starts its next epoch on a second
    ``iter()``, so peeking at the loader's own sampler would make ``bad`` an index of the wrong epoch.
    """
    sampler = SAMPLERS[sampler_name]()
    bad = next(iter(SAMPLERS[sampler_name]()))
    ds = WeightedDataset(Fragile(how, bad, worker=0), torch.rand(N, generator=torch.Generator().manual_seed(0)))
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
