"""``pretrain-update weights``: class weights from a ``.npy`` file of integer labels."""

from __future__ import annotations

import argparse
import json
import time
from typing import IO, Any, Optional

import numpy as np

from torch_pretrain_update.cli._common import (
    PROG,
    CliError,
    FlagWords,
    check_output,
    label_chunks,
    positive_int,
    read_labels,
    write_file,
)

__all__: list[str] = []  # a command, not library API

#: the library's argument names in error messages -> this command's flags
FLAG_WORDS: FlagWords = [(r"beta", "--beta"), (r"alpha", "--alpha"), (r"scheme", "--scheme"),
                         (r"num_classes", "--num-classes")]

HELP = f"""\
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


def add_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add the ``weights`` command to the subparsers ``sub``."""
    from torch_pretrain_update.scoring.weights import WEIGHT_SCHEMES

    p = sub.add_parser("weights", help="class weights from integer labels", description=HELP,
                       formatter_class=formatter_class)
    p.add_argument("labels", metavar="LABELS.npy")
    p.add_argument("--scheme", choices=WEIGHT_SCHEMES, default="inverse", help="(default: inverse)")
    p.add_argument("--beta", type=float, default=0.999, help="effective_number: beta in [0, 1) (default 0.999)")
    p.add_argument("--alpha", type=float, default=0.5, help="power: alpha in [0, 1] (default 0.5)")
    p.add_argument("--num-classes", type=positive_int, metavar="C", help="default: max(label) + 1")
    p.add_argument("-o", "--output", metavar="WEIGHTS.npy|.csv|.txt",
                   help="also write the weights here; the suffix sets the format (never the labels file)")
    p.add_argument("--chunk-rows", type=positive_int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run, flag_words=FLAG_WORDS)


def _label_counts(labels: np.ndarray, num_classes: Optional[int], args: argparse.Namespace, path: str) -> np.ndarray:
    """Class counts of a (memory-mapped) label array, chunk by chunk; checks the range on the way.

    The counts are indexed by label (one weight per class id), so labels and ``--num-classes`` must stay below
    ``MAX_CLASSES`` (2**24): a larger one is an error naming it, not a MemoryError."""
    from torch_pretrain_update._checks import MAX_CLASSES

    if num_classes is not None and num_classes > MAX_CLASSES:
        raise CliError(f"--num-classes must be <= {MAX_CLASSES} (one weight per class); got {num_classes}")
    counts = np.zeros(num_classes or 0, dtype=np.int64)
    for start, part in label_chunks(labels, path, args, "count labels"):
        hi = int(part.max())
        if num_classes is not None and hi >= num_classes:
            i = start + int(np.flatnonzero(part >= num_classes)[0])
            raise CliError(f"labels {path!r} must be < --num-classes {num_classes}; got {int(labels[i])} at row {i}")
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
    return counts


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

    write_file(path, write)


def run(args: argparse.Namespace) -> int:
    """Print (and with ``-o`` write) the class weights of the labels file."""
    from torch_pretrain_update.scoring.weights import check_scheme_args, class_weights_from_counts

    t0 = time.perf_counter()
    fmt = check_output(args.output, [("the labels", args.labels)]) if args.output else None  # before any work
    check_scheme_args(args.scheme, args.beta, args.alpha)  # bad parameters fail before the labels are read
    labels = read_labels(args.labels)
    counts = _label_counts(labels, args.num_classes, args, args.labels)
    w = class_weights_from_counts(counts, scheme=args.scheme, beta=args.beta, alpha=args.alpha).numpy()
    w32 = w.astype(np.float32)
    if fmt is not None:  # -o given
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
