"""Running the demos' seeds, in spawned worker processes when there are several, with their progress reports.

A seed's run is a pure function of its inputs, so the numbers do not depend on the number of processes (only the
wall times do). Each worker process runs with a fixed number of torch threads; its progress reports travel to
the parent on a queue, and the parent hands them to ``report``.
"""

from __future__ import annotations

import queue as queue_module
from typing import Any, Callable, TypeVar

import torch

__all__ = ["Report", "run_seeds"]

#: how one seed's run reports progress: ``report(kind, seed, text)``, kinds as in ``Progress.event`` plus
#: ``"finished"`` (the seed's last report, passed on as a ``"stage"``)
Report = Callable[[str, int, str], None]
T = TypeVar("T")

_worker_queue: Any = None  # set in each worker process by _init_worker


def _init_worker(queue: Any, threads: int) -> None:
    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(threads)


def _put(kind: str, seed: int, text: str) -> None:
    _worker_queue.put((kind, seed, text))


def _in_worker(task: Callable[..., T], seed: int) -> T:
    return task(seed=seed, report=_put)


def run_seeds(task: Callable[..., T], seeds: list[int], *, workers: int, threads: int, report: Report) -> list[T]:
    """``task(seed=s, report=r)`` for every seed, results in seed order.

    With ``workers <= 1`` in this process (its thread count left as it is); otherwise in ``workers`` processes
    started with ``spawn`` (forking after torch has started threads is not safe; nothing is inherited but the
    arguments, so ``task`` must be picklable: a module-level function or a ``functools.partial`` of one), each
    with ``threads`` torch threads. Every seed's last report must be of kind ``"finished"``.
    """
    finished: set[int] = set()

    def relay(kind: str, seed: int, text: str) -> None:
        if kind == "finished":
            finished.add(seed)
            kind = "stage"
        report(kind, seed, text)

    if workers <= 1:
        return [task(seed=seed, report=relay) for seed in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, threads)) as pool:
        futures = [pool.submit(_in_worker, task, seed) for seed in seeds]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while not queue.empty():
                relay(*queue.get())
        results = [f.result() for f in futures]
    # The reports travel on their own queue: the last ones can arrive after the results.
    while len(finished) < len(seeds):
        try:
            relay(*queue.get(timeout=5.0))
        except queue_module.Empty:
            break
    return results
