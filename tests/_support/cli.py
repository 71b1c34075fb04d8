"""Running the command line in-process for tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch_pretrain_update.cli import main


def run_cli(argv: Sequence[Any], capsys: Any) -> tuple[Any, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr); argparse's SystemExit included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
