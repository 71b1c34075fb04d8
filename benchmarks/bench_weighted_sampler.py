"""``WeightedSampler`` (issue 2): against ``WeightedRandomSampler``, alone at N = 1e8, and its resume cost.

1. N = 1e7 float32 weights, ``num_samples = N``, with replacement: time from construction to the first index,
   and to the last index (every index drained), against ``torch.utils.data.WeightedRandomSampler`` (which
   draws the whole plan with ``torch.multinomial`` and turns it into a Python list before yielding anything).
2. N = 1e8 alone, in a fresh subprocess each: with replacement (``num_samples = N``) and without
   (``num_samples = N / 10``): time to the first index (target <= 1 s) and extra memory per weight
   (target <= 16 B). ``WeightedRandomSampler`` cannot run here (``torch.multinomial`` refuses more than 2**24
   categories). **Memory method**: the child creates the weights (400 MB), then resets its peak-RSS mark
   (``/proc/self/clear_refs`` with ``5``, which sets ``VmHWM`` to the current RSS) and reads ``VmRSS``; after
   the first index it reads ``VmHWM``. Extra = ``VmHWM - VmRSS_before``: every page the sampler touched at its
   peak (float64 cumulative sums, keys, selection, temporaries), whatever allocator made it. If
   ``clear_refs`` is not writable the child falls back to ``ru_maxrss`` minus the RSS before (an upper-bound
   on the same quantity, since the weights were the only earlier allocation); the note says which.
3. Resume at sample position n in {1e3, 1e5, 1e6} under ``StatefulDataLoader`` (batch 64, no workers,
   N = 2e6): time from ``load_state_dict`` to the first resumed batch. A seeded ``WeightedRandomSampler`` is
   not ``Stateful``, so the loader replays it (draws and skips n indices); ``WeightedSampler`` restores
   ``{"epoch", "position"}`` and regenerates only the chunk holding the position. Target: flat in n (at most
   2x from 1e3 to 1e6).

Clock: CPU time of the calling thread (``time.thread_time``), torch limited to one thread (as in
``bench_samplers``): immune to the other jobs on the shared 2-core machine; on an idle machine it equals the
wall time of this single-threaded work. The N = 1e8 rows also report wall time in the note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch.utils.data import WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from benchmarks._harness import IndexDataset, Result, interleaved, resume_time
from torch_pretrain_update import WeightedSampler

ROOT = Path(__file__).resolve().parents[1]
SKIPPED: list[str] = []
_clock = time.thread_time


def _first(make) -> int:
    return next(iter(make()))


def _drain(make) -> int:
    n = 0
    for _ in make():
        n += 1
    return n


# ----- 1. against WeightedRandomSampler ---------------------------------------------------------------------


def _versus(quick: bool) -> list[Result]:
    n = 100_000 if quick else 10_000_000
    w = torch.rand(n, generator=torch.Generator().manual_seed(0))

    def ours():
        return WeightedSampler(w, n, seed=0)

    def theirs():
        return WeightedRandomSampler(w, n, replacement=True, generator=torch.Generator().manual_seed(0))

    repeat = 2 if quick else 3
    first = interleaved(
        {"ours": lambda: _first(ours), "theirs": lambda: _first(theirs)}, repeat=repeat, clock=_clock
    )
    total = interleaved(
        {"ours": lambda: _drain(ours), "theirs": lambda: _drain(theirs)}, repeat=repeat - 1, clock=_clock
    )
    return [
        Result(
            f"WeightedSampler time to first index, N={n:.0e}",
            first["ours"],
            first["theirs"],
            "WeightedRandomSampler",
        ),
        Result(
            f"WeightedSampler whole epoch drained ({n:.0e} indices)",
            total["ours"],
            total["theirs"],
            "WeightedRandomSampler",
        ),
    ]


# ----- 2. N = 1e8 alone, in a subprocess --------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    from torch_pretrain_update import WeightedSampler

    n, k, replacement = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    w = torch.rand(n, generator=torch.Generator().manual_seed(0))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    before = status("VmRSS")
    t0, w0 = time.thread_time(), time.perf_counter()
    s = WeightedSampler(w, k, replacement=replacement, seed=0)
    first = next(iter(s))
    cpu, wall = time.thread_time() - t0, time.perf_counter() - w0
    if method.startswith("VmHWM"):
        peak = status("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"cpu": cpu, "wall": wall, "extra": peak - before, "method": method, "first": first}))
    """
)


def _child(n: int, k: int, replacement: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), str(k), "1" if replacement else "0"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _alone(quick: bool) -> list[Result]:
    n = 1_000_000 if quick else 100_000_000
    rows = []
    for replacement, k in ((True, n), (False, n // 10)):
        r = _child(n, k, replacement)
        kind = "with replacement" if replacement else f"without replacement, num_samples={k:.0e}"
        judge = None if quick else r["cpu"] <= 1.0
        rows.append(
            Result(
                f"WeightedSampler alone, N={n:.0e}, {kind}: time to first index",
                r["cpu"],
                None,
                target="<= 1 s" if replacement else "",
                passed=judge if replacement else None,
                note=f"wall {r['wall']:.2f} s",
            )
        )
        per = r["extra"] / n
        rows.append(
            Result(
                f"WeightedSampler alone, N={n:.0e}, {kind}: extra memory per weight",
                per,
                None,
                unit="B",
                target="<= 16 B",
                passed=None if quick else per <= 16,
                note=f"{r['extra'] / 2**20:.0f} MiB extra; method: {r['method']}",
            )
        )
    return rows


# ----- 3. resume cost ---------------------------------------------------------------------------------------



def _resume(quick: bool) -> list[Result]:
    positions = [100, 1_000] if quick else [1_000, 100_000, 1_000_000]
    n = 5_000 if quick else 2_000_000
    bs = 64
    w = torch.rand(n, generator=torch.Generator().manual_seed(1))
    ds = IndexDataset(n)

    def make_theirs():
        s = WeightedRandomSampler(w, n, replacement=True, generator=torch.Generator().manual_seed(0))
        return StatefulDataLoader(ds, sampler=s, batch_size=bs, num_workers=0)

    def make_ours():
        return StatefulDataLoader(ds, sampler=WeightedSampler(w, n, seed=0), batch_size=bs, num_workers=0)

    rows = []
    ours_t = {}
    for pos in positions:
        ours = resume_time(make_ours, pos, bs, 1 if quick else 3, _clock)
        theirs = resume_time(make_theirs, pos, bs, 1 if quick or pos >= 1_000_000 else 3, _clock)
        ours_t[pos] = ours
        rows.append(
            Result(
                f"WeightedSampler StatefulDataLoader resume at position {pos:.0e} (batch {bs}, N={n:.0e})",
                ours,
                theirs,
                "WeightedRandomSampler (not Stateful: replayed)",
                note="ours: O(1) jump to the chunk; includes building the cumulative sums",
            )
        )
    lo, hi = positions[0], positions[-1]
    rows.append(
        Result(
            f"WeightedSampler resume cost at {hi:.0e} vs at {lo:.0e} (flat in n)",
            ours_t[hi],
            ours_t[lo],
            f"ours at position {lo:.0e}",
            ratio_kind="overhead",
            target="<= 2x",
            passed=None if quick else ours_t[hi] <= 2 * ours_t[lo],
        )
    )
    return rows


def run(quick: bool) -> list[Result]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [*_versus(quick), *_alone(quick), *_resume(quick)]
    finally:
        torch.set_num_threads(threads)
