"""Unlabeled text (issue 17): target matching against ``data-selection``, and sequence scores against log-softmax.

1. **Target matching.** Real text that ships with Python: the raw pool is the standard library's source split into
   documents of 40 lines, mixed with the English prose of ``pydoc_data.topics`` (paragraph groups); the target is
   a sample of other prose documents. Same documents and feature settings (unigrams + bigrams, 10 000 buckets)
   on both sides:

   - **baseline**: the ``data-selection`` package (PyPI) end to end as its README runs it: ``HashedNgramDSIR``
     over JSON-lines files, ``num_proc=1``, ``fit_importance_estimator(num_tokens_to_fit="all")`` then
     ``compute_importance_weights()`` (its pipeline featurises the raw pool twice: once to fit, once to weigh;
     selection and file writing are not timed). Without the package, a labelled reimplementation of its
     featuriser and formula runs instead (see ``SKIPPED``).
   - **ours**: ``hashed_ngram_features`` of the raw pool and the target, then ``target_log_ratio``.

   Rows: time per raw document end to end (target >= 5x faster) with the Pearson correlation of the two log
   importance weight vectors (target >= 0.99); and featurisation alone (the package's ``get_ngram_counts``
   called per document against ``hashed_ngram_features``), with the number of documents whose features are
   identical.
2. **Sequence scores.** 10**5 sequences x 256 positions x 256 vocabulary (6.5e9 logits, 26 GB in float32: more
   than this machine's memory, as in real use they come batch by batch from a model). Batches of 500 sequences,
   from a pool of 4 distinct random batches with random padding, are scored one after the other; per batch,
   side by side: ``torch.log_softmax(batch, -1)`` (the baseline: one pass that every score needs) and
   ``sequence_scores(batch, mask, score=...)`` for each score. Target: each <= 2.5x the log-softmax total.
   Memory: the extra peak RSS of ``sequence_scores`` on one in-memory tensor of 2000 sequences (524 MB) and of
   500 sequences (131 MB), against ``log_softmax`` on the larger one (which returns a tensor as large as its
   input): ours must not grow with N. Method: ``/proc/self/clear_refs`` (``5``) resets ``VmHWM`` to the current
   RSS; extra = ``VmHWM`` after the call minus ``VmRSS`` before it.

Clock: CPU time of the calling thread (``time.thread_time``) with torch limited to one thread, as in
``bench_scores``: immune to the other jobs on the shared 2-core machine; the baseline package is single-threaded
Python (``num_proc=1``).
"""

from __future__ import annotations

import json
import re
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._harness import Result, collect
from torch_pretrain_update import hashed_ngram_features, sequence_scores, target_log_ratio

SKIPPED: list[str] = []
_clock = time.thread_time

try:
    import data_selection.base
    import data_selection.hashed_ngram_dsir
    from data_selection import HashedNgramDSIR
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    # no progress bars (and not their cost)
    data_selection.base.tqdm = data_selection.hashed_ngram_dsir.tqdm = lambda iterable, **kwargs: iterable
except Exception as exc:  # pragma: no cover - depends on the environment
    HashedNgramDSIR = None
    SKIPPED.append(
        f"data-selection: not importable ({exc}); the target-matching rows use a reimplementation of its "
        "featuriser (nltk wordpunct tokens, sha256 buckets) and of its log(p + 1e-8) formula, labelled as such"
    )

    import hashlib

    def get_ngram_counts(line, n=2, num_buckets=10000):
        words = re.findall(r"\w+|[^\w\s]+", line.lower())
        counts = np.zeros(num_buckets, dtype=int)
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                gram = " ".join(words[i : i + k])
                counts[int(hashlib.sha256(gram.encode("utf-8")).hexdigest(), 16) % num_buckets] += 1
        return counts


# ----- 1. target matching -----------------------------------------------------------------------------------


def _corpus(n_raw: int, n_target: int) -> tuple[list[str], list[str]]:
    """Raw pool (code and prose, interleaved) and target (prose not in the pool), deterministic."""
    import pydoc_data.topics as topics

    paragraphs = [p.strip() for t in topics.topics.values() for p in t.split("\n\n") if len(p.split()) >= 8]
    prose = [" ".join(paragraphs[i : i + 3]) for i in range(0, len(paragraphs) - 2, 3)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = []
    for path in sorted(lib.glob("*.py")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        code += ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40) if "".join(lines[i : i + 40]).strip()]
        if len(code) >= n_raw:
            break
    rng = np.random.default_rng(0)
    prose = [prose[i] for i in rng.permutation(len(prose))]
    target, prose_raw = prose[:n_target], prose[n_target:]
    n_prose = min(len(prose_raw), n_raw // 4)
    raw = code[: n_raw - n_prose] + prose_raw[:n_prose]
    raw = [raw[i] for i in rng.permutation(len(raw))]
    return raw, target


def _dsir_weights(raw: list[str], target: list[str], tmp: Path) -> tuple[np.ndarray, float]:
    if HashedNgramDSIR is None:  # the labelled reimplementation
        t0 = _clock()
        c_raw = sum(get_ngram_counts(d) for d in raw)
        c_tgt = sum(get_ngram_counts(d) for d in target)
        log_diff = np.log(c_tgt / c_tgt.sum() + 1e-8) - np.log(c_raw / c_raw.sum() + 1e-8)
        w = np.array([np.dot(log_diff, get_ngram_counts(d)) for d in raw])
        return w, _clock() - t0
    for name, docs in (("raw", raw), ("target", target)):
        with open(tmp / f"{name}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    dsir = HashedNgramDSIR([str(tmp / "raw.jsonl")], [str(tmp / "target.jsonl")], cache_dir=str(tmp / "cache"),
                           num_proc=1, ngrams=2, num_buckets=10_000)
    t0 = _clock()
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    elapsed = _clock() - t0
    return np.load(tmp / "cache" / "log_importance_weights" / "0.npy"), elapsed


def _ours(raw: list[str], target: list[str]) -> torch.Tensor:
    return target_log_ratio(hashed_ngram_features(raw), hashed_ngram_features(target))


def _target_rows(n_raw: int, n_target: int, repeat: int, judge: bool) -> list[Result]:
    raw, target = _corpus(n_raw, n_target)
    n_raw = len(raw)
    tokens = sum(len(re.findall(r"\w+|[^\w\s]+", d)) for d in raw)
    with tempfile.TemporaryDirectory() as tmp:
        w_base, t_base = _dsir_weights(raw, target, Path(tmp))
    t_ours = float("inf")
    for _ in range(repeat):
        collect()
        t0 = _clock()
        w_ours = _ours(raw, target)
        t_ours = min(t_ours, _clock() - t0)
    corr = float(np.corrcoef(w_base, w_ours.numpy())[0, 1])
    # a heavier smoothing (1 / num_buckets on the frequencies) is a different estimator: how different
    w_smooth = target_log_ratio(hashed_ngram_features(raw), hashed_ngram_features(target), smoothing=1e-4)
    corr_smooth = float(np.corrcoef(w_base, w_smooth.numpy())[0, 1])
    spearman = float(np.corrcoef(np.argsort(np.argsort(w_base)), np.argsort(np.argsort(w_ours.numpy())))[0, 1])
    base_name = "data-selection HashedNgramDSIR" if HashedNgramDSIR is not None else \
        "REIMPLEMENTATION of data-selection's hashed n-gram DSIR (package not importable)"
    speed = (t_base / n_raw) / (t_ours / n_raw)
    rows = [
        Result(
            f"target matching: log importance weights per raw document, {n_raw} docs ({tokens / n_raw:.0f} "
            f"tokens each) + {n_target} target docs",
            t_ours / n_raw, t_base / n_raw, base_name + " (fit + compute_importance_weights)",
            target=">= 5x and corr >= 0.99",
            passed=(speed >= 5 and corr >= 0.99) if judge else None,
            note=f"Pearson correlation of the weights {corr:.6f} (Spearman {spearman:.6f}), both at the default "
                 f"smoothing 1e-8; with smoothing=1e-4 ours correlates {corr_smooth:.3f}",
            extra={"pearson": corr, "spearman": spearman, "pearson_smoothing_1e-4": corr_smooth, "n_raw": n_raw,
                   "n_target": n_target},
        )
    ]
    # featurisation alone, the same documents
    t0 = _clock()
    ref = [get_ngram_counts(d, n=2, num_buckets=10_000) for d in raw]
    t_feat_base = _clock() - t0
    t_feat = float("inf")
    for _ in range(repeat):
        collect()
        t0 = _clock()
        f = hashed_ngram_features(raw)
        t_feat = min(t_feat, _clock() - t0)
    dense = f.to_dense().numpy().astype(np.int64)
    same = sum(bool(np.array_equal(dense[i], ref[i])) for i in range(n_raw))
    rows.append(
        Result(
            f"hashed n-gram features (unigrams + bigrams, 10000 buckets) per document, {n_raw} docs",
            t_feat / n_raw, t_feat_base / n_raw, "data-selection get_ngram_counts, one call per document",
            target="identical features",
            passed=(same == n_raw) if judge else None,
            note=f"identical feature rows: {same}/{n_raw}",
        )
    )
    return rows


# ----- 2. sequence scores -----------------------------------------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _extra_peak(fn) -> tuple[int, str]:
    collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1, "clear_refs not writable: not measured"
    before = _status("VmRSS")
    out = fn()
    peak = _status("VmHWM")
    del out
    return peak - before, "VmHWM after clear_refs"


def _batch(n: int, length: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, length, v, generator=g).mul_(2.0)
    lengths = torch.randint(length // 4, length + 1, (n,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    targets = torch.randint(0, v, (n, length), generator=g)
    return logits, mask, targets


def _memory(mem_n: tuple[int, int], length: int, v: int) -> tuple[int, int, int, str]:
    big, mask_big, _ = _batch(mem_n[1], length, v, seed=99)
    small, mask_small = big[: mem_n[0]].clone(), mask_big[: mem_n[0]].clone()
    extra_small, method = _extra_peak(lambda: sequence_scores(small, mask_small))
    extra_big, _ = _extra_peak(lambda: sequence_scores(big, mask_big))
    extra_lsm, _ = _extra_peak(lambda: torch.log_softmax(big, dim=-1))
    return extra_small, extra_big, extra_lsm, method


def _sequence_rows(total: int, batch: int, length: int, v: int, mem_n: tuple[int, int], judge: bool) -> list[Result]:
    # memory first, in a process that has not yet held large temporaries
    extra_small, extra_big, extra_lsm, method = _memory(mem_n, length, v)
    collect()

    pool = [_batch(batch, length, v, seed=s) for s in range(4)]
    names = ("entropy", "nll", "margin")
    times = {"log_softmax": 0.0, **{s: 0.0 for s in names}}
    done = 0
    j = 0
    while done < total:
        logits, mask, targets = pool[j % len(pool)]
        j += 1
        if done + batch > total:
            logits, mask, targets = logits[: total - done], mask[: total - done], targets[: total - done]
        t0 = _clock()
        out = torch.log_softmax(logits, dim=-1)
        times["log_softmax"] += _clock() - t0
        del out
        for s in names:
            t0 = _clock()
            sequence_scores(logits, mask, score=s, targets=targets if s == "nll" else None)
            times[s] += _clock() - t0
        done += logits.shape[0]
    tag = f"{total} seqs x {length} tokens x {v} vocab, batches of {batch}"
    rows = [
        Result(
            f"sequence_scores(score={s!r}) vs one torch.log_softmax pass, {tag}",
            times[s], times["log_softmax"], "torch.log_softmax(logits, -1) over the same batches",
            ratio_kind="overhead", target="<= 2.5x",
            passed=(times[s] / times["log_softmax"] <= 2.5) if judge else None,
        )
        for s in names
    ]
    mb = 1 << 20
    size_big = mem_n[1] * length * v * 4
    rows.append(
        Result(
            f"sequence_scores extra peak memory on {mem_n[1]} x {length} x {v} float32 logits "
            f"({size_big / mb:.0f} MB) vs log_softmax",
            max(extra_big, 1) / mb, max(extra_lsm, 1) / mb, "torch.log_softmax (returns a full-size tensor)",
            unit="MB", ratio_kind="overhead", target="does not grow with N",
            passed=(extra_big <= 2 * max(extra_small, 4 * mb)) if judge and extra_big >= 0 else None,
            note=f"ours {extra_small / mb:.1f} MB at N={mem_n[0]}, {extra_big / mb:.1f} MB at N={mem_n[1]} "
                 f"({method})",
        )
    )
    return rows


def run(quick: bool) -> list[Result]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if quick:  # a smoke test, not a measurement
            rows = _sequence_rows(200, 50, 32, 64, (50, 200), judge=False)
            return rows + _target_rows(150, 20, repeat=1, judge=False)
        rows = _sequence_rows(100_000, 500, 256, 256, (500, 2000), judge=True)
        return rows + _target_rows(4000, 200, repeat=3, judge=True)
    finally:
        torch.set_num_threads(threads)
