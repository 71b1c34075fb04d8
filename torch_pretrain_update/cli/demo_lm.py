"""``pretrain-update demo lm``: the language-model demo (see :mod:`torch_pretrain_update.demo.lm`)."""

from __future__ import annotations

import argparse
from typing import Any

from torch_pretrain_update.cli._common import PROG, nonneg_int, open_fraction, positive_int

__all__: list[str] = []  # a command, not library API

HELP = f"""\
Pretrain a small byte-level transformer language model on part of the Python standard library's source code,
then update it toward English prose (the pydoc topics) with a budget of 10% of a raw pool that mixes more source
code, prose and other text found in the standard library directory, with planted exact and near duplicates.
Compares selection strategies (random, perplexity top-k, perplexity + 50% random, target-matched by hashed n-gram
importance resampling, de-duplicated + target-matched, cluster-balanced on k-means pseudo-classes) x update
methods (fine-tuning, partial update with the embeddings and lower blocks frozen, token-level KD from the old
model) by bits per byte on held-out prose and source code. Everything it reads ships with Python; nothing is
downloaded. Writes report.md, results.json and results.png to --out and prints the table (about 4 minutes on 2
CPUs; --quick: under a minute). Progress: bars and a status line on a terminal, else one line per stage on
stderr (--no-progress: neither).

examples:
  {PROG} demo lm                               # full run into ./demo_lm_out
  {PROG} demo lm --quick --out /tmp/demo_lm    # reduced run (a smoke test, not evidence)
  {PROG} demo lm --seeds 6 --budget 0.05
"""


def add_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add the ``lm`` demo to the subparsers ``sub`` of the ``demo`` command."""
    p = sub.add_parser("lm", help="the language-model demo (text that ships with Python)", description=HELP,
                       formatter_class=formatter_class)
    p.add_argument("--out", default="demo_lm_out", metavar="DIR", help="output folder (default: demo_lm_out)")
    p.add_argument("--quick", action="store_true", help="reduced run (2 seeds, small pool and model; the tests)")
    p.add_argument("--seeds", type=positive_int, metavar="N", help="number of seeds (default 4; --quick: 2)")
    p.add_argument("--seed", type=nonneg_int, default=0, metavar="S", help="first seed (default 0)")
    p.add_argument("--budget", type=open_fraction, metavar="F",
                   help="fraction of the pool the update may use (default 0.1)")
    p.add_argument("--workers", type=positive_int, metavar="P",
                   help="processes running seeds in parallel (default: min(2, CPUs)); the numbers do not depend "
                        "on it, only the wall times")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the language-model demo into ``--out`` and print its table."""
    from torch_pretrain_update.demo.lm import LMConfig, run_lm_demo

    given = {k: getattr(args, k) for k in ("seeds", "budget", "workers") if getattr(args, k) is not None}
    make = LMConfig.quick_config if args.quick else LMConfig
    cfg = make(out=args.out, seed=args.seed, progress=False if args.no_progress else None, **given)
    result = run_lm_demo(cfg)  # an --out that cannot be created is an OSError: one line from main
    print(result["summary"])  # the table; for --quick after a note that it is a smoke test
    print(f"\nwrote {', '.join(result['files'])} (total {result['wall_s']:.1f} s)")
    return 0
