"""Running the command line in-process for tests."""

from __future__ import annotations

import contextlib
import io
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


def run_cli_captured(argv: Sequence[Any]) -> tuple[Any, str, str]:
    """``run_cli`` without pytest's ``capsys`` (for module-scoped fixtures): stdout and stderr go to strings, so
    stderr is not a terminal (the demos then print plain progress lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
