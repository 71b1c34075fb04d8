"""Streams: what does ``WeightedWebDataset`` cost over plain webdataset iteration of the same shards?

Shards are written once to a temporary directory with ``write_shards`` (so they sit in the page cache: the
measure is CPU cost, not disk speed): each sample has a float32 ``.npy`` (16 KiB), a ``.cls`` and a small
``.json``; >= 64 MiB in full mode. Both sides decode every member in memory and iterate every sample in one
process (no DataLoader workers, no collation):

- baseline: ``wds.WebDataset(urls, shardshuffle=False).decode()`` (webdataset's default decoders);
- ours: ``WeightedWebDataset(manifest=..., shuffle=False)``: strict tar reading with the end-of-archive and
  manifest count checks, ``safe_decode`` (pickle refused, ``np.load(allow_pickle=False)``), label check, class
  weight attached as a float32 tensor.

A second pair compares shuffled streams: webdataset's ``.shuffle(1000)`` after decoding vs ours with its
per-shard buffer shuffle of 1000 (before decoding). Throughput ratio = baseline time / our time, target >= 0.95.

A third, informational pair isolates the stream's own machinery (strict reading, manifest checks, split, label
check, cursor) from the decoder and the weight stage: ours with webdataset's default decoder and no weights vs
the baseline. (That configuration unpickles ``.pyd`` members: it is a measurement, never a default.)

Timing: interleaved best-of-N of the **CPU time** of this process (``time.process_time``), because the machines
this runs on are shared and wall time there mostly measures the other processes; wall times are kept in
``extra``. Both sides are single-threaded Python, so on an idle core CPU time is the wall time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Callable

import numpy as np
import webdataset as wds
from webdataset.autodecode import Decoder

from benchmarks._harness import Result, collect
from torch_pretrain_update.data.manifest import read_manifest
from torch_pretrain_update.data.stream import WeightedWebDataset
from torch_pretrain_update.data.write import write_shards

SKIPPED: list[str] = []

_FEATURES = 4096  # float32 -> 16 KiB per .npy member


def _write(directory: str, n: int) -> str:
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            yield {"__key__": f"{i:08d}", "cls": int(rng.integers(0, 10)),
                   "npy": rng.standard_normal(_FEATURES, dtype=np.float32),
                   "json": {"id": i, "source": "bench"}}

    return write_shards(samples(), os.path.join(directory, "bench-%06d.tar"), maxcount=500)


def _drain(it) -> int:
    n = 0
    for _ in it:
        n += 1
    return n


def _interleaved_cpu(fns: dict[str, Callable[[], Any]], repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best-of-``repeat`` CPU and wall times of each function, run alternately (after one warm-up round)."""
    for fn in fns.values():
        fn()
    cpu = {k: float("inf") for k in fns}
    wall = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            collect()
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[k] = min(cpu[k], time.process_time() - c0)
            wall[k] = min(wall[k], time.perf_counter() - w0)
    return cpu, wall


class _NoWeights(WeightedWebDataset):
    """Diagnostic only: the stream without its weight stage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self.config, "make_stages", list)  # the library's own stages: none


def run(quick: bool) -> list[Result]:
    n = 200 if quick else 3400  # 3400 x ~22.6 KiB = 75 MiB
    repeat = 2 if quick else 3
    tmp = tempfile.mkdtemp(prefix="bench_streams_")
    try:
        manifest = _write(tmp, n)
        urls = read_manifest(manifest).urls
        size_mb = sum(os.path.getsize(u) for u in urls) / 2**20
        wds_decoder = Decoder([])  # what .decode() with no arguments uses

        fns = {
            "raw": lambda: _drain(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()),
            "ours": lambda: _drain(WeightedWebDataset(None, manifest=manifest, num_classes=10, shuffle=False)),
            "raw_shuffled": lambda: _drain(
                wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().shuffle(1000)),
            "ours_shuffled": lambda: _drain(
                WeightedWebDataset(None, manifest=manifest, num_classes=10, shuffle=True, shuffle_buffer=1000)),
            "machinery": lambda: _drain(
                _NoWeights(None, manifest=manifest, num_classes=10, shuffle=False, decoder=wds_decoder)),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts = {name: fn() for name, fn in fns.items()}
            if set(counts.values()) != {n}:
                raise RuntimeError(f"streams disagree on the number of samples: {counts} (expected {n})")
            cpu, wall = _interleaved_cpu(fns, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for ours_key, raw_key, label, base_name, target in (
        ("ours", "raw", "ordered: weights + safe decode + checks", "wds.WebDataset(...).decode()", ">= 0.95x"),
        ("ours_shuffled", "raw_shuffled", "shuffled (buffer 1000): weights + safe decode + checks",
         "wds.WebDataset(...).decode().shuffle(1000)", ">= 0.95x"),
        ("machinery", "raw", "ordered, diagnostic: reading + checks + split only (webdataset decoder, no weights)",
         "wds.WebDataset(...).decode()", ""),
    ):
        ratio = cpu[raw_key] / cpu[ours_key]
        rows.append(Result(
            measure=f"stream {n} samples, {size_mb:.0f} MiB, {label}",
            ours=cpu[ours_key], baseline=cpu[raw_key], baseline_name=base_name, ratio_kind="speedup",
            target=target, passed=(ratio >= 0.95) if target else None,
            note=f"CPU time; {n / cpu[ours_key]:.0f} vs {n / cpu[raw_key]:.0f} samples/s",
            extra={"samples": n, "mib": round(size_mb, 1), "ours_samples_per_cpu_s": n / cpu[ours_key],
                   "baseline_samples_per_cpu_s": n / cpu[raw_key], "ours_wall_s": wall[ours_key],
                   "baseline_wall_s": wall[raw_key], "wall_ratio": wall[raw_key] / wall[ours_key]},
        ))
    return rows
