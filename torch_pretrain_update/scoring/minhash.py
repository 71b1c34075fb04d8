"""Shingles, MinHash signatures and LSH banding: the hashing behind near-duplicate detection.

:func:`minhash_signatures` and :func:`lsh_params` are public; the private helpers here (input checks, content
hashes, shingle hashes, signatures, band keys, candidate pairs and their verification) serve
:func:`~torch_pretrain_update.near_duplicate_mask` (``scoring/dedup.py``) and
:class:`~torch_pretrain_update.NearDuplicateFilter` (``scoring/dedup_stage.py``), so both hash alike.

**Texts.** Exact duplicates by content hash (BLAKE2b of the normalised text: lower-cased, runs of whitespace
collapsed to one space, ends stripped; ``normalize=False`` hashes the text as given). Near duplicates by MinHash
("On the resemblance and containment of documents", Broder 1997) of the set of shingles (character n-grams of
code points, or word n-grams, or n-grams of token ids), with the universal hash family
``h_k(x) = (a_k x + b_k) mod p``, ``p = 2**31 - 1`` (a Mersenne prime, so ``a x + b`` fits in int64 and the
reduction is two shifts and adds), computed for all permutations and all shingles at once in numpy. Candidate pairs
come from LSH banding (``bands`` x ``rows`` of the signature, chosen for the threshold by minimising the
integrated false-positive plus false-negative probability, as ``datasketch.MinHashLSH`` does), and a candidate is
kept only when its estimated Jaccard similarity (the fraction of equal signature entries) reaches the threshold.
Every bucket yields the pairs of each member with the bucket's first member and with its next ``8`` members, so
the work stays linear in N even when thousands of items share a bucket; buckets of up to 9 members yield all
their pairs.

**Empty input is an error, never a silent keep or drop.** An empty text (after normalisation) or an empty token
sequence has no shingles: the input check raises ``ValueError`` naming it. A text shorter than ``ngram`` is one
shingle (the whole text).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from torch_pretrain_update._checks import check_bool, check_choice, check_float, check_int, short_repr

__all__ = ["minhash_signatures", "lsh_params"]

Texts = Union[Sequence[str], Sequence[Sequence[int]], torch.Tensor, np.ndarray]

_P = np.int64((1 << 31) - 1)  # the Mersenne prime of the hash family
_U64 = np.uint64
_K_CHAR = _U64(0x9E3779B97F4A7C15)  # odd multipliers of the polynomial n-gram hashes (invertible mod 2**64)
_K_WORD = _U64(0xC2B2AE3D27D4EB4F)
_K_BAND = _U64(0x165667B19E3779F9)
_SHORT_TAG = _U64(0xD6E8FEB86659FD93)  # mixed into the hash of a whole text shorter than ngram, with its length
_WINDOW = 8  # each bucket member is paired with the next _WINDOW members (and the bucket's first)
_BLOCK = 1024  # shingles per MinHash block: (num_perm, _BLOCK) int64 temporaries stay in cache
_BATCH_SYMBOLS = 1 << 20  # code points / tokens shingled per batch
_PAIR_CHUNK = 1 << 15  # candidate pairs verified per chunk


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where} is bytes that are not valid UTF-8 ({exc})") from exc
    raise TypeError(f"{where} must be a str (or UTF-8 bytes); got {type(value).__name__}")


def _as_tokens(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{where} must be a 1-D sequence of token ids; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{where} is an empty token sequence: it has no shingles to compare (drop it first)")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{where} must hold integer token ids; got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{where} must hold token ids >= 0; got {int(arr.min())}")
    return arr.astype(np.uint64)


def _is_token_seq(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    return isinstance(value, (list, tuple, range))


def _items(texts: Any, name: str, normalize: bool, shingle: str) -> tuple[str, list]:
    """``("text", [normalised str])`` or ``("tokens", [uint64 arrays])``; raises naming ``name[i]``."""
    if isinstance(texts, np.ndarray) and texts.dtype.kind in "USO":
        texts = texts.tolist()  # an array of strings (or objects): its items
    if isinstance(texts, (torch.Tensor, np.ndarray)):
        if texts.ndim != 2:
            raise ValueError(
                f"{name} as a tensor must be 2-D (N sequences of token ids of one length); got shape "
                f"{tuple(texts.shape)} (pass a list of 1-D sequences for varying lengths)"
            )
        seqs = list(texts)
    elif isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of texts, not a single {type(texts).__name__}")
    elif isinstance(texts, Sequence):
        seqs = list(texts)
    else:
        raise TypeError(f"{name} must be a sequence of str, a sequence of token-id sequences or a 2-D integer "
                        f"tensor; got {type(texts).__name__}")
    if not seqs:
        raise ValueError(f"{name} must hold at least one item; got an empty sequence")
    if _is_token_seq(seqs[0]):
        tokens: list[np.ndarray] = []
        for i, s in enumerate(seqs):
            if not _is_token_seq(s):
                raise TypeError(f"{name}[{i}] must be a token-id sequence like {name}[0]; got {type(s).__name__}")
            tokens.append(_as_tokens(s, f"{name}[{i}]"))
        return "tokens", tokens
    out: list[str] = []
    for i, s in enumerate(seqs):
        t = _as_text(s, f"{name}[{i}]")
        t = _normalize(t) if normalize else t
        empty = not t.split() if shingle == "word" else not t  # words: whitespace alone has none
        if empty:
            raise ValueError(
                f"{name}[{i}] is empty{' after normalisation' if normalize else ''} ({short_repr(s)}): an empty text "
                "has no shingles to compare; drop or fill empty texts before de-duplicating"
            )
        out.append(t)
    return "text", out


def _digest(item: Any) -> bytes:
    data = item.encode("utf-8") if isinstance(item, str) else item.astype("<u8").tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


# ---------------------------------------------------------------------------------------------------------
# shingles and MinHash
# ---------------------------------------------------------------------------------------------------------


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: an avalanching bijection (spreads polynomial hashes over all bits)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``k**i`` and ``k**-i`` mod 2**64 for i < n; the longest arrays computed so far are kept per ``k``."""
    have = _POWERS.get(k)
    if have is None or have[0].size < n:
        size = 1 << max(n - 1, 1).bit_length()  # a power of two >= n: few recomputations
        pw = np.full(size, k, dtype=np.uint64)
        pw[0] = 1
        inv = np.full(size, pow(k, -1, 1 << 64), dtype=np.uint64)
        inv[0] = 1
        have = _POWERS[k] = (np.cumprod(pw), np.cumprod(inv))
    return have


def _prefix_sums(sym: np.ndarray, k: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """``S`` with ``S[i] = sum_{j < i} sym[j] k**j`` (mod 2**64) for ``i <= sym.size``, and ``k**-i`` (at least
    as many). One pass over ``sym``."""
    m = sym.size
    pw, inv = _powers(int(k), m + 1)
    prefix = np.zeros(m + 1, dtype=np.uint64)
    np.cumsum(sym * pw[:m], out=prefix[1:])
    return prefix, inv


def _poly_windows(sym: np.ndarray, start: np.ndarray, length: np.ndarray, k: np.uint64) -> np.ndarray:
    """Polynomial hashes ``sum_j sym[s + j] k**j`` of the windows ``[s, s + length)`` (mod 2**64), via prefix
    sums: ``(S[s + length] - S[s]) * k**-s`` (see :func:`_prefix_sums`)."""
    prefix, inv = _prefix_sums(sym, k)
    return (prefix[start + length] - prefix[start]) * inv[start]


def _ngram_hashes(sym: np.ndarray, lens: np.ndarray, n: int, k: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-gram of each sequence (a sequence shorter than n: one hash of the whole of it) and the
    sequence of each hash: ``(x, seq)``, ``x`` int64 in ``[0, 2**31)``, ``seq`` ascending."""
    starts = np.cumsum(lens) - lens
    count = np.maximum(lens - n + 1, 1)
    seq = np.repeat(np.arange(lens.size), count)
    first = np.cumsum(count) - count
    pos = np.arange(seq.size) - first[seq] + starts[seq]
    m = sym.size
    short = lens < n
    if m >= n:
        # every window of the concatenation at once (contiguous passes), then the ones inside a sequence
        prefix, inv = _prefix_sums(sym, k)
        full = (prefix[n:] - prefix[:-n]) * inv[: m - n + 1]
        h = full[np.minimum(pos, m - n)]  # a short sequence's position may be past the last full window
    else:
        h = np.zeros(seq.size, dtype=np.uint64)
    if short.any():  # a whole short sequence, tagged with its length: "ab" and "ab\0" hash apart
        sel = short[seq]
        width = lens[seq[sel]]
        h[sel] = _poly_windows(sym, pos[sel], width, k) ^ (_SHORT_TAG * width.astype(np.uint64))
    x = (_fmix64(h) >> _U64(33)).astype(np.int64)  # 31 bits: a x + b < 2**62 fits in int64
    return x, seq


def _word_symbols(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One 64-bit hash per whitespace-separated word (vectorised over code points) and the words per text."""
    joined = [" ".join(t.split()) for t in texts]
    lens = np.fromiter((len(t) for t in joined), dtype=np.int64, count=len(joined))
    cp = np.frombuffer(" ".join(joined).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    space = cp == 32
    prev_space = np.concatenate(([True], space[:-1]))
    next_space = np.concatenate((space[1:], [True]))
    wstart = np.flatnonzero(~space & prev_space)
    wend = np.flatnonzero(~space & next_space) + 1
    wh = _fmix64(_poly_windows(cp + _U64(1), wstart, wend - wstart, _K_WORD))
    text_start = np.cumsum(lens + 1) - (lens + 1)  # texts are joined with one space
    owner = np.searchsorted(text_start, wstart, side="right") - 1
    return wh, np.bincount(owner, minlength=len(texts)).astype(np.int64)


def _shingle_hashes(items: list, kind: str, shingle: str, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, seq)`` for a batch of items: shingle hashes (int64 < 2**31) and the item of each, ascending."""
    if kind == "tokens":
        lens = np.fromiter((a.size for a in items), dtype=np.int64, count=len(items))
        sym = _fmix64(np.concatenate(items) + _U64(1))
        return _ngram_hashes(sym, lens, ngram, _K_CHAR)
    if shingle == "word":
        sym, lens = _word_symbols(items)
        return _ngram_hashes(sym, lens, ngram, _K_CHAR)
    lens = np.fromiter((len(t) for t in items), dtype=np.int64, count=len(items))
    cp = np.frombuffer("".join(items).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    return _ngram_hashes(cp + _U64(1), lens, ngram, _K_CHAR)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _P, size=num_perm, dtype=np.int64)
    b = rng.integers(0, _P, size=num_perm, dtype=np.int64)
    return a[:, None], b[:, None]


def _minhash(x: np.ndarray, seq: np.ndarray, n: int, num_perm: int, seed: int) -> np.ndarray:
    """(n, num_perm) int32 signatures: per item and permutation the minimum of ``(a x + b) mod p``."""
    a, b = _permutations(num_perm, seed)
    sig = np.full((n, num_perm), np.iinfo(np.int32).max, dtype=np.int32)
    width = min(_BLOCK, x.size)  # a short input gets small buffers: fresh large ones cost page faults
    v = np.empty((num_perm, width), dtype=np.int64)
    t = np.empty((num_perm, width), dtype=np.int64)
    for s in range(0, x.size, _BLOCK):
        xs, ss = x[s : s + _BLOCK], seq[s : s + _BLOCK]
        vv, tt = v[:, : xs.size], t[:, : xs.size]
        np.multiply(a, xs, out=vv)
        vv += b
        # mod p for p = 2**31 - 1: v = (v & p) + (v >> 31) lands in [0, 2p); then subtract p where v >= p (as
        # uint64, v - p wraps to a huge value exactly when v < p, so the unsigned minimum picks the residue)
        np.bitwise_and(vv, _P, out=tt)
        vv >>= 31
        vv += tt
        np.subtract(vv, _P, out=tt)
        np.minimum(vv.view(np.uint64), tt.view(np.uint64), out=vv.view(np.uint64))
        bounds = np.flatnonzero(np.diff(ss)) + 1
        seg = np.concatenate(([0], bounds))
        mins = np.minimum.reduceat(vv, seg, axis=1).T  # (segments, num_perm)
        rows = ss[seg]
        sig[rows] = np.minimum(sig[rows], mins)
    return sig


def _signatures(items: list, kind: str, shingle: str, ngram: int, num_perm: int, seed: int) -> np.ndarray:
    sig = np.empty((len(items), num_perm), dtype=np.int32)
    start = 0
    while start < len(items):  # batches of about _BATCH_SYMBOLS code points or tokens bound the temporaries
        end, size = start, 0
        while end < len(items) and (end == start or size < _BATCH_SYMBOLS):
            size += len(items[end]) if kind == "text" else items[end].size
            end += 1
        x, seq = _shingle_hashes(items[start:end], kind, shingle, ngram)
        sig[start:end] = _minhash(x, seq, end - start, num_perm, seed)
        start = end
    return sig


def _check_common(threshold: Any, num_perm: Any, seed: Any, ngram: Any, shingle: Any, normalize: Any,
                  bands: Any) -> tuple[float, int, int, int, str, bool, tuple[int, int]]:
    threshold = check_float(threshold, "threshold", low=0.0, high=1.0, low_inclusive=False)
    num_perm = check_int(num_perm, "num_perm", min_value=1, max_value=1 << 16)
    seed = check_int(seed, "seed", min_value=0)
    ngram = check_int(ngram, "ngram", min_value=1)
    shingle = check_choice(shingle, "shingle", ("char", "word"))
    normalize = check_bool(normalize, "normalize")
    if bands is None:
        bands = lsh_params(threshold, num_perm)
    else:
        if not isinstance(bands, (tuple, list)) or len(bands) != 2:
            raise TypeError(f"bands must be a (bands, rows) pair of ints or None; got {short_repr(bands)}")
        b = check_int(bands[0], "bands[0]", min_value=1)
        r = check_int(bands[1], "bands[1]", min_value=1)
        if b * r > num_perm:
            raise ValueError(f"bands must satisfy bands * rows <= num_perm={num_perm}; got {b} x {r} = {b * r}")
        bands = (b, r)
    return threshold, num_perm, seed, ngram, shingle, normalize, bands


def minhash_signatures(
    texts: Texts,
    *,
    num_perm: int = 128,
    seed: int = 0,
    ngram: int = 5,
    shingle: str = "char",
    normalize: bool = True,
) -> torch.Tensor:
    """MinHash signatures of texts or token-id sequences: int32 ``(N, num_perm)``, values in ``[0, 2**31 - 1)``.

    Entry ``k`` of item ``i`` is ``min over the shingles x of item i of (a_k x + b_k) mod (2**31 - 1)``, with
    ``a_k, b_k`` drawn from ``numpy.random.default_rng(seed)`` and ``x`` a 31-bit hash of the shingle. The
    fraction of equal entries of two signatures estimates the Jaccard similarity of the two shingle sets.

    Args:
        texts: a sequence of ``str`` (or UTF-8 ``bytes``), a sequence of 1-D token-id sequences (lists,
            tensors, arrays), or a 2-D integer tensor/ndarray of N equal-length sequences.
        num_perm: signature length.
        seed: seed of the hash family (the same seed gives comparable signatures).
        ngram: shingle length: code points for ``shingle="char"``, words for ``"word"``, tokens for token ids.
        shingle: ``"char"`` or ``"word"`` (texts only).
        normalize: lower-case and collapse whitespace before shingling (texts only).

    Example::

        >>> sig = minhash_signatures(["the cat sat on the mat", "the cat sat on a mat"])
        >>> float((sig[0] == sig[1]).float().mean())  # estimates the Jaccard similarity of the 5-gram sets, 11/23
    """
    _, num_perm, seed, ngram, shingle, normalize, _ = _check_common(0.5, num_perm, seed, ngram, shingle,
                                                                      normalize, (1, 1))
    kind, items = _items(texts, "texts", normalize, shingle)
    return torch.from_numpy(_signatures(items, kind, shingle, ngram, num_perm, seed))


# ---------------------------------------------------------------------------------------------------------
# LSH
# ---------------------------------------------------------------------------------------------------------


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the integrated false-positive plus
    false-negative probability of LSH banding for a Jaccard ``threshold`` (``datasketch.MinHashLSH``'s rule with
    equal weights; the integrals by Simpson's rule, so the choice matches ``datasketch``'s except at near-ties).

    A pair of Jaccard similarity ``s`` becomes a candidate with probability ``1 - (1 - s**rows)**bands``.

    Example::

        >>> lsh_params(0.8, 128)
        (9, 13)
    """
    threshold = check_float(threshold, "threshold", low=0.0, high=1.0, low_inclusive=False)
    num_perm = check_int(num_perm, "num_perm", min_value=1, max_value=1 << 16)
    return _lsh_params(threshold, num_perm)


@functools.lru_cache(maxsize=64)
def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    grid = 1024  # an even number of Simpson intervals
    w = np.ones(grid + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    s_lo = np.linspace(0.0, threshold, grid + 1)  # false positives: similarity below the threshold
    s_hi = np.linspace(threshold, 1.0, grid + 1)  # false negatives: at or above it
    best, arg = np.inf, (1, 1)
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = ((1 - (1 - s_lo**r) ** b) @ w) * threshold / (3 * grid)
        fn = (((1 - s_hi**r) ** b) @ w) * (1.0 - threshold) / (3 * grid)
        err = 0.5 * fp + 0.5 * fn
        j = int(np.argmin(err))  # the first (fewest rows) on ties, as datasketch's loop
        if err[j] < best:
            best, arg = float(err[j]), (b, j + 1)
    return arg


def _band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys: a hash of each band's ``rows`` signature entries."""
    blocks = sig[:, : bands * rows].reshape(sig.shape[0], bands, rows).astype(np.uint64)
    key = np.zeros(blocks.shape[:2], dtype=np.uint64)
    for j in range(rows):
        key = key * _K_BAND + blocks[:, :, j] + _U64(1)
    return _fmix64(key)


def _candidate_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, sharing a bucket in some band: each member with its bucket's first member and
    with the next ``_WINDOW`` members (all pairs of buckets of up to ``_WINDOW + 1``). Linear in N."""
    n = keys.shape[0]
    codes = []
    for band in range(keys.shape[1]):
        k = keys[:, band]
        order = np.argsort(k, kind="stable")  # ascending index within a bucket
        ks = k[order]
        same = ks[1:] == ks[:-1]
        if not same.any():
            continue
        member = np.concatenate(([False], same)) | np.concatenate((same, [False]))
        order, ks = order[member], ks[member]  # only buckets of two or more
        new = np.concatenate(([True], ks[1:] != ks[:-1]))
        first = np.maximum.accumulate(np.where(new, np.arange(ks.size), 0))
        rest = ~new
        codes.append(order[first[rest]] * n + order[rest])
        for d in range(1, _WINDOW + 1):
            if d >= ks.size:
                break
            ok = ks[d:] == ks[:-d]
            codes.append(order[:-d][ok] * n + order[d:][ok])
    if not codes:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    u = np.unique(np.concatenate(codes))
    return u // n, u % n


def _verified(sig: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the pairs whose estimated Jaccard similarity (fraction of equal entries) is >= threshold."""
    ok = np.empty(a.size, dtype=bool)
    need = threshold * sig.shape[1]
    for s in range(0, a.size, _PAIR_CHUNK):
        eq = np.count_nonzero(sig[a[s : s + _PAIR_CHUNK]] == sig[b[s : s + _PAIR_CHUNK]], axis=1)
        ok[s : s + _PAIR_CHUNK] = eq >= need - 1e-9 * sig.shape[1]
    return ok
