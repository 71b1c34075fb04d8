"""The ``pretrain-update`` command line: ``demo``, ``select``, ``weights``, ``inspect``.

Every command prints its help with examples (``pretrain-update select --help``). Bad arguments and unreadable
or malformed input files end with a one-line message on stderr and exit status 2 (no traceback);
``inspect`` exits 1 when it finds damage. One module per command (``add_parser`` and ``run``); what they share is
in ``_common``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

from torch_pretrain_update.cli import demo, inspect, select, weights
from torch_pretrain_update.cli._common import EXIT_USAGE, PROG, CliError, Parser, one_line, translate_flags

__all__ = ["main"]

_EXAMPLES = f"""\
examples:
  {PROG} demo --out demo_out                  # the end-to-end comparison on sklearn's digits (~1-2 min)
  {PROG} demo --quick --out /tmp/demo          # a reduced run (seconds)
  {PROG} select probs.npy --budget 0.1 --strategy entropy -o keep.npy
  {PROG} weights labels.npy --scheme effective_number --beta 0.999
  {PROG} inspect 'shards/train-{{000000..000009}}.tar'
  {PROG} --version

Run '{PROG} COMMAND --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``pretrain-update`` parser with every command; ``args.func(args)`` runs the chosen one."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog=PROG, description="Update pretrained models on new data: selection, weighting, "
                    "inspection, and an end-to-end demo.", epilog=_EXAMPLES, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.set_defaults(flag_words=())  # a command whose messages name flags sets its own table
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in (demo, select, weights, inspect):
        command.add_parser(sub, fmt)
    return parser


def _version() -> str:
    from torch_pretrain_update import __version__

    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pretrain-update`` (and ``python -m torch_pretrain_update``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    where = f"{PROG} {args.command}"
    debug = bool(os.environ.get("PRETRAIN_UPDATE_DEBUG"))  # set it to see the traceback of an error
    try:
        return int(args.func(args))
    except CliError as exc:
        if debug:
            raise
        print(f"{where}: error: {one_line(exc)}", file=sys.stderr)
    except (ValueError, TypeError) as exc:  # the library's argument errors, in the words of the command line
        if debug:
            raise
        print(f"{where}: error: {one_line(translate_flags(str(exc), args.flag_words))}", file=sys.stderr)
    except OSError as exc:  # file errors (their messages hold paths: nothing is translated)
        if debug:
            raise
        print(f"{where}: error: {one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE
