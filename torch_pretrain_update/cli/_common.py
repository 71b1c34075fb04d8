"""The ``pretrain-update`` command line: ``demo``, ``select``, ``weights``, ``inspect``.

Every command prints its help with examples (``pretrain-update select --help``). Bad arguments and unreadable
or malformed input files end with a one-line message on stderr and exit status 2 (no traceback);
``inspect`` exits 1 when it finds damage.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any, Callable, NoReturn, Optional

import numpy as np

__all__: list[str] = []  # a command, not library API

PROG = "pretrain-update"
EXIT_USAGE = 2
EXIT_DAMAGED = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``prog: error: message (see --help)``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


# ---------------------------------------------------------------------------------------------------- inputs
def _load_npy(path: str, what: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")`` (a memory map: nothing is read until used); errors -> CliError."""
    if not os.path.exists(path):
        raise CliError(f"{what} file {path!r} does not exist")
    if os.path.isdir(path):
        raise CliError(f"{what} {path!r} is a directory, not a .npy file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # ValueError (pickled/object data), OSError, UnpicklingError (not an .npy file) ...
        raise CliError(f"cannot read {what} {path!r} as a .npy array: {_one_line(exc)}") from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise CliError(f"{what} {path!r} is an .npz archive; pass a single .npy array")
    if arr.dtype.hasobject:
        raise CliError(f"{what} {path!r} holds objects; need a numeric array")
    return arr


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


def _check_output(path: str, inputs: Sequence[tuple[str, Optional[str]]]) -> str:
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


def _write_file(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a uniquely named temporary file in the same folder, which then
    replaces ``path``. On any failure (also KeyboardInterrupt) the temporary file is removed and ``path`` is left
    as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise CliError(f"cannot write {path!r}: {_one_line(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CliError(f"cannot write {path!r}: {_one_line(exc)}") from exc
        raise


def _int_lines(values: np.ndarray) -> bytes:
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


def _save_indices(path: str, fmt: str, idx: np.ndarray) -> None:
    """Row indices: ``.npy`` int64; ``.csv`` a header line ``index`` then one index per line; ``.txt`` one index
    per line."""

    def write(f: IO[bytes]) -> None:
        if fmt == "npy":
            np.save(f, idx)
            return
        if fmt == "csv":
            f.write(b"index\n")
        for start in range(0, len(idx), 1 << 20):
            f.write(_int_lines(idx[start : start + (1 << 20)]))

    _write_file(path, write)


def _save_class_weights(path: str, fmt: str, w: np.ndarray) -> None:
    """Class weights (float32): ``.npy``; ``.csv`` a header ``class,weight`` then one class per line; ``.txt``
    one weight per line (line i = class i). Text holds the shortest decimal that reads back as the same float32."""

    def write(f: IO[bytes]) -> None:
        if fmt == "npy":
            np.save(f, w)
            return
        text = w.astype(str).tolist()
        if fmt == "csv":
            lines = ["class,weight"] + [f"{c},{t}" for c, t in enumerate(text)]
        else:
            lines = text
        f.write(("\n".join(lines) + "\n").encode())

    _write_file(path, write)


# past tense of a stage for the plain progress line ("weights: counted labels of 1,000 rows in 0.1 s")
_DONE = {"count labels": "counted labels of", "read labels": "read labels of", "read scores": "read scores of"}


class _Stage:
    """Progress of one stage. On a terminal (stderr is a tty) a tqdm bar in human units ("2.58M rows/s"); otherwise
    one plain line on stderr when the stage ends; nothing with ``--no-progress``. A context manager with
    ``update(n)``, like the tqdm bar it wraps."""

    def __init__(self, total: int, desc: str, unit: str, args: argparse.Namespace, done: Optional[str] = None):
        self.n = 0
        self._unit = unit
        self._line = None
        self._bar = None
        self._t0 = time.perf_counter()
        if getattr(args, "no_progress", False):
            return
        if _stderr_is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}s", unit_scale=True, leave=False,
                             file=sys.stderr)
        else:
            self._line = f"{getattr(args, 'command', None) or PROG}: {done or _DONE.get(desc, desc + ':')}"

    def update(self, n: int) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._line is not None and exc_type is None:
            took = time.perf_counter() - self._t0
            print(f"{self._line} {self.n:,} {self._unit}s in {took:.1f} s", file=sys.stderr, flush=True)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _bar(total: int, desc: str, unit: str, args: argparse.Namespace, done: Optional[str] = None) -> _Stage:
    return _Stage(total, desc, unit, args, done)


def _chunk_rows(args: argparse.Namespace, cols: int) -> int:
    if args.chunk_rows is not None:
        return args.chunk_rows
    return max(1, (1 << 22) // max(1, cols))  # ~16 MB of float32 per chunk


def _parse_budget(text: str) -> float | int:
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a count (e.g. 1000) or a fraction (e.g. 0.1); got {text!r}"
            ) from None
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1); got {text!r}") from None
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"a count must be >= 1; got {text!r}")
    return value


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


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    value = _fraction(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------- weights
def _read_labels(path: str, args: argparse.Namespace, *, what: str = "labels") -> np.ndarray:
    arr = _load_npy(path, what)
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


def _label_counts(labels: np.ndarray, num_classes: Optional[int], args: argparse.Namespace, path: str) -> np.ndarray:
    """Class counts of a (memory-mapped) label array, chunk by chunk; checks the range on the way.

    The counts are indexed by label (one weight per class id), so labels and ``--num-classes`` must stay below
    ``MAX_CLASSES`` (2**24): a larger one is an error naming it, not a MemoryError."""
    from torch_pretrain_update._checks import MAX_CLASSES

    if num_classes is not None and num_classes > MAX_CLASSES:
        raise CliError(f"--num-classes must be <= {MAX_CLASSES} (one weight per class); got {num_classes}")
    n = labels.shape[0]
    rows = args.chunk_rows or (1 << 22)
    counts = np.zeros(num_classes or 0, dtype=np.int64)
    with _bar(n, "count labels", "row", args) as bar:
        for start in range(0, n, rows):
            part = np.asarray(labels[start : start + rows])
            _check_label_chunk(part, start, path)
            hi = int(part.max())
            if num_classes is not None and hi >= num_classes:
                i = start + int(np.flatnonzero(part >= num_classes)[0])
                raise CliError(
                    f"labels {path!r} must be < --num-classes {num_classes}; got {int(labels[i])} at row {i}"
                )
            if hi >= MAX_CLASSES:
                i = start + int(np.flatnonzero(part >= MAX_CLASSES)[0])
                raise CliError(
                    f"labels {path!r} must be < {MAX_CLASSES} (class weights are indexed by label: relabel the "
                    f"classes as 0..C-1); got {int(labels[i])} at row {i}"
                )
            part_counts = np.bincount(part.astype(np.int64, copy=False), minlength=len(counts))
            if len(part_counts) > len(counts):
                counts = np.concatenate([counts, np.zeros(len(part_counts) - len(counts), np.int64)])
            counts += part_counts
            bar.update(len(part))
    return counts


def cmd_weights(args: argparse.Namespace) -> int:
    from torch_pretrain_update.scoring.weights import check_scheme_args, class_weights_from_counts

    t0 = time.perf_counter()
    fmt = _check_output(args.output, [("the labels", args.labels)]) if args.output else None  # before any work
    check_scheme_args(args.scheme, args.beta, args.alpha)  # bad parameters fail before the labels are read
    labels = _read_labels(args.labels, args)
    counts = _label_counts(labels, args.num_classes, args, args.labels)
    w = class_weights_from_counts(counts, scheme=args.scheme, beta=args.beta, alpha=args.alpha).numpy()
    w32 = w.astype(np.float32)
    if args.output:
        _save_class_weights(args.output, fmt, w32)
    if args.json:
        summary: dict[str, Any] = {"command": "weights", "labels": args.labels, "num_labels": int(counts.sum()),
                                   "num_classes": len(counts), "scheme": args.scheme}
        if args.scheme == "effective_number":
            summary["beta"] = args.beta
        if args.scheme == "power":
            summary["alpha"] = args.alpha
        summary.update({"class_counts": {str(c): int(n) for c, n in enumerate(counts)},
                        # the shortest decimal of each float32 (what -o wrote), not its float64 expansion
                        "weights": [float(t) for t in w32.astype(str).tolist()],
                        "output": args.output, "format": fmt, "seconds": round(time.perf_counter() - t0, 4)})
        print(json.dumps(summary, indent=1))
        return 0
    detail = {"effective_number": f", beta={args.beta:g}", "power": f", alpha={args.alpha:g}"}.get(args.scheme, "")
    print(f"class weights ({args.scheme}{detail}) of {int(counts.sum())} labels in {len(counts)} classes; "
          "mean weight over the samples = 1")
    print(f"{'class':>6} {'count':>12} {'weight':>12}")
    for c, (n, wc) in enumerate(zip(counts, w)):
        print(f"{c:>6} {int(n):>12} {float(wc):>12.6g}")
    if args.output:
        print(f"wrote {len(w)} class weights (float32, .{fmt}) to {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------------- select
SCORE_STRATEGIES = ("entropy", "margin", "least_confidence")
LABEL_STRATEGIES = ("stratified", "balanced")
SELECT_STRATEGIES = SCORE_STRATEGIES + ("random",) + LABEL_STRATEGIES


def _scores_of(x: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """A score per row, read or computed chunk by chunk: the 1-D input itself (copied out of the memory map,
    checked finite), or the uncertainty score (float32) of each row of a 2-D input."""
    from torch_pretrain_update.scoring.scores import compute_scores

    n = x.shape[0]
    if x.ndim == 1:
        if args.from_logits:
            raise CliError(f"--from-logits needs a 2-D (N, C) input; {args.input!r} is 1-D (scores)")
        if x.dtype.kind != "f":
            raise CliError(f"scores {args.input!r} must be floating point; got dtype {x.dtype}")
        out = np.empty(n, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        rows = _chunk_rows(args, 1)
        with _bar(n, "read scores", "row", args) as bar:
            for start in range(0, n, rows):
                part = out[start : start + rows]
                part[...] = x[start : start + rows]
                bad = ~np.isfinite(part)
                if bad.any():
                    i = start + int(np.flatnonzero(bad)[0])
                    raise CliError(f"scores must be finite; {args.input!r} has {float(x[i])} at row {i}")
                bar.update(len(part))
        return out
    out = np.empty(n, dtype=np.float32)
    rows = _chunk_rows(args, x.shape[1])
    with _bar(n, f"score ({args.strategy})", "row", args, done=f"scored ({args.strategy})") as bar:
        for start in range(0, n, rows):
            part = x[start : start + rows]
            try:
                s = compute_scores(part, args.strategy, from_logits=args.from_logits, name="input")
            except ValueError as exc:
                # the library names the bad row within the chunk it was given: shift it to the row in the file
                msg = re.sub(r"\brow (\d+)", lambda m, at=start: f"row {at + int(m.group(1))}", str(exc))
                msg = _cli_words(msg, args.command)
                raise CliError(f"{args.input!r}: {msg}") from exc
            out[start : start + len(part)] = s.numpy()
            bar.update(len(part))
    return out


def _check_input_matrix(x: np.ndarray, args: argparse.Namespace) -> None:
    if x.ndim not in (1, 2):
        raise CliError(f"{args.input!r} must be 1-D scores (N,) or 2-D probabilities/logits (N, C); "
                       f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise CliError(f"{args.input!r} has no rows")
    if x.ndim == 2 and args.strategy in SCORE_STRATEGIES:
        if x.dtype.kind != "f":
            raise CliError(f"{args.input!r} must be floating point; got dtype {x.dtype}")
        if x.shape[1] < 2:
            raise CliError(f"{args.input!r} must have at least 2 columns (classes); got shape {x.shape}")


def _budget_count(budget: float | int, n: int) -> int:
    if isinstance(budget, float):
        k = int(round(budget * n))
        if k < 1:
            raise CliError(f"--budget {budget} of {n} rows selects nothing; ask for at least one row")
        return k
    if budget > n:
        raise CliError(f"--budget {budget} is larger than the number of rows ({n})")
    return budget


def _read_exclude(path: str, n: int) -> np.ndarray:
    arr = _load_npy(path, "--exclude")
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise CliError(f"--exclude {path!r} must be 1-D integer row indices (or a bool mask); "
                       f"got shape {arr.shape}, dtype {arr.dtype}")
    return np.array(arr, dtype=bool if arr.dtype.kind == "b" else np.int64)


def _labels_array(labels: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """The labels as an in-memory int64 array (the plan functions need them whole), copied chunk by chunk and
    checked on the way (no negative label, no uint64 label above int64's maximum). Any label value is allowed:
    the selection plans only group rows by label."""
    n = labels.shape[0]
    out = np.empty(n, dtype=np.int64)
    rows = args.chunk_rows or (1 << 22)
    with _bar(n, "read labels", "row", args) as bar:
        for start in range(0, n, rows):
            part = np.asarray(labels[start : start + rows])
            _check_label_chunk(part, start, args.labels)
            out[start : start + rows] = part
            bar.update(min(rows, n - start))
    return out


def cmd_select(args: argparse.Namespace) -> int:
    import torch

    from torch_pretrain_update.sampling.plans import class_balanced_plan, random_subset_plan, stratified_plan
    from torch_pretrain_update.sampling.weighted_plans import entropy_plan

    t0 = time.perf_counter()
    x = _load_npy(args.input, "input")
    fmt = _check_output(args.output, [("the input", args.input), ("--labels", args.labels),
                                      ("--exclude", args.exclude)])
    _check_input_matrix(x, args)
    n = x.shape[0]
    k = _budget_count(args.budget, n)
    score_based = args.strategy in SCORE_STRATEGIES
    if args.strategy in LABEL_STRATEGIES and args.labels is None:
        raise CliError(f"--strategy {args.strategy} needs --labels LABELS.npy")
    if args.stratify and not (score_based and args.labels is not None):
        raise CliError("--stratify needs a score strategy (entropy, margin, least_confidence) and --labels")
    if args.labels is not None and score_based and not args.stratify:
        raise CliError("--labels with a score strategy needs --stratify (class-balanced uncertainty)")
    if not score_based and (args.mode != "topk" or args.random_fraction):
        raise CliError(f"--mode and --random-fraction apply to the score strategies {SCORE_STRATEGIES}, "
                       f"not to {args.strategy!r}")
    if args.strategy == "balanced" and args.exclude is not None:
        raise CliError("--exclude is not supported with --strategy balanced")
    labels = None
    if args.labels is not None:
        raw = _read_labels(args.labels, args)
        if raw.shape[0] != n:
            raise CliError(f"--labels {args.labels!r} has {raw.shape[0]} rows but {args.input!r} has {n}")
        labels = torch.from_numpy(_labels_array(raw, args))
    exclude = None
    if args.exclude is not None:
        exclude = torch.from_numpy(_read_exclude(args.exclude, n))
    detail = ""
    per_class = None
    if score_based:
        scores = torch.from_numpy(_scores_of(x, args))
        del x  # unmap the input: its pages no longer count towards this process's memory during the plan
    with _bar(n, "plan", "row", args, done=f"planned ({args.strategy}) over") as bar:
        if score_based:
            idx = entropy_plan(scores, k, seed=args.seed, epoch=0, mode=args.mode,
                               random_fraction=args.random_fraction, exclude=exclude,
                               stratify=labels if args.stratify else None, shuffle=False)
            detail = f", {args.mode}" + (f", random_fraction={args.random_fraction:g}"
                                         if args.random_fraction else "")
        elif args.strategy == "random":
            idx = random_subset_plan(n, k, args.seed, 0, exclude=exclude, shuffle=False)
        elif args.strategy == "stratified":
            idx = stratified_plan(labels, k, args.seed, 0, exclude=exclude, shuffle=False)
        else:  # balanced: the same number from every class present, small classes repeated (ClassBalancedSampler)
            from torch_pretrain_update._checks import compact_labels

            present = int(compact_labels(labels)[1].numel())  # distinct labels: any value, nothing sized by max
            per_class = k // present
            if per_class < 1:
                raise CliError(f"--budget {k} is smaller than the number of classes present ({present})")
            idx = class_balanced_plan(labels, args.seed, 0, samples_per_class=per_class, shuffle=False)
            detail = f", {per_class} per class x {present} classes"
        bar.update(n)
    out = np.sort(idx.numpy().astype(np.int64, copy=False))
    with _bar(len(out), "write", "row", args, done=f"wrote {args.output} with") as bar:
        _save_indices(args.output, fmt, out)
        bar.update(len(out))
    took = time.perf_counter() - t0
    if args.json:
        summary: dict[str, Any] = {
            "command": "select", "input": args.input, "rows": n, "budget": args.budget, "budget_rows": k,
            "selected": len(out), "unique": int(len(out) and 1 + np.count_nonzero(np.diff(out))),
            "strategy": args.strategy, "seed": args.seed}
        if score_based:
            summary.update({"mode": args.mode, "random_fraction": args.random_fraction,
                            "from_logits": args.from_logits, "stratify": args.stratify})
        if per_class is not None:
            summary["samples_per_class"] = per_class
        summary.update({"labels": args.labels, "exclude": args.exclude,
                        "excluded": None if exclude is None else int(exclude.sum() if exclude.dtype == torch.bool
                                                                     else exclude.unique().numel())})
        if labels is not None:  # classes present in the selection (labels of repeated rows counted each time)
            cls, cnt = np.unique(labels.numpy()[out], return_counts=True)
            summary["class_counts"] = {str(int(c)): int(m) for c, m in zip(cls, cnt)}
        summary.update({"output": args.output, "format": fmt, "seconds": round(took, 4)})
        print(json.dumps(summary, indent=1))
        return 0
    print(f"selected {len(out)} of {n} rows ({args.strategy}{detail}) in {took:.2f} s -> {args.output}")
    return 0


# --------------------------------------------------------------------------------------------------- inspect
_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand_globs(urls: list[str]) -> list[str]:
    """Expand shell globs (``'shards/*.tar'`` quoted, so the shell did not) in local paths, sorted; a pattern
    that matches no file is an error. An existing file whose name holds ``*?[`` is taken as it is."""
    out: list[str] = []
    for url in urls:
        if "://" in url or url.startswith("pipe:") or not _GLOB_CHARS.search(url) or os.path.exists(url):
            out.append(url)
            continue
        matches = sorted(m for m in glob.glob(url) if not os.path.isdir(m))
        if not matches:
            raise CliError(f"no shard file matches {url!r} (globs and brace patterns such as "
                           "'train-{000000..000009}.tar' are expanded)")
        out.extend(matches)
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from torch_pretrain_update.data.manifest_find import find_manifest
    from torch_pretrain_update.data.shards import expand_urls, inspect_shards

    urls: list[str] = []
    for pattern in args.shards:
        urls.extend(_expand_globs(expand_urls(pattern)))
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and not any(os.path.exists(u) for u in local):
        raise CliError(f"no such shard file: {local[0]!r}" + (f" (nor any of the {len(local)} given)"
                                                               if len(local) > 1 else ""))
    manifest = args.manifest
    if manifest is not None and os.path.isdir(manifest):  # refused, not guessed: name the file to pass
        from torch_pretrain_update.data.shards import _directory_message

        raise CliError(f"--manifest {_directory_message(manifest, '--manifest')}")
    if manifest is not None and not os.path.isfile(manifest):
        raise CliError(f"manifest {manifest!r} does not exist")
    if manifest is None and not args.no_manifest:
        manifest = find_manifest(urls)
    t0 = time.perf_counter()
    report = inspect_shards(urls, manifest, label_key=args.label_key, num_classes=args.num_classes,
                            progress=not args.no_progress and _stderr_is_terminal())
    if not args.no_progress and not _stderr_is_terminal():  # the plain line of the progress rule (see _Stage)
        print(f"inspect: read {len(urls):,} shards ({report.num_samples:,} samples) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        if manifest is None:
            print("manifest: none (counts not checked against one; pass --manifest)")
        else:
            print(f"manifest: {manifest}")
        print(report.format())
    return 0 if report.ok else EXIT_DAMAGED


# ------------------------------------------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
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
        raise CliError(f"cannot create --out {cfg.out!r}: {_one_line(exc)}") from exc
    result = run_demo(cfg)
    print(result["summary"])  # the table; for --quick after a note that it is a smoke test
    print(f"\nwrote {', '.join(result['files'])} (total {result['wall_s']:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------------------------- parser
_MAIN_EXAMPLES = f"""\
examples:
  {PROG} demo --out demo_out                  # the end-to-end comparison on sklearn's digits (~1-2 min)
  {PROG} demo --quick --out /tmp/demo          # a reduced run (seconds)
  {PROG} select probs.npy --budget 0.1 --strategy entropy -o keep.npy
  {PROG} weights labels.npy --scheme effective_number --beta 0.999
  {PROG} inspect 'shards/train-{{000000..000009}}.tar'
  {PROG} --version

Run '{PROG} COMMAND --help' for a command's options.
"""

_DEMO_HELP = f"""\
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
"""

_SELECT_HELP = f"""\
Select rows of a large scored dataset offline. INPUT is a .npy file: 1-D scores (higher = pick first) or 2-D
(N, C) probabilities (or logits with --from-logits), scored by --strategy. The input is memory-mapped and
processed in chunks (N = 1e8 rows fit in a few GB). Writes the chosen row indices (int64, sorted, no
duplicates except that balanced repeats rows of classes smaller than K / classes) to -o, in the format its
suffix names: .npy (int64 array), .csv (a header line "index", then one index per line) or .txt (one index per
line); -o may not be one of the input files. --json prints a summary (counts, budget, strategy, output,
per-class counts with --labels, seconds) as one JSON object. Progress: a bar on a terminal, else one line per
stage on stderr (--no-progress: neither).

strategies (the library's plan functions, epoch 0 of the matching sampler):
  entropy, margin, least_confidence   --mode topk: the K highest scores (ties: lower row first);
                                      --mode proportional: a draw without replacement, P ~ score;
                                      --random-fraction F: F*K of them uniform from the rest (EntropySampler)
  random                              K rows uniformly without replacement (RandomSubsetSampler)
  stratified                          per-class quotas proportional to the class sizes (StratifiedSampler)
  balanced                            K // classes rows of every class (ClassBalancedSampler)

examples:
  {PROG} select probs.npy --budget 100000 --strategy entropy -o keep.npy
  {PROG} select logits.npy --from-logits --budget 0.1 --strategy margin -o keep.npy
  {PROG} select scores.npy --budget 5000 --strategy entropy --mode proportional --seed 1 -o keep.npy
  {PROG} select probs.npy --budget 0.1 --strategy stratified --labels labels.npy -o keep.npy
  {PROG} select probs.npy --budget 1000 --strategy entropy --random-fraction 0.5 --exclude done.npy -o keep.npy
  {PROG} select probs.npy --budget 0.1 --strategy entropy -o keep.csv --json
"""

_WEIGHTS_HELP = f"""\
Class weights from a .npy file of integer labels (memory-mapped, counted in chunks). The weights are
normalised so that the mean weight over the samples is 1. Prints a table (--json: one JSON object with the
counts and weights); -o writes them, float32, one per class, in the format its suffix names: .npy, .csv
(header "class,weight", one class per line) or .txt (one weight per line, line i = class i).

schemes: inverse (1/n_c), sqrt_inverse (1/sqrt(n_c)), effective_number ((1-beta)/(1-beta^n_c)),
power (n_c^(alpha-1)), uniform.

examples:
  {PROG} weights labels.npy --scheme effective_number --beta 0.999
  {PROG} weights labels.npy --scheme inverse --num-classes 10 -o class_weights.npy
  {PROG} weights labels.npy --scheme sqrt_inverse -o class_weights.csv --json
"""

_INSPECT_HELP = f"""\
Read every member of every shard (nothing is decoded except the label) and report per-shard sample counts,
the class histogram, members that would be unpickled by a default decoder, and damage: truncated or corrupt
tar data, and counts, histograms, sizes or SHA-256 that differ from the manifest. The manifest written by
write_shards next to the shards (train-000000.tar -> train-manifest.json) is used when present.
Exit status: 0 all shards healthy, 1 damage found, 2 bad arguments.

examples:
  {PROG} inspect 'shards/train-{{000000..000009}}.tar'
  {PROG} inspect shards/*.tar --manifest shards/train-manifest.json --json
  {PROG} inspect 'shards/*.tar'                 # a quoted glob is expanded (sorted), like a brace pattern
"""


def build_parser() -> argparse.ArgumentParser:
    from torch_pretrain_update.scoring.weights import WEIGHT_SCHEMES

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Update pretrained models on new data: selection, weighting, "
                     "inspection, and an end-to-end demo.", epilog=_MAIN_EXAMPLES, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="compare update strategies end to end on sklearn's digits",
                       description=_DEMO_HELP, formatter_class=fmt)
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="reduced run (2 seeds, few epochs; used by the tests)")
    p.add_argument("--seeds", type=_positive_int, metavar="N", help="number of seeds (default 5; --quick: 2)")
    p.add_argument("--seed", type=_nonneg_int, default=0, metavar="S", help="first seed (default 0)")
    p.add_argument("--budget", type=_open_fraction, metavar="F",
                   help="fraction of the new pool the update may use (default 0.1)")
    p.add_argument("--rounds", type=_positive_int, metavar="R",
                   help="rounds of the multi-round strategies (default 4; --quick: 2)")
    p.add_argument("--data", metavar="PATTERN", help="your own WebDataset shards instead of the digits")
    p.add_argument("--label-key", default="cls", metavar="K", help="label member of --data (default: cls)")
    p.add_argument("--input-key", metavar="K", help="input member of --data (default: npy, png, jpg, ...)")
    p.add_argument("--workers", type=_positive_int, metavar="P",
                   help="processes running seeds in parallel (default: min(2, CPUs)); the numbers do not depend "
                        "on it, only the wall times")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("select", help="offline selection of K rows from scores or probabilities",
                       description=_SELECT_HELP, formatter_class=fmt)
    p.add_argument("input", metavar="SCORES_OR_PROBS.npy")
    p.add_argument("--budget", type=_parse_budget, required=True, metavar="K",
                   help="rows to select: a count, or a fraction of the rows such as 0.1")
    p.add_argument("--strategy", required=True, choices=SELECT_STRATEGIES)
    p.add_argument("--from-logits", action="store_true", help="the 2-D input holds logits, not probabilities")
    p.add_argument("--labels", metavar="LABELS.npy", help="integer labels (stratified, balanced)")
    p.add_argument("--mode", choices=("topk", "proportional"), default="topk",
                   help="score strategies: the K highest (topk, default) or a draw with probability "
                        "proportional to the score")
    p.add_argument("--random-fraction", type=_fraction, default=0.0, metavar="F",
                   help="score strategies: this share of K drawn uniformly from the rows the scores did not "
                        "pick (default 0)")
    p.add_argument("--stratify", action="store_true",
                   help="score strategies: per-class quotas from --labels, the top scores within each class")
    p.add_argument("--exclude", metavar="ROWS.npy", help="row indices never to select (e.g. already labelled)")
    p.add_argument("--seed", type=_nonneg_int, default=0, metavar="S", help="seed of the random draws (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="INDICES.npy|.csv|.txt",
                   help="where to write the indices; the suffix sets the format (never one of the inputs)")
    p.add_argument("--chunk-rows", type=_positive_int, metavar="N", help="rows per chunk (default: ~16 MB)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the sentence")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("weights", help="class weights from integer labels", description=_WEIGHTS_HELP,
                       formatter_class=fmt)
    p.add_argument("labels", metavar="LABELS.npy")
    p.add_argument("--scheme", choices=WEIGHT_SCHEMES, default="inverse", help="(default: inverse)")
    p.add_argument("--beta", type=float, default=0.999, help="effective_number: beta in [0, 1) (default 0.999)")
    p.add_argument("--alpha", type=float, default=0.5, help="power: alpha in [0, 1] (default 0.5)")
    p.add_argument("--num-classes", type=_positive_int, metavar="C", help="default: max(label) + 1")
    p.add_argument("-o", "--output", metavar="WEIGHTS.npy|.csv|.txt",
                   help="also write the weights here; the suffix sets the format (never the labels file)")
    p.add_argument("--chunk-rows", type=_positive_int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("inspect", help="per-shard counts, class histogram, integrity against the manifest",
                       description=_INSPECT_HELP, formatter_class=fmt)
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard paths, brace patterns or globs")
    p.add_argument("--manifest", metavar="PATH", help="manifest to check against (default: found next to them)")
    p.add_argument("--no-manifest", action="store_true", help="do not look for a manifest")
    p.add_argument("--label-key", metavar="K", help="label member (default: the manifest's, else cls)")
    p.add_argument("--num-classes", type=_positive_int, metavar="C", help="labels must be below C")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=cmd_inspect)
    return parser


def _version() -> str:
    from torch_pretrain_update import __version__

    return __version__


# library argument names -> the flags that set them, per command: a message must say what to type
_CLI_WORDS: dict[str, list[tuple[str, str]]] = {
    "select": [(r"from_logits=True", "--from-logits"), (r"from_logits", "--from-logits"),
               (r"num_samples|k", "--budget"), (r"random_fraction", "--random-fraction"), (r"exclude", "--exclude"),
               (r"stratify", "--labels"), (r"mode", "--mode"), (r"seed", "--seed")],
    "weights": [(r"beta", "--beta"), (r"alpha", "--alpha"), (r"scheme", "--scheme"), (r"num_classes", "--num-classes")],
}


def _cli_words(message: str, command: Optional[str]) -> str:
    """Translate the library's argument names in ``message`` to the command's flags (``from_logits=True`` ->
    ``--from-logits``). Only whole words outside paths and flags are touched."""
    for name, flag in _CLI_WORDS.get(command or "", []):
        message = re.sub(rf"(?<![\w./'\"-])(?:{name})(?![\w./'\"-]|=\w)", flag, message)
    return message


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
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
    except (ValueError, TypeError) as exc:  # the library's argument errors, in the words of the command line
        if debug:
            raise
        print(f"{where}: error: {_one_line(_cli_words(str(exc), args.command))}", file=sys.stderr)
    except OSError as exc:  # file errors (their messages hold paths: nothing is translated)
        if debug:
            raise
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
