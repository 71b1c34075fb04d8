"""``pretrain-update select``: offline selection of K rows from a large scored dataset."""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import IO, TYPE_CHECKING, Any, Optional

import numpy as np

from torch_pretrain_update.cli._common import (
    PROG,
    CliError,
    FlagWords,
    Stage,
    check_output,
    chunk_rows,
    fraction,
    int_lines,
    label_chunks,
    load_npy,
    nonneg_int,
    positive_int,
    read_labels,
    translate_flags,
    write_file,
)

if TYPE_CHECKING:
    import torch  # imported when a command runs: --help stays fast

__all__: list[str] = []  # a command, not library API

#: the library's argument names in error messages -> this command's flags
FLAG_WORDS: FlagWords = [(r"from_logits=True", "--from-logits"), (r"from_logits", "--from-logits"),
                         (r"num_samples|k", "--budget"), (r"random_fraction", "--random-fraction"),
                         (r"exclude", "--exclude"), (r"stratify", "--labels"), (r"mode", "--mode"),
                         (r"seed", "--seed")]

SCORE_STRATEGIES = ("entropy", "margin", "least_confidence")
LABEL_STRATEGIES = ("stratified", "balanced")
SELECT_STRATEGIES = SCORE_STRATEGIES + ("random",) + LABEL_STRATEGIES


HELP = f"""\
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


def add_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add the ``select`` command to the subparsers ``sub``."""
    p = sub.add_parser("select", help="offline selection of K rows from scores or probabilities", description=HELP,
                       formatter_class=formatter_class)
    p.add_argument("input", metavar="SCORES_OR_PROBS.npy")
    p.add_argument("--budget", type=parse_budget, required=True, metavar="K",
                   help="rows to select: a count, or a fraction of the rows such as 0.1")
    p.add_argument("--strategy", required=True, choices=SELECT_STRATEGIES)
    p.add_argument("--from-logits", action="store_true", help="the 2-D input holds logits, not probabilities")
    p.add_argument("--labels", metavar="LABELS.npy", help="integer labels (stratified, balanced)")
    p.add_argument("--mode", choices=("topk", "proportional"), default="topk",
                   help="score strategies: the K highest (topk, default) or a draw with probability "
                        "proportional to the score")
    p.add_argument("--random-fraction", type=fraction, default=0.0, metavar="F",
                   help="score strategies: this share of K drawn uniformly from the rows the scores did not "
                        "pick (default 0)")
    p.add_argument("--stratify", action="store_true",
                   help="score strategies: per-class quotas from --labels, the top scores within each class")
    p.add_argument("--exclude", metavar="ROWS.npy", help="row indices never to select (e.g. already labelled)")
    p.add_argument("--seed", type=nonneg_int, default=0, metavar="S", help="seed of the random draws (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="INDICES.npy|.csv|.txt",
                   help="where to write the indices; the suffix sets the format (never one of the inputs)")
    p.add_argument("--chunk-rows", type=positive_int, metavar="N", help="rows per chunk (default: ~16 MB)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the sentence")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run, flag_words=FLAG_WORDS)


def parse_budget(text: str) -> float | int:
    """``--budget``: a count (an int >= 1) or a fraction of the rows (a float in (0, 1))."""
    try:
        count = int(text)
    except ValueError:
        pass
    else:
        if count < 1:
            raise argparse.ArgumentTypeError(f"a count must be >= 1; got {text!r}")
        return count
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a count (e.g. 1000) or a fraction (e.g. 0.1); got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1); got {text!r}")
    return value


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
            f.write(int_lines(idx[start : start + (1 << 20)]))

    write_file(path, write)


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
        rows = chunk_rows(args)
        with Stage(n, "read scores", "row", args) as bar:
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
    rows = chunk_rows(args, x.shape[1])
    with Stage(n, f"score ({args.strategy})", "row", args, done=f"scored ({args.strategy})") as bar:
        for start in range(0, n, rows):
            part = x[start : start + rows]
            try:
                s = compute_scores(part, args.strategy, from_logits=args.from_logits, name="input")
            except ValueError as exc:
                # the library names the bad row within the chunk it was given: shift it to the row in the file
                msg = translate_flags(_shift_rows(str(exc), start), FLAG_WORDS)
                raise CliError(f"{args.input!r}: {msg}") from exc
            out[start : start + len(part)] = s.numpy()
            bar.update(len(part))
    return out


def _shift_rows(message: str, offset: int) -> str:
    """``row i`` in ``message`` -> ``row offset + i``: the library names a row of the chunk it was given."""
    return re.sub(r"\brow (\d+)", lambda m: f"row {offset + int(m.group(1))}", message)


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
    arr = load_npy(path, "--exclude")
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise CliError(f"--exclude {path!r} must be 1-D integer row indices (or a bool mask); "
                       f"got shape {arr.shape}, dtype {arr.dtype}")
    return np.array(arr, dtype=bool if arr.dtype.kind == "b" else np.int64)


def _labels_array(labels: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """The labels as an in-memory int64 array (the plan functions need them whole), copied chunk by chunk and
    checked on the way (no negative label, no uint64 label above int64's maximum). Any label value is allowed:
    the selection plans only group rows by label."""
    out = np.empty(labels.shape[0], dtype=np.int64)
    for start, part in label_chunks(labels, args.labels, args, "read labels"):
        out[start : start + len(part)] = part
    return out


def _needs_labels(strategy: str) -> CliError:
    return CliError(f"--strategy {strategy} needs --labels LABELS.npy")


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations of flags that make no sense, before anything is read."""
    score_based = args.strategy in SCORE_STRATEGIES
    if args.strategy in LABEL_STRATEGIES and args.labels is None:
        raise _needs_labels(args.strategy)
    if args.stratify and not (score_based and args.labels is not None):
        raise CliError("--stratify needs a score strategy (entropy, margin, least_confidence) and --labels")
    if args.labels is not None and score_based and not args.stratify:
        raise CliError("--labels with a score strategy needs --stratify (class-balanced uncertainty)")
    if not score_based and (args.mode != "topk" or args.random_fraction):
        raise CliError(f"--mode and --random-fraction apply to the score strategies {SCORE_STRATEGIES}, "
                       f"not to {args.strategy!r}")
    if args.strategy == "balanced" and args.exclude is not None:
        raise CliError("--exclude is not supported with --strategy balanced")


def _plan(args: argparse.Namespace, n: int, k: int, scores: Optional[torch.Tensor], labels: Optional[torch.Tensor],
          exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, str, Optional[int]]:
    """``(indices, detail for the summary line, rows per class for balanced)``: the plan function of the
    strategy, epoch 0 of the matching sampler, unshuffled."""
    from torch_pretrain_update._checks import compact_labels
    from torch_pretrain_update.sampling.balanced import class_balanced_plan
    from torch_pretrain_update.sampling.entropy_plan import entropy_plan
    from torch_pretrain_update.sampling.plans import random_subset_plan, stratified_plan

    if scores is not None:
        idx = entropy_plan(scores, k, seed=args.seed, epoch=0, mode=args.mode, random_fraction=args.random_fraction,
                           exclude=exclude, stratify=labels if args.stratify else None, shuffle=False)
        fraction = f", random_fraction={args.random_fraction:g}" if args.random_fraction else ""
        return idx, f", {args.mode}{fraction}", None
    if args.strategy == "random":
        return random_subset_plan(n, k, args.seed, 0, exclude=exclude, shuffle=False), "", None
    if labels is None:  # refused by _check_flags already
        raise _needs_labels(args.strategy)
    if args.strategy == "stratified":
        return stratified_plan(labels, k, args.seed, 0, exclude=exclude, shuffle=False), "", None
    # balanced: the same number from every class present, small classes repeated (ClassBalancedSampler)
    present = int(compact_labels(labels)[1].numel())  # distinct labels: any value, nothing sized by max
    per_class = k // present
    if per_class < 1:
        raise CliError(f"--budget {k} is smaller than the number of classes present ({present})")
    idx = class_balanced_plan(labels, args.seed, 0, samples_per_class=per_class, shuffle=False)
    return idx, f", {per_class} per class x {present} classes", per_class


def run(args: argparse.Namespace) -> int:
    """Select the rows, write their indices to ``-o`` and print a summary."""
    import torch

    t0 = time.perf_counter()
    x = load_npy(args.input, "input")
    fmt = check_output(args.output, [("the input", args.input), ("--labels", args.labels),
                                      ("--exclude", args.exclude)])
    _check_input_matrix(x, args)
    n = x.shape[0]
    k = _budget_count(args.budget, n)
    _check_flags(args)
    labels = None
    if args.labels is not None:
        raw = read_labels(args.labels)
        if raw.shape[0] != n:
            raise CliError(f"--labels {args.labels!r} has {raw.shape[0]} rows but {args.input!r} has {n}")
        labels = torch.from_numpy(_labels_array(raw, args))
    exclude = None
    if args.exclude is not None:
        exclude = torch.from_numpy(_read_exclude(args.exclude, n))
    scores = None
    if args.strategy in SCORE_STRATEGIES:
        scores = torch.from_numpy(_scores_of(x, args))
    del x  # unmap the input: its pages no longer count towards this process's memory during the plan
    with Stage(n, "plan", "row", args, done=f"planned ({args.strategy}) over") as bar:
        idx, detail, per_class = _plan(args, n, k, scores, labels, exclude)
        bar.update(n)
    out = np.sort(idx.numpy().astype(np.int64, copy=False))
    with Stage(len(out), "write", "row", args, done=f"wrote {args.output} with") as bar:
        _save_indices(args.output, fmt, out)
        bar.update(len(out))
    took = time.perf_counter() - t0
    if not args.json:
        print(f"selected {len(out)} of {n} rows ({args.strategy}{detail}) in {took:.2f} s -> {args.output}")
        return 0
    summary: dict[str, Any] = {
        "command": "select", "input": args.input, "rows": n, "budget": args.budget, "budget_rows": k,
        "selected": len(out), "unique": int(len(out) and 1 + np.count_nonzero(np.diff(out))),
        "strategy": args.strategy, "seed": args.seed}
    if scores is not None:
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
