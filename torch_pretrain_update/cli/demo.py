"""``pretrain-update demo``: the end-to-end comparison of update strategies (see :mod:`torch_pretrain_update.demo`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from torch_pretrain_update.cli._common import PROG, CliError, nonneg_int, one_line, open_fraction, positive_int

__all__: list[str] = []  # a command, not library API

HELP = f"""\
Pretrain a small network on an imbalanced "old" slice of sklearn's digits (written into WebDataset shards under
--out), then update it on a shifted "new" distribution (rare classes now common, images shifted and noisy) with
a budget, comparing selection strategies (random, stratified, entropy top-k / proportional, class-balanced,
a random/entropy mix, multi-round selection) x update methods (fine-tuning, partial update, KD from the old
model). Writes report.md, results.json and results.png to --out and prints the table. Progress: bars and a
status line on a terminal, else one line per stage on stderr (--no-progress: neither).

examples:
  {PROG} demo                                  # full run into ./demo_out
  {PROG} demo --quick --out /tmp/demo          # reduced run: 2 seeds, few epochs (a smoke test, not evidence)
  {PROG} demo --seeds 5 --budget 0.05
  {PROG} demo --data 'mydata/train-{{000000..000003}}.tar' --label-key cls --out my_demo
  {PROG} demo lm --quick --out /tmp/demo_lm    # the language-model demo instead (see: demo lm --help)
"""


def add_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add the ``demo`` command to the subparsers ``sub``."""
    p = sub.add_parser("demo", help="compare update strategies end to end on sklearn's digits", description=HELP,
                       formatter_class=formatter_class)
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="reduced run (2 seeds, few epochs; used by the tests)")
    p.add_argument("--seeds", type=positive_int, metavar="N", help="number of seeds (default 5; --quick: 2)")
    p.add_argument("--seed", type=nonneg_int, default=0, metavar="S", help="first seed (default 0)")
    p.add_argument("--budget", type=open_fraction, metavar="F",
                   help="fraction of the new pool the update may use (default 0.1)")
    p.add_argument("--rounds", type=positive_int, metavar="R",
                   help="rounds of the multi-round strategies (default 4; --quick: 2)")
    p.add_argument("--data", metavar="PATTERN", help="your own WebDataset shards instead of the digits")
    p.add_argument("--label-key", default="cls", metavar="K", help="label member of --data (default: cls)")
    p.add_argument("--input-key", metavar="K", help="input member of --data (default: npy, png, jpg, ...)")
    p.add_argument("--workers", type=positive_int, metavar="P",
                   help="processes running seeds in parallel (default: min(2, CPUs)); the numbers do not depend "
                        "on it, only the wall times")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run)
    from torch_pretrain_update.cli import demo_lm  # `demo lm`: the language-model demo; plain `demo` runs the digits

    demo_lm.add_parser(p.add_subparsers(dest="demo", metavar="DEMO", parser_class=type(p)), formatter_class)


def run(args: argparse.Namespace) -> int:
    """Run the demo into ``--out`` and print its table."""
    from torch_pretrain_update.demo import DemoConfig, run_demo

    overrides: dict[str, Any] = {"out": args.out, "seed": args.seed, "label_key": args.label_key,
                                 "input_key": args.input_key, "data": args.data,
                                 "progress": False if args.no_progress else None}
    for name in ("seeds", "budget", "rounds", "workers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    cfg = DemoConfig.quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create --out {cfg.out!r}: {one_line(exc)}") from exc
    result = run_demo(cfg)
    print(result["summary"])  # the table; for --quick after a note that it is a smoke test
    print(f"\nwrote {', '.join(result['files'])} (total {result['wall_s']:.1f} s)")
    return 0
