"""Distillation losses: forward + backward of ``KDLoss`` / ``DKDLoss`` against hand-written references.

Reference for KD (target <= 1.1x): the formula everybody writes by hand,
``F.kl_div(F.log_softmax(z_s/T), F.log_softmax(z_t/T), log_target=True, reduction="batchmean") * T*T
+ F.cross_entropy(z_s, y)``. ``KDLoss`` adds input validation (shapes, label range, one ``isfinite`` on the
scalar loss) and computes value and gradient block by block (see torch_pretrain_update/distill.py).
Informational rows: ``DKDLoss`` against the same KD reference and against the DKD reference code of Zhao et al.
(mdistiller's ``dkd_loss``, transcribed below) + CE; and the seed document's ``nn.KLDivLoss()(student_output,
teacher_output)`` on raw outputs (wrong, see DESIGN.md; timed only). Sizes: image classification
(B=256, C=1000) and token-level distillation (B*L = 32*512 positions, C=32000 classes). Times are best-of-N,
interleaved; each call builds a fresh leaf so that gradient accumulation is not timed. Peak memory of one
forward+backward is measured in a fresh subprocess per variant (max RSS above the inputs) in full mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._harness import Result, interleaved
from torch_pretrain_update import DKDLoss, KDLoss

SKIPPED: list[str] = []

T = 4.0
ALPHA = 0.9


def reference_kd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True, reduction="batchmean")
    return kl * T * T + F.cross_entropy(zs, y)


def mdistiller_dkd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, alpha=1.0, beta=8.0) -> torch.Tensor:
    """DKD as in the reference code of Zhao et al. (mdistiller/distillers/DKD.py), plus CE."""
    gt_mask = torch.zeros_like(zs).scatter_(1, y.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(zs).scatter_(1, y.unsqueeze(1), 0).bool()
    ps = F.softmax(zs / T, dim=1)
    pt = F.softmax(zt / T, dim=1)

    def cat_mask(t):
        t1 = (t * gt_mask).sum(dim=1, keepdims=True)
        t2 = (t * other_mask).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    ps, pt = cat_mask(ps), cat_mask(pt)
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * (T**2) / y.shape[0]
    pt2 = F.softmax(zt / T - 1000.0 * gt_mask, dim=1)
    ls2 = F.log_softmax(zs / T - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * (T**2) / y.shape[0]
    return alpha * tckd + beta * nckd + F.cross_entropy(zs, y)


def _inputs(n: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, c, generator=g).mul_(2)  # in place: no transient copy inflating the memory baseline
    zt = torch.randn(n, c, generator=g).mul_(2)
    y = torch.randint(0, c, (n,), generator=g)
    return zs, zt, y


def _variants(
    zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, dkd_rows: bool = True
) -> dict[str, Callable[[], None]]:
    kd = KDLoss(temperature=T, alpha=ALPHA)
    dkd = DKDLoss(alpha=1.0, beta=8.0, temperature=T)
    seed_criterion = nn.KLDivLoss()

    def leaf() -> torch.Tensor:
        return zs.detach().requires_grad_()

    fns = {
        "ours_kd": lambda: kd(leaf(), zt, y).backward(),
        "ref_kd": lambda: reference_kd(leaf(), zt, y).backward(),
        "seed": lambda: seed_criterion(leaf(), zt).backward(),
    }
    if dkd_rows:
        fns["ours_dkd"] = lambda: (lambda s: (dkd(s, zt, y) + F.cross_entropy(s, y)).backward())(leaf())
        fns["ref_dkd"] = lambda: mdistiller_dkd(leaf(), zt, y).backward()
    return fns


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_memory(n: int, c: int, variant: str) -> float | None:
    """Peak RSS (bytes) of one forward+backward above the RSS with the inputs built, in a fresh interpreter;
    None where /proc is missing or the run fails. (``ru_maxrss`` is useless here: Linux carries the parent's peak
    over ``fork``/``exec``; the child resets its own high-water mark through ``/proc/self/clear_refs``.)"""
    code = (
        "import sys, torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from benchmarks.bench_distill import _inputs, _variants\n"
        "def status(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field + ':'):\n"
        "            return int(line.split()[1]) * 1024\n"
        f"zs, zt, y = _inputs({n}, {c})\n"
        f"fn = _variants(zs, zt, y)[{variant!r}]\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS')\n"
        "fn()\n"
        "print(status('VmHWM') - base)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "2"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                             timeout=600, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def _rows(
    label: str, n: int, c: int, repeat: int, memory: bool, dkd_rows: bool = True, warmup: int = 1
) -> list[Result]:
    zs, zt, y = _inputs(n, c)
    fns = _variants(zs, zt, y, dkd_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.KLDivLoss's reduction='mean' warning (the seed's bug)
        best = interleaved(fns, repeat=repeat, warmup=warmup)
    mem = {}
    if memory:
        for v in ("ours_kd", "ref_kd", "ours_dkd", "ref_dkd") if dkd_rows else ("ours_kd", "ref_kd"):
            mem[v] = _peak_memory(n, c, v)
    input_bytes = n * c * 4

    def extra(ours: str, base: str) -> dict:
        d = {"n": n, "c": c, "input_tensor_bytes": input_bytes}
        if mem.get(ours) is not None and mem.get(base) is not None:
            d["peak_rss_above_inputs_ours"] = mem[ours]
            d["peak_rss_above_inputs_baseline"] = mem[base]
        return d

    def mem_note(ours: str, base: str) -> str:
        if mem.get(ours) is None or mem.get(base) is None:
            return ""
        return f"; peak extra memory {mem[ours] / 2**20:.0f} MiB vs {mem[base] / 2**20:.0f} MiB"

    kd_ratio = best["ours_kd"] / best["ref_kd"]
    rows = [
        Result(
            measure=f"KDLoss fwd+bwd, {label}", ours=best["ours_kd"], baseline=best["ref_kd"],
            baseline_name="F.kl_div(log_target) * T^2 + CE", ratio_kind="overhead", target="<= 1.1x",
            passed=kd_ratio <= 1.1, note=f"T={T}, alpha={ALPHA}" + mem_note("ours_kd", "ref_kd"),
            extra=extra("ours_kd", "ref_kd"),
        ),
        Result(
            measure=f"seed nn.KLDivLoss()(student, teacher) fwd+bwd, {label}", ours=best["seed"], baseline=None,
            note="timed only: wrong loss (raw outputs, mean over classes)", extra={"n": n, "c": c},
        ),
    ]
    if not dkd_rows:
        return rows
    return rows + [
        Result(
            measure=f"DKDLoss + CE fwd+bwd, {label}", ours=best["ours_dkd"], baseline=best["ref_dkd"],
            baseline_name="mdistiller dkd_loss + CE", ratio_kind="overhead",
            note="informational" + mem_note("ours_dkd", "ref_dkd"), extra=extra("ours_dkd", "ref_dkd"),
        ),
        Result(
            measure=f"DKDLoss + CE fwd+bwd vs KD reference, {label}", ours=best["ours_dkd"],
            baseline=best["ref_kd"], baseline_name="F.kl_div(log_target) * T^2 + CE", ratio_kind="overhead",
            note="informational", extra={"n": n, "c": c},
        ),
    ]


def run(quick: bool) -> list[Result]:
    if quick:
        return _rows("B=64, C=100 (quick)", 64, 100, 5, False) + _rows(
            "B*L=4*32, C=2000 (quick)", 128, 2000, 3, False
        )
    rows = _rows("B=256, C=1000", 256, 1000, 100, True)
    n, c = 32 * 512, 32000
    # two (n, c) float32 inputs plus the reference's ~5 intermediates of that size, with a margin
    need = 9 * n * c * 4
    avail = _mem_available()
    if avail is not None and avail < need:
        SKIPPED.append(
            f"distill: token-level size B*L=32*512, C=32000 needs ~{need / 2**30:.0f} GiB free for the reference; "
            f"{avail / 2**30:.1f} GiB available"
        )
        return rows
    # DKD rows only at the first size: mdistiller's reference keeps ~10 (n, c) intermediates (20+ GiB here)
    # seconds per call: no warm-up round (best of 2 interleaved rounds), to stay within ~3 minutes on 2 cores
    return rows + _rows("B*L=32*512, C=32000", n, c, 2, True, dkd_rows=False, warmup=0)


if __name__ == "__main__":  # pragma: no cover - manual runs
    quick = "--quick" in sys.argv
    print(json.dumps([r.to_dict() for r in run(quick)], indent=1))
