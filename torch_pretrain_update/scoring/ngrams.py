"""Hashed n-gram features of text or token-id sequences, as a sparse CSR count matrix.

:func:`hashed_ngram_features` gives the bag-of-hashed-n-grams counts that :func:`target_log_ratio` compares
(lowercased word tokens, their unigrams and bigrams, as "Data Selection for Language Models via Importance
Resampling", Xie et al. 2023).

Text buckets are those of the ``data-selection`` package (``HashedNgramDSIR``): tokens are
``re.findall(r"\\w+|[^\\w\\s]+", text.lower())`` (nltk's ``WordPunctTokenizer``), an n-gram is its tokens joined by
single spaces, and its bucket is ``int.from_bytes(sha256(ngram.encode()).digest(), "big") % num_buckets``: a fixed
hash (the same in every process, unlike Python's salted ``hash()``), so features computed here and there agree
exactly. (nltk up to 3.8 runs that pattern with Python's ``re``, as here; later nltk versions run it with the
third-party ``regex`` engine, whose ``\\w`` differs on some non-ASCII characters such as combining accents and
superscript digits: on ASCII text the tokens are the same.)

It is fast because the work per token is vectorised: tokens are found and identified with numpy over the
characters (a polynomial hash whose every match is then verified character by character, so a collision can never
merge two tokens), and SHA-256 runs once per *distinct* n-gram, not once per occurrence.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from operator import methodcaller
from typing import Any, Optional

import numpy as np
import torch

from torch_pretrain_update._checks import check_int, short_repr

__all__ = ["hashed_ngram_features"]

try:  # the built-in SHA-256 costs less per call than OpenSSL's for short inputs; same digests
    from _sha256 import sha256 as _sha256  # Python <= 3.11
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        from _sha2 import sha256 as _sha256  # Python >= 3.12
    except ImportError:
        _sha256 = hashlib.sha256

#: characters per batch of documents (a few arrays of 8 bytes per character are alive at once)
_BATCH_CHARS = 1 << 22
#: token ids per batch of id sequences
_BATCH_IDS = 1 << 22
#: counts are stored as float32: exact up to 2**24 per bucket and document
_MAX_COUNT = 1 << 24

# character classes of the tokenizer: 0 = whitespace (str.isspace, as re's \s), 1 = word (str.isalnum or "_", as
# re's \w), 2 = anything else
_ASCII_CLASS = np.array(
    [0 if chr(c).isspace() else 1 if (chr(c).isalnum() or c == 95) else 2 for c in range(128)], dtype=np.int8
)
# polynomial token hash modulo 2**64: an odd multiplier (invertible) and its inverse
_P = 0x9E3779B97F4A7C15
_P_INV = pow(_P, -1, 1 << 64)
# 64-bit mixing (splitmix64's finaliser) for token-id n-grams
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV = np.uint64(0x100000001B3)


# ------------------------------------------------------------------------------------------------------
# hashing
# ------------------------------------------------------------------------------------------------------


def _sha_buckets(items: Sequence[bytes], num_buckets: int) -> np.ndarray:
    """``int.from_bytes(sha256(item).digest(), "big") % num_buckets`` for every item, as int64.

    The 256-bit integer is reduced with its four big-endian 64-bit words: ``sum_j (w_j mod B) (2**(64 (3-j)) mod
    B) mod B``, vectorised; each product is below ``B**2 < 2**62``."""
    if not items:
        return np.zeros(0, dtype=np.int64)
    digests = b"".join(map(methodcaller("digest"), map(_sha256, items)))
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 4).astype(np.uint64) % np.uint64(num_buckets)
    out = np.zeros(words.shape[0], dtype=np.uint64)
    for j in range(4):
        factor = np.uint64(pow(2, 64 * (3 - j), num_buckets))
        out = (out + words[:, j] * factor % np.uint64(num_buckets)) % np.uint64(num_buckets)
    return out.astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a fixed, well-spread 64-bit hash."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


# ------------------------------------------------------------------------------------------------------
# tokenizing text without a Python object per token
# ------------------------------------------------------------------------------------------------------


def _char_classes(codes: np.ndarray) -> np.ndarray:
    small = codes < 128
    if bool(small.all()):
        return _ASCII_CLASS[codes]
    cls = np.empty(codes.size, dtype=np.int8)
    cls[small] = _ASCII_CLASS[codes[small]]
    big = codes[~small]
    uniq, inv = np.unique(big, return_inverse=True)
    lut = np.array(
        [0 if chr(c).isspace() else 1 if chr(c).isalnum() else 2 for c in uniq.tolist()], dtype=np.int8
    )
    cls[~small] = lut[inv]
    return cls


def _powers(base: int, n: int) -> np.ndarray:
    """``base ** j mod 2**64`` for ``j`` in ``[0, n)`` (uint64 products wrap)."""
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(p, dtype=np.uint64)


class _Vocab:
    """Distinct tokens (as UTF-8 bytes) across batches, with a global id each."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[bytes] = []

    def add(self, words: list[str]) -> np.ndarray:
        out = np.empty(len(words), dtype=np.int64)
        ids = self.ids
        for i, w in enumerate(words):
            j = ids.get(w)
            if j is None:
                j = ids[w] = len(self.words)
                self.words.append(w.encode("utf-8", "surrogatepass"))
            out[i] = j
        return out


def _tokenize_batch(lows: list[str], vocab: _Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Global token ids and per-document token counts of lowercased documents, tokens as
    ``re.findall(r"\\w+|[^\\w\\s]+", doc)``."""
    big = "\n".join(lows)  # "\n" is whitespace: no token crosses two documents
    codes = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = codes.size
    padded = np.zeros(n + 2, dtype=np.int8)
    padded[1:-1] = _char_classes(codes)
    cls = padded[1:-1]
    solid = cls != 0
    starts = np.flatnonzero(solid & (cls != padded[:-2]))
    ends = np.flatnonzero(solid & (cls != padded[2:])) + 1
    doc_offsets = np.cumsum([0] + [len(s) + 1 for s in lows[:-1]], dtype=np.int64)
    counts = np.bincount(np.searchsorted(doc_offsets, starts, side="right") - 1, minlength=len(lows))
    if starts.size == 0:
        return np.zeros(0, dtype=np.int64), counts
    local, first = _identify_tokens(codes, starts, ends)
    if local is None or first is None:  # a hash collision (or a pathological input): the exact, slower path
        words = list(map(big.__getitem__, map(slice, starts.tolist(), ends.tolist())))
        return vocab.add(words), counts
    reps = [big[s:e] for s, e in zip(starts[first].tolist(), ends[first].tolist())]
    return vocab.add(reps)[local], counts


def _identify_tokens(
    codes: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """``(inverse, first)``: tokens numbered by identity (``inverse``) and the first occurrence of each, from a
    polynomial hash of their characters; every token is then compared character by character with the first
    occurrence of its hash, so equal numbers mean equal strings. ``(None, None)`` on any mismatch."""
    n = codes.size
    with np.errstate(over="ignore"):
        q = _powers(_P_INV, n + 1)
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(codes.astype(np.uint64) * q[:n], out=prefix[1:])
        # sum_{j in [s, e)} c_j P^-j, shifted to start at P^0: position-independent
        h = (prefix[ends] - prefix[starts]) * _powers(_P, n + 1)[starts]
        lens = (ends - starts).astype(np.uint64)
        h ^= _mix64(lens)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rep = first[inverse]
    lens = ends - starts
    if not np.array_equal(lens, lens[rep]):
        return None, None
    other = np.flatnonzero(rep != np.arange(starts.size))  # tokens that are not the first of their hash
    if other.size == 0:
        return inverse, first
    # compare characters, one token length at a time: rows of a sliding-window view are the tokens themselves
    lo = lens[other]
    order = np.argsort(lo.astype(np.uint16) if int(lo.max()) < (1 << 16) else lo, kind="stable")
    lo = lo[order]
    cuts = np.flatnonzero(np.diff(lo)) + 1
    for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, lo.size].tolist()):
        idx = other[order[a:b]]
        windows = np.lib.stride_tricks.sliding_window_view(codes, int(lo[a]))
        if not np.array_equal(windows[starts[idx]], windows[starts[rep[idx]]]):
            return None, None
    return inverse, first


# ------------------------------------------------------------------------------------------------------
# n-grams -> CSR counts
# ------------------------------------------------------------------------------------------------------


def _ngram_positions(counts: np.ndarray, k: int) -> np.ndarray:
    """Start positions (in the concatenated tokens) of every k-gram that stays inside one document."""
    total = int(counts.sum())
    ends = np.repeat(np.cumsum(counts), counts)
    return np.flatnonzero(np.arange(total) + (k - 1) < ends)


def _text_ngram_buckets(ids: np.ndarray, counts: np.ndarray, vocab: _Vocab, n: int, num_buckets: int,
                        cache: dict[int, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(rows, buckets)`` of every n-gram occurrence, orders 1..n. SHA-256 runs once per distinct n-gram."""
    doc = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    known = cache.get(1, np.zeros(0, dtype=np.int64))
    if len(vocab.words) > known.size:  # bucket the vocabulary's new words only
        known = np.concatenate([known, _sha_buckets(vocab.words[known.size :], num_buckets)])
        cache[1] = known
    rows, buckets = [doc], [known[ids]]
    gram, gram_bytes = ids, vocab.words
    v = max(1, len(vocab.words))
    for k in range(2, n + 1):
        pos = _ngram_positions(counts, k)
        if pos.size == 0:
            break
        # a k-gram is a (k-1)-gram followed by a token: number the distinct pairs (exact, no hashing)
        key = gram[pos] * v + ids[pos + k - 1]
        uniq, inv = np.unique(key, return_inverse=True)
        head, tail = np.divmod(uniq, v)
        joined = list(map(b" ".join, zip(map(gram_bytes.__getitem__, head.tolist()),
                                         map(vocab.words.__getitem__, tail.tolist()))))
        rows.append(doc[pos])
        buckets.append(_sha_buckets(joined, num_buckets)[inv.reshape(-1)])
        gram = np.zeros(ids.size, dtype=np.int64)
        gram[pos] = inv.reshape(-1)
        gram_bytes = joined
    return rows, buckets


def _id_ngram_buckets(ids: np.ndarray, counts: np.ndarray, n: int,
                      num_buckets: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    doc = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    with np.errstate(over="ignore"):
        h1 = _mix64(ids.astype(np.uint64))
        rows, buckets = [doc], [(h1 % np.uint64(num_buckets)).astype(np.int64)]
        h = h1
        for k in range(2, n + 1):
            pos = _ngram_positions(counts, k)
            if pos.size == 0:
                break
            hk = _mix64(h[pos] * _FNV + h1[pos + k - 1])
            rows.append(doc[pos])
            buckets.append((hk % np.uint64(num_buckets)).astype(np.int64))
            h = np.zeros(ids.size, dtype=np.uint64)
            h[pos] = hk
    return rows, buckets


def _csr_counts(rows: list[np.ndarray], buckets: list[np.ndarray], num_docs: int, num_buckets: int,
                first_doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR pieces ``(row_counts, cols, values)`` of one batch of documents."""
    key = np.concatenate(rows) * num_buckets + np.concatenate(buckets)
    uniq, cnt = np.unique(key, return_counts=True)
    r, c = np.divmod(uniq, num_buckets)
    if cnt.size and int(cnt.max()) > _MAX_COUNT:
        i = int(r[int(np.argmax(cnt))])
        raise ValueError(f"texts[{first_doc + i}] has more than 2**24 n-grams in one bucket (counts are float32): "
                         "split the document")
    return np.bincount(r, minlength=num_docs), c, cnt.astype(np.float32)


def _ids_of(seq: Any, i: int) -> np.ndarray:
    if isinstance(seq, torch.Tensor):
        a = seq.detach().cpu().numpy()
    elif isinstance(seq, np.ndarray):
        a = seq
    else:
        try:
            a = np.asarray(seq)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"texts[{i}] must be a str or a sequence of integer token ids; got "
                            f"{short_repr(seq)}") from exc
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise TypeError(f"texts[{i}] must be a str or a 1-D sequence of integer token ids; got {short_repr(a)}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"texts[{i}] has a token id above 2**63 - 1")
    a = a.astype(np.int64, copy=False)
    if a.size and int(a.min()) < 0:
        j = int(np.argmax(a < 0))
        raise ValueError(f"texts[{i}] has a negative token id {int(a[j])} at position {j} (strip padding first)")
    return a


def _raise_empty(counts: np.ndarray, first_doc: int, kind: str) -> None:
    if counts.size and int(counts.min()) == 0:
        i = first_doc + int(np.argmin(counts))
        raise ValueError(f"texts[{i}] has no {kind}: an empty document has no n-gram to weigh; drop it first")


def hashed_ngram_features(texts: Sequence[Any], *, n: int = 2, num_buckets: int = 10_000) -> torch.Tensor:
    """Hashed n-gram counts of documents: text, or token-id sequences.

    - **Text** (``str``): lowercased, split into word and punctuation tokens as
      ``re.findall(r"\\w+|[^\\w\\s]+", text.lower())``; the unigrams, bigrams, ... up to ``n``-grams (joined by
      single spaces) are hashed with SHA-256 into ``num_buckets`` buckets: exactly the features of the
      ``data-selection`` package's ``HashedNgramDSIR`` (``ngrams=n``, ``tokenizer="wordpunct"``; with nltk 3.9 or
      later, only on ASCII text: see the module docstring).
    - **Token ids** (a 1-D sequence of non-negative ints, tensor or ndarray, e.g. a tokenizer's ``input_ids`` with
      the padding stripped): the unigrams to ``n``-grams of ids, hashed with a fixed 64-bit mix (splitmix64's
      finaliser, chained over the n-gram), vectorised.

    The hash is fixed: the same buckets in every process and run. All documents must be of one kind.

    Args:
        texts: a sequence of ``str``, or a sequence of 1-D integer sequences (a 2-D tensor counts as its rows).
        n: the largest n-gram order, ``>= 1`` (``2``: unigrams and bigrams, as the paper).
        num_buckets: number of hash buckets, in ``[1, 2**31)``.

    Returns:
        a ``torch.sparse_csr_tensor`` of shape ``(len(texts), num_buckets)`` with float32 counts (int64 indices).
        ``.to_dense()`` gives the dense matrix for small inputs.

    Raises:
        TypeError: ``texts`` is a single string, or holds something that is neither text nor integer ids.
        ValueError: no documents, an empty document (no token: named by its index), a negative token id.

    Example::

        >>> f = hashed_ngram_features(["The cat sat.", "the CAT"], num_buckets=64)
        >>> tuple(f.shape), f.to_dense().sum(dim=1).tolist()  # 4 unigrams + 3 bigrams; 2 + 1
        ((2, 64), [7.0, 3.0])
    """
    n = check_int(n, "n", min_value=1)
    num_buckets = check_int(num_buckets, "num_buckets", min_value=1, max_value=(1 << 31) - 1)
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of documents, not a single string (wrap it in a list)")
    if isinstance(texts, (torch.Tensor, np.ndarray)) and texts.ndim == 2:
        texts = list(texts)
    try:
        num_docs = len(texts)
    except TypeError as exc:
        raise TypeError(f"texts must be a sequence of documents; got {type(texts).__name__}") from exc
    if num_docs == 0:
        raise ValueError("texts must not be empty")
    is_text = isinstance(texts[0], str)
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (row_counts, cols, values) per batch
    if is_text:
        vocab = _Vocab()
        cache: dict[int, np.ndarray] = {}
        start = 0
        while start < num_docs:
            lows: list[str] = []
            size = 0
            while start + len(lows) < num_docs and (not lows or size < _BATCH_CHARS):
                doc = texts[start + len(lows)]
                if not isinstance(doc, str):
                    raise TypeError(f"texts[{start + len(lows)}] must be a str like texts[0]; got {short_repr(doc)}")
                lows.append(doc.lower())
                size += len(lows[-1]) + 1
            ids, counts = _tokenize_batch(lows, vocab)
            _raise_empty(counts, start, "word or punctuation token")
            rows, buckets = _text_ngram_buckets(ids, counts, vocab, n, num_buckets, cache)
            pieces.append(_csr_counts(rows, buckets, len(lows), num_buckets, start))
            start += len(lows)
    else:
        start = 0
        while start < num_docs:
            seqs: list[np.ndarray] = []
            size = 0
            while start + len(seqs) < num_docs and (not seqs or size < _BATCH_IDS):
                i = start + len(seqs)
                if isinstance(texts[i], str):
                    raise TypeError(f"texts[{i}] is a str but texts[0] is token ids: all documents must be of one kind")
                seqs.append(_ids_of(texts[i], i))
                size += seqs[-1].size
            counts = np.array([s.size for s in seqs], dtype=np.int64)
            _raise_empty(counts, start, "token id")
            rows, buckets = _id_ngram_buckets(np.concatenate(seqs), counts, n, num_buckets)
            pieces.append(_csr_counts(rows, buckets, len(seqs), num_buckets, start))
            start += len(seqs)
    crow = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.concatenate([p[0] for p in pieces]), out=crow[1:])
    with warnings.catch_warnings():
        # torch announces on first use that sparse CSR is a beta layout; the tensor is built from valid parts
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(np.concatenate([p[1] for p in pieces]).astype(np.int64, copy=False)),
            torch.from_numpy(np.concatenate([p[2] for p in pieces])),
            size=(num_docs, num_buckets),
            check_invariants=False,
        )
