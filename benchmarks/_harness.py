"""Shared pieces of the benchmark suite: the result row, timing and memory helpers."""

from __future__ import annotations

import gc
import resource
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Result:
    """One row of ``results.md``.

    ``ours`` and ``baseline`` are in ``unit`` (seconds unless stated). ``ratio`` is defined per row by
    ``ratio_kind``: ``"speedup"`` = baseline / ours (higher is better), ``"overhead"`` = ours / baseline
    (lower is better). ``target`` is a human-readable target such as ">= 100x" and ``passed`` says whether
    the measured ratio meets it (None when there is no target).
    """

    measure: str
    ours: float
    baseline: Optional[float]
    baseline_name: str = ""
    unit: str = "s"
    ratio_kind: str = "speedup"
    target: str = ""
    passed: Optional[bool] = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        if self.baseline is None or self.ours is None or self.ours == 0 or self.baseline == 0:
            return None
        return self.baseline / self.ours if self.ratio_kind == "speedup" else self.ours / self.baseline

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def timeit(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds (the minimum is the least noisy estimate)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def collect() -> None:
    """A full garbage collection before a timed call that costs milliseconds, not ~0.2 s.

    Whatever survives a collection is frozen (``gc.freeze``): the ~10^6 objects torch creates at import time are
    not scanned again by every later collection, only what the benchmarks allocated since.
    """
    gc.collect()
    gc.freeze()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeat: int = 5,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Best-of-``repeat`` times of several functions, run alternately so that machine noise hits all alike.

    ``clock`` defaults to wall time; ``time.thread_time`` measures the CPU time of the calling thread instead
    (immune to being descheduled on a shared machine; only meaningful for single-threaded work).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            collect()
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return best


def peak_traced_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under tracemalloc; return ``(result, peak bytes allocated through Python allocators)``.

    Note: torch tensors are allocated outside Python's allocator; use :func:`rss_delta` for those.
    """
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class IndexDataset:
    """A map-style dataset whose item ``i`` is ``i`` (for timing samplers through a DataLoader)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def resume_time(
    make_loader: Callable[[], Any], position: int, batch_size: int, repeat: int, clock: Callable[[], float]
) -> float:
    """Best time from a fresh loader's ``load_state_dict`` to its first batch, resuming at ``position`` samples
    (the state is taken from a loader that consumed ``position // batch_size`` batches)."""
    loader = make_loader()
    it = iter(loader)
    for _ in range(position // batch_size):
        next(it)
    state = loader.state_dict()
    del it, loader
    best = float("inf")
    for _ in range(repeat):
        fresh = make_loader()
        t0 = clock()
        fresh.load_state_dict(state)
        next(iter(fresh))
        best = min(best, clock() - t0)
    return best
