"""``pretrain-update select`` on large memory-mapped inputs: wall time and peak resident memory.

Each measurement runs the command as a user would (``python -m torch_pretrain_update select ...``) in a fresh
process and reads that process's peak RSS (``getrusage(RUSAGE_CHILDREN)``, which includes the pages of the
memory-mapped input it touched). Target (issue 6): N = 1e8 rows of scores within a few GB; here <= 4 GiB.

Baseline: the obvious numpy script (``np.load`` the whole file, ``np.argpartition`` for the top k, sort the
indices), also in a fresh process. It is exact only for distinct scores (ties land arbitrarily), reads
everything into memory at once and has no progress, chunking or validation; its RSS is shown for scale.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._harness import Result

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 4096

_BASELINE = """
import sys, numpy as np
s = np.load(sys.argv[1])
if s.ndim == 2:  # entropy of softmax(logits), in float32 like the command
    z = s - s.max(axis=1, keepdims=True); p = np.exp(z); p /= p.sum(axis=1, keepdims=True)
    s = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
k = int(sys.argv[2])
idx = np.sort(np.argpartition(-s, k - 1)[:k])
np.save(sys.argv[3], idx)
"""


def _child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a fresh child (its own grandchild-free accounting via a wrapper); return (s, peak MiB)."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[1:])\n"
        "dt = time.perf_counter() - t\n"
        "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env,
                         check=True)
    rc, dt, kib = out.stdout.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
    return float(dt), int(kib) / 1024


def _cases(quick: bool) -> list[tuple[str, tuple[int, ...], list[str], int]]:
    if quick:
        return [("1e5 x 10 logits, entropy top-k 10%", (100_000, 10), ["--from-logits"], 10_000)]
    return [
        ("1e7 x 10 logits, entropy top-k 10%", (10_000_000, 10), ["--from-logits"], 1_000_000),
        ("1e7 x 10 logits, entropy proportional 10%", (10_000_000, 10), ["--from-logits", "--mode", "proportional"],
         1_000_000),
        ("1e8 scores, top-k 10%", (100_000_000,), [], 10_000_000),
    ]


def run(quick: bool) -> list[Result]:
    results = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, extra, k in _cases(quick):
            data = os.path.join(tmp, "input.npy")
            np.save(data, rng.standard_normal(shape, dtype=np.float32))
            ours_s, ours_mib = _child([sys.executable, "-m", "torch_pretrain_update", "select", data, "--budget",
                                       str(k), "--strategy", "entropy", *extra, "-o",
                                       os.path.join(tmp, "ours.npy"), "--no-progress"])
            base_mib = base_s = None
            if "proportional" not in extra:
                base_s, base_mib = _child([sys.executable, "-c", _BASELINE, data, str(k),
                                           os.path.join(tmp, "base.npy")])
                ours, base = np.load(os.path.join(tmp, "ours.npy")), np.load(os.path.join(tmp, "base.npy"))
                differ = k - len(np.intersect1d(ours, base))
            else:
                differ = None
            note = f"wall {ours_s:.1f} s incl. start-up" + ("" if base_s is None else f" (numpy {base_s:.1f} s)")
            if differ is not None:
                note += ("; same indices as numpy" if differ == 0 else
                         f"; {differ} of {k} indices differ from numpy's (scores computed in another order round "
                         "differently at the cut-off)")
            results.append(Result(
                measure=f"select peak RSS, {name}", ours=ours_mib, baseline=base_mib,
                baseline_name="np.load + argpartition" if base_mib is not None else "", unit="MiB",
                ratio_kind="overhead", target=f"<= {LIMIT_MIB} MiB", passed=ours_mib <= LIMIT_MIB, note=note,
                extra={"wall_s": ours_s, "baseline_wall_s": base_s, "rows": shape[0], "k": k},
            ))
            os.remove(data)
    return results


if __name__ == "__main__":
    t0 = time.perf_counter()
    for r in run(quick="--quick" in sys.argv):
        print(r.to_dict())
    print(f"{time.perf_counter() - t0:.1f} s; self peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB")
