"""Near-duplicates against ``datasketch`` MinHash + MinHashLSH; k-means pseudo-classes against scikit-learn.

1. **Near-duplicate detection** on English prose that ships with Python (``pydoc_data.topics``, lower-cased,
   whitespace collapsed, cut at word boundaries into documents of about 500 characters), with planted copies: half
   of the documents get one copy with random character edits (substitutions, insertions, deletions at a
   rate drawn uniformly in [0.5%, 5%]: true Jaccard of the 5-gram sets from about 0.6 to 1), a tenth get an
   exact copy; copies are placed at random positions. Both sides see the same texts and the same shingles
   (character 5-grams), 128 permutations, threshold 0.8 and the same LSH bands (:func:`lsh_params`, which equals
   ``datasketch``'s optimum here), and both group by union-find over candidates verified by estimated Jaccard
   ``>= 0.8``:

   - **ours**: ``near_duplicate_mask(texts)`` (content hashes, vectorised shingling and MinHash, LSH, verification,
     union-find: the whole call);
   - **datasketch**: ``MinHash(num_perm=128).update_batch(shingles)`` per document, ``MinHashLSH.insert`` of all,
     ``query`` of each, ``MinHash.jaccard`` of each candidate, the same union-find.

   Ground truth: within each planted group (a source and its copies) the pairs whose *exact* Jaccard reaches 0.8
   are merged; every member but the lowest index is a duplicate to drop. Recall = dropped true duplicates / true
   duplicates, precision = dropped true duplicates / dropped, each averaged over 5 hash seeds per side (one seed's
   figures move by about 2 points from seed to seed). Target: each within 2 points of datasketch's (or better),
   and faster (timed at the default seed). A row also times the signatures alone (``minhash_signatures`` vs
   ``MinHash`` per document).
2. **k-means** (``kmeans_labels``) against ``sklearn.cluster.KMeans(n_init=1)`` on Gaussian blobs: time (seed 0)
   and inertia averaged over 3 seeds per side (target: within 3% of scikit-learn's).

Clock: CPU time of the calling thread (``time.thread_time``) with torch, BLAS and OpenMP limited to one thread
(``threadpoolctl``), as in ``bench_samplers``: every side single-threaded and measured alike. Quick mode shrinks
everything (a smoke test, not a measurement).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks._harness import Result, interleaved
from torch_pretrain_update import kmeans_labels, lsh_params, minhash_signatures, near_duplicate_mask

SKIPPED: list[str] = []

try:  # datasketch is in the dev extra; report instead of failing when it is missing
    from datasketch import MinHash, MinHashLSH
except ImportError as exc:  # pragma: no cover - depends on the environment
    MinHash = MinHashLSH = None
    SKIPPED.append(f"datasketch MinHash/MinHashLSH: not importable ({exc})")

try:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
except ImportError as exc:  # pragma: no cover - depends on the environment
    KMeans = threadpool_limits = None
    SKIPPED.append(f"scikit-learn KMeans: not importable ({exc})")

_clock = time.thread_time
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5
SEEDS = 5  # hash seeds averaged for recall and precision (one seed's figures vary by about 2 points)


# ----- data ---------------------------------------------------------------------------------------------------


def _prose_docs(doc_chars: int, limit: int | None) -> list[str]:
    import pydoc_data.topics

    words = " ".join(" ".join(v.lower().split()) for v in pydoc_data.topics.topics.values()).split()
    docs, cur, size = [], [], 0
    for w in words:
        cur.append(w)
        size += len(w) + 1
        if size >= doc_chars:
            docs.append(" ".join(cur))
            cur, size = [], 0
            if limit is not None and len(docs) == limit:
                break
    return list(dict.fromkeys(docs))  # drop any exact repeat in the source itself


def _edit(text: str, rate: float, rng: np.random.Generator) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz "
    out = []
    for ch, u in zip(text, rng.random(len(text))):
        if u < rate / 3:
            continue  # deletion
        if u < 2 * rate / 3:
            out.append(letters[rng.integers(len(letters))])  # substitution
        elif u < rate:
            out += [ch, letters[rng.integers(len(letters))]]  # insertion
        else:
            out.append(ch)
    return "".join(out)


def _shingles(text: str) -> set[str]:
    return {text[i : i + NGRAM] for i in range(max(len(text) - NGRAM + 1, 1))}


def _planted(doc_chars: int, limit: int | None, seed: int = 0) -> tuple[list[str], np.ndarray, int]:
    """``(texts, truth, planted)``: texts with planted copies, the bool mask of true duplicates to drop, and the
    number of planted copies."""
    rng = np.random.default_rng(seed)
    base = _prose_docs(doc_chars, limit)
    items: list[tuple[str, int]] = [(t, i) for i, t in enumerate(base)]  # (text, group = source index)
    for i in rng.permutation(len(base))[: len(base) // 2]:
        items.append((_edit(base[i], float(rng.uniform(0.005, 0.05)), rng), int(i)))
    for i in rng.permutation(len(base))[: len(base) // 10]:
        items.append((base[i], int(i)))
    order = rng.permutation(len(items))
    texts = [items[k][0] for k in order]
    group = np.array([items[k][1] for k in order])
    # ground truth: union-find over the pairs of each group whose exact Jaccard reaches the threshold
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        sets = {int(m): _shingles(texts[m]) for m in members}
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                a, b = sets[int(members[x])], sets[int(members[y])]
                if len(a & b) / len(a | b) >= THRESHOLD:
                    ra, rb = find(int(members[x])), find(int(members[y]))
                    parent[max(ra, rb)] = min(ra, rb)
    truth = np.array([find(i) != i for i in range(len(texts))])
    return texts, truth, len(items) - len(base)


# ----- the datasketch side ------------------------------------------------------------------------------------


def _datasketch_signatures(texts: list[str], seed: int = 1) -> list:
    out = []
    for t in texts:
        m = MinHash(num_perm=NUM_PERM, seed=seed)
        m.update_batch([s.encode("utf-8") for s in (t[i : i + NGRAM] for i in range(max(len(t) - NGRAM + 1, 1)))])
        out.append(m)
    return out


def _datasketch_mask(texts: list[str], seed: int = 1) -> np.ndarray:
    sigs = _datasketch_signatures(texts, seed)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=lsh_params(THRESHOLD, NUM_PERM))
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j < i and sigs[j].jaccard(m) >= THRESHOLD:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) != i for i in range(len(texts))])


def _scores(masks: list[np.ndarray], truth: np.ndarray) -> tuple[float, float]:
    """Recall and precision in percent, averaged over the masks (one per hash seed)."""
    hits = [int((d & truth).sum()) for d in masks]
    recall = np.mean([100.0 * h / max(int(truth.sum()), 1) for h in hits])
    precision = np.mean([100.0 * h / max(int(d.sum()), 1) for h, d in zip(hits, masks)])
    return float(recall), float(precision)


def _dedup(quick: bool) -> list[Result]:
    texts, truth, planted = _planted(500, 80 if quick else None)
    n = len(texts)
    shingles = sum(len(t) - NGRAM + 1 for t in texts)
    tag = f"N={n} texts ({planted} planted copies, {shingles:.2e} shingles)"
    seeds = range(1 if quick else SEEDS)
    ours_masks = [near_duplicate_mask(texts, threshold=THRESHOLD, num_perm=NUM_PERM, seed=s).numpy() for s in seeds]
    ours_r, ours_p = _scores(ours_masks, truth)
    if MinHash is None:
        t = interleaved({"ours": lambda: near_duplicate_mask(texts)}, repeat=1 if quick else 3, clock=_clock)
        return [Result(f"near_duplicate_mask, {tag}", t["ours"], None,
                       note=f"recall {ours_r:.1f}%, precision {ours_p:.1f}%; datasketch not installed")]
    ds_masks = [_datasketch_mask(texts, seed=s + 1) for s in seeds]  # datasketch's default seed is 1
    ds_r, ds_p = _scores(ds_masks, truth)
    repeat = 1 if quick else 3
    t = interleaved({
        "ours": lambda: near_duplicate_mask(texts, threshold=THRESHOLD, num_perm=NUM_PERM),
        "ds": lambda: _datasketch_mask(texts),
        "ours_sig": lambda: minhash_signatures(texts, num_perm=NUM_PERM),
        "ds_sig": lambda: _datasketch_signatures(texts),
    }, repeat=repeat, warmup=0 if quick else 1, clock=_clock)
    judge = not quick
    b, r = lsh_params(THRESHOLD, NUM_PERM)
    agree = int((ours_masks[0] == ds_masks[0]).sum())
    note = (f"threshold {THRESHOLD}, {NUM_PERM} permutations, LSH {b} bands x {r} rows on both sides; "
            f"true duplicates {int(truth.sum())}; the two masks (default seeds) agree on {agree}/{n} texts")
    pr_note = (f"mean over {len(seeds)} hash seeds on each side ({int(truth.sum())} true duplicates: one text is "
               f"{100 / max(int(truth.sum()), 1):.2f} pts of recall)")
    return [
        Result(f"near_duplicate_mask vs datasketch MinHash+MinHashLSH, {tag}", t["ours"], t["ds"],
               "datasketch MinHash.update_batch + MinHashLSH insert/query + jaccard", target="> 1x",
               passed=t["ds"] > t["ours"] if judge else None, note=note),
        Result(f"recall of planted near-duplicates, {tag}", ours_r, ds_r, "datasketch", unit="%",
               ratio_kind="overhead", target=">= datasketch - 2 pts", passed=ours_r >= ds_r - 2.0 if judge else None,
               note=pr_note),
        Result(f"precision of planted near-duplicates, {tag}", ours_p, ds_p, "datasketch", unit="%",
               ratio_kind="overhead", target=">= datasketch - 2 pts", passed=ours_p >= ds_p - 2.0 if judge else None,
               note=pr_note),
        Result(f"MinHash signatures alone (minhash_signatures vs MinHash per text), {tag}", t["ours_sig"],
               t["ds_sig"], "datasketch MinHash.update_batch per text",
               note="ours: every text's shingles hashed and permuted in one vectorised numpy pass"),
    ]


# ----- k-means ------------------------------------------------------------------------------------------------


def _inertia(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Sum of squared distances to the cluster means (the labels' own centres), in float64."""
    x = x.astype(np.float64)
    counts = np.bincount(labels, minlength=k)[:, None]
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    centers = sums / np.maximum(counts, 1)
    return float(((x - centers[labels]) ** 2).sum())


def _kmeans(quick: bool) -> list[Result]:
    if KMeans is None:
        return []
    from sklearn.datasets import make_blobs

    n, d, k = (3_000, 16, 10) if quick else (100_000, 32, 50)
    x, _ = make_blobs(n, d, centers=k, cluster_std=4.0, random_state=0)
    x = x.astype(np.float32)
    xt = torch.from_numpy(x)
    repeat = 1 if quick else 3

    def ours():
        return kmeans_labels(xt, k, seed=0)

    def sk():
        return KMeans(k, n_init=1, random_state=0).fit(x)

    t = interleaved({"ours": ours, "sk": sk}, repeat=repeat, warmup=0 if quick else 1, clock=_clock)
    seeds = range(1 if quick else 3)
    inertia = float(np.mean([_inertia(x, kmeans_labels(xt, k, seed=s).numpy(), k) for s in seeds]))
    sk_inertia = float(np.mean([KMeans(k, n_init=1, random_state=s).fit(x).inertia_ for s in seeds]))
    tag = f"N={n:.0e}, D={d}, k={k}, Gaussian blobs"
    return [
        Result(f"kmeans_labels vs sklearn KMeans(n_init=1) time, {tag}", t["ours"], t["sk"],
               "sklearn.cluster.KMeans(n_init=1)", note="both single-threaded"),
        Result(f"kmeans_labels inertia vs sklearn KMeans(n_init=1), mean of {len(seeds)} seeds, {tag}", inertia,
               sk_inertia,
               "sklearn.cluster.KMeans(n_init=1)", unit="", ratio_kind="overhead", target="<= 1.03x",
               passed=inertia <= 1.03 * sk_inertia if not quick else None),
    ]


def run(quick: bool) -> list[Result]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threadpool_limits is not None:
            with threadpool_limits(limits=1):
                return [*_dedup(quick), *_kmeans(quick)]
        return [*_dedup(quick), *_kmeans(quick)]
    finally:
        torch.set_num_threads(threads)
