"""Run every benchmark side by side and write ``benchmarks/results.md`` and ``benchmarks/results.json``.

Usage::

    python -m benchmarks            # full sizes
    python -m benchmarks --quick    # small sizes (smoke test)
    python -m benchmarks --only samplers,scores --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _modules(only: list[str] | None) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if only:
        names = [n for n in names if n.removeprefix("bench_") in only or n in only]
    return names


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"
    return f"{x:.4g} {unit}"


def render_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured {meta['date']} on {meta['machine']} (torch {meta['torch']}, {meta['threads']} threads), "
        f"{'quick' if meta['quick'] else 'full'} sizes. Ratios are measured side by side in one process.",
        "",
        "| measure | ours | baseline | ratio | target | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.get("ratio")
        kind = "x faster" if r["ratio_kind"] == "speedup" else "x of baseline"
        ratio_s = "-" if ratio is None else f"{ratio:.3g}{kind and ' ' + kind}"
        base = _fmt(r["baseline"], r["unit"])
        if r["baseline_name"]:
            base = f"{base} ({r['baseline_name']})"
        passed = {True: "pass", False: "**MISS**", None: "-"}[r["passed"]]
        measure = r["measure"] + (f" — {r['note']}" if r["note"] else "")
        ours = _fmt(r["ours"], r["unit"])
        lines.append(f"| {measure} | {ours} | {base} | {ratio_s} | {r['target'] or '-'} | {passed} |")
    if meta.get("errors"):
        lines += ["", "## Benchmarks that failed to run", ""]
        lines += [f"- `{name}`: {err}" for name, err in meta["errors"].items()]
    if meta.get("skipped"):
        lines += ["", "## Baselines skipped", ""]
        lines += [f"- {s}" for s in meta["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (e.g. samplers,scores)")
    parser.add_argument("--out-dir", default=str(HERE), help="where results.md / results.json go")
    parser.add_argument("--module-json", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))
    if args.module_json:  # child mode: run one module, write its rows as JSON
        name, path = args.module_json
        mod = importlib.import_module(f"benchmarks.{name}")
        rows = [r.to_dict() for r in mod.run(quick=args.quick)]
        Path(path).write_text(json.dumps({"rows": rows, "skipped": list(getattr(mod, "SKIPPED", []))}))
        return 0

    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    rows: list[dict] = []
    errors: dict[str, str] = {}
    skipped: list[str] = []
    for name in _modules(only):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        # Each module runs in a fresh interpreter: thread settings, allocator state and peak-RSS marks left by
        # one benchmark must not leak into the next one's figures.
        with tempfile.TemporaryDirectory() as tmp:
            out_json = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "benchmarks", "--module-json", name, str(out_json)]
            proc = subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=HERE.parent)
            if proc.returncode != 0 or not out_json.exists():
                errors[name] = f"exited with status {proc.returncode} (traceback above)"
                continue
            result = json.loads(out_json.read_text())
        skipped += result["skipped"]
        for d in result["rows"]:
            d["benchmark"] = name
            rows.append(d)
            print(f"   {d['measure']}: ours={d['ours']!r} baseline={d['baseline']!r} ratio={d['ratio']!r} "
                  f"target={d['target']!r} passed={d['passed']!r}", flush=True)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "errors": errors,
        "skipped": skipped,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "results.md").write_text(render_markdown(rows, meta))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
