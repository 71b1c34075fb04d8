"""What every ``pretrain-update`` command shares: the parser class and error convention, reading ``.npy``
inputs and labels, writing ``-o`` through a temporary file, the progress rule, argparse value types, and the
translation of the library's argument names into the command's flags in error messages."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, Callable, NoReturn, Optional

import numpy as np

__all__: list[str] = []  # private module of the command line

PROG = "pretrain-update"
EXIT_USAGE = 2
EXIT_DAMAGED = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``prog: error: message (see --help)``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: Any) -> str:
    """``message`` on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(message).split())


# ---------------------------------------------------------------------------------------------------- inputs
def load_npy(path: str, what: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")`` (a memory map: nothing is read until used); errors -> CliError."""
    if not os.path.exists(path):
        raise CliError(f"{what} file {path!r} does not exist")
    if os.path.isdir(path):
        raise CliError(f"{what} {path!r} is a directory, not a .npy file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # ValueError (pickled/object data), OSError, UnpicklingError (not an .npy file) ...
        raise CliError(f"cannot read {what} {path!r} as a .npy array: {one_line(exc)}") from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise CliError(f"{what} {path!r} is an .npz archive; pass a single .npy array")
    if arr.dtype.hasobject:
        raise CliError(f"{what} {path!r} holds objects; need a numeric array")
    return arr


# --------------------------------------------------------------------------------------------------- outputs
# -o chooses the format by its suffix (never a silent .npy under another name)
OUTPUT_FORMATS = {".npy": "npy", ".csv": "csv", ".txt": "txt"}


def _output_format(path: str) -> str:
    suffix = os.path.splitext(path)[1]
    fmt = OUTPUT_FORMATS.get(suffix.lower())
    if fmt is None:
        raise CliError(f"-o {path!r}: unknown suffix {suffix or '(none)'!r}; the output format is chosen by the "
                       f"suffix, one of {', '.join(OUTPUT_FORMATS)}")
    return fmt


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # also through "./", symlinks and hard links
    except OSError:  # one of them does not exist (yet): they cannot be the same file
        return False


def check_output(path: str, inputs: Sequence[tuple[str, Optional[str]]]) -> str:
    """Check ``-o`` before any work is done; returns its format (``npy``, ``csv`` or ``txt``).

    ``inputs`` are ``(what, path)`` pairs of the files the command reads: writing over one of them would destroy
    it (the command replaces the output file), so that is refused."""
    fmt = _output_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise CliError(f"output {path!r} is a directory")
    for what, src in inputs:
        if src is not None and _same_file(path, src):
            raise CliError(f"-o {path!r} is the same file as {what} {src!r}: writing it would destroy the input; "
                           "choose another output path")
    if not os.access(folder, os.W_OK):  # fail now, not after the work is done
        raise CliError(f"output folder {folder!r} is not writable")
    return fmt


def _new_file_mode(path: str) -> int:
    """The permissions ``open(path, "w")`` would give (mkstemp's files are private, 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # replacing a file keeps its permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_file(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a uniquely named temporary file in the same folder, which then
    replaces ``path``. On any failure (also KeyboardInterrupt) the temporary file is removed and ``path`` is left
    as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise CliError(f"cannot write {path!r}: {one_line(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CliError(f"cannot write {path!r}: {one_line(exc)}") from exc
        raise


def int_lines(values: np.ndarray) -> bytes:
    """Non-negative integers as decimal text, one per line; vectorised (``str()`` per value costs ~10x more)."""
    v = np.asarray(values, dtype=np.int64)
    if v.size == 0:
        return b""
    width = len(str(int(v.max())))
    digits = np.empty((v.size, width + 1), dtype=np.uint8)
    rest = v.copy()
    for col in range(width - 1, -1, -1):
        digits[:, col] = 48 + rest % 10  # ASCII '0'
        rest //= 10
    digits[:, width] = 10  # '\n'
    ndigits = np.ones(v.size, dtype=np.int64)
    for j in range(1, width):
        ndigits += v >= 10**j
    keep = np.arange(width + 1) >= (width - ndigits)[:, None]  # drop the leading zeros
    return digits[keep].tobytes()


# -------------------------------------------------------------------------------------------------- progress
# past tense of a stage for the plain progress line ("weights: counted labels of 1,000 rows in 0.1 s")
_DONE = {"count labels": "counted labels of", "read labels": "read labels of", "read scores": "read scores of"}


class Stage:
    """Progress of one stage. On a terminal (stderr is a tty) a tqdm bar in human units ("2.58M rows/s"); otherwise
    one plain line on stderr when the stage ends; nothing with ``--no-progress``. A context manager with
    ``update(n)``, like the tqdm bar it wraps."""

    def __init__(self, total: int, desc: str, unit: str, args: argparse.Namespace, done: Optional[str] = None):
        self.n = 0
        self._unit = unit
        self._line: Optional[str] = None
        self._bar: Any = None
        self._t0 = time.perf_counter()
        if getattr(args, "no_progress", False):
            return
        if stderr_is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}s", unit_scale=True, leave=False,
                             file=sys.stderr)
        else:
            self._line = f"{getattr(args, 'command', None) or PROG}: {done or _DONE.get(desc, desc + ':')}"

    def update(self, n: int) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._line is not None and exc_type is None:
            took = time.perf_counter() - self._t0
            print(f"{self._line} {self.n:,} {self._unit}s in {took:.1f} s", file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


# -------------------------------------------------------------------------------------------- argument types
def chunk_rows(args: argparse.Namespace, cols: int = 1) -> int:
    """Rows per chunk: ``--chunk-rows``, else ~16 MB of float32 for ``cols`` columns (4M rows of a vector)."""
    if args.chunk_rows is not None:
        return args.chunk_rows
    return max(1, (1 << 22) // max(1, cols))  # ~16 MB of float32 per chunk


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def fraction(text: str) -> float:
    """An argparse ``type`` for a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """An argparse ``type`` for a number in ``(0, 1]``."""
    value = fraction(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------- labels
def read_labels(path: str, what: str = "labels") -> np.ndarray:
    """A 1-D, non-empty integer ``.npy`` array (memory-mapped; values are checked chunk by chunk by the caller)."""
    arr = load_npy(path, what)
    if arr.ndim != 1:
        raise CliError(f"{what} {path!r} must be 1-D (one integer label per row); got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise CliError(f"{what} {path!r} must hold integers; got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise CliError(f"{what} {path!r} is empty")
    return arr


_INT64_MAX = (1 << 63) - 1


def _check_label_chunk(part: np.ndarray, start: int, path: str) -> None:
    """Refuse negative labels and uint64 labels above int64's maximum (reported with their value, not the
    negative number an int64 cast would give), naming the row in the file."""
    if part.dtype == np.uint64 and int(part.max()) > _INT64_MAX:
        i = int(np.flatnonzero(part > _INT64_MAX)[0])
        raise CliError(f"labels {path!r} must be <= {_INT64_MAX} (int64); got {int(part[i])} at row {start + i}")
    if part.dtype.kind == "i" and int(part.min()) < 0:
        i = int(np.flatnonzero(part < 0)[0])
        raise CliError(f"labels {path!r} must be >= 0; got {int(part[i])} at row {start + i}")


def label_chunks(labels: np.ndarray, path: str, args: argparse.Namespace,
                 desc: str) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, chunk)`` of a (memory-mapped) label array, ``chunk_rows(args)`` rows at a time, each chunk read
    into memory and checked (no negative label, no uint64 label above int64's maximum, errors naming the row in
    ``path``), with the progress of stage ``desc``."""
    n = labels.shape[0]
    rows = chunk_rows(args)
    with Stage(n, desc, "row", args) as bar:
        for start in range(0, n, rows):
            part = np.asarray(labels[start : start + rows])
            _check_label_chunk(part, start, path)
            yield start, part
            bar.update(len(part))


# ------------------------------------------------------------------------------------------------------ flags
#: a command's table of (library argument name as a regex, the flag that sets it); a message must say what to type
FlagWords = Sequence[tuple[str, str]]


def translate_flags(message: str, words: FlagWords) -> str:
    """Translate the library's argument names in ``message`` to the command's flags (``from_logits=True`` ->
    ``--from-logits``). Only whole words outside paths and flags are touched."""
    for name, flag in words:
        message = re.sub(rf"(?<![\w./'\"-])(?:{name})(?![\w./'\"-]|=\w)", flag, message)
    return message
