"""Pure plan functions for weighted and score-driven selection: ``(inputs, seed, epoch) -> LongTensor``.

- **With replacement** (:func:`weighted_draws`, :func:`weighted_draw_chunk`): inverse-CDF draws on a float64
  cumulative sum (:class:`CumulativeWeights`) with ``torch.searchsorted``. ``torch.multinomial`` (and hence
  ``WeightedRandomSampler``) refuses more than 2**24 categories and draws the whole plan at once; here the
  plan is cut into chunks of :data:`DRAW_CHUNK` draws, chunk ``j`` drawn from its own generator seeded by
  ``(seed, epoch, j)``, so the first index is out after one chunk and any position is reached in O(1).
- **Without replacement** (:func:`weighted_sample_without_replacement`): exponential keys
  ``k_i = E_i / w_i`` with ``E_i ~ Exp(1)`` (Efraimidis & Spirakis 2006, the Gumbel-top-k trick in another
  guise): the ``num_samples`` smallest keys are a weighted draw without replacement. Keys are generated in
  blocks of :data:`KEY_BLOCK`, each from its own generator, and never stored whole: one pass estimates the
  cut-off from a sample of the keys, a second pass regenerates the blocks and keeps the indices below it
  (plus a small band around it, resolved exactly). Extra memory is the selection itself (4 bytes per
  selected index while ``N < 2**31``), about 12 bytes per selected index at the peak while it is shuffled,
  plus one block.
- **Top-k by score** (:func:`topk_indices`): exactly the ``k`` highest scores, ties broken by lower index.
- **The EntropySampler plan** (:func:`entropy_plan`, :func:`entropy_plan_parts`): top-k or proportional to
  ``score ** (1 / temperature)``, with ``random_fraction``, ``exclude`` and ``stratify``.

No library offers chunked, position-addressable weighted draws or a streamed exact k-smallest selection over
regenerated keys, hence the hand-written parts below; every random number still comes from torch's generators
(``rand``, ``exponential_``, ``randperm``, ``randint``) seeded through :func:`epoch_generator`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import torch

from torch_pretrain_update._checks import (
    as_tensor,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_labels,
    compact_labels,
    short_repr,
)
from torch_pretrain_update._rng import epoch_generator

__all__ = [
    "CumulativeWeights",
    "weighted_draw_chunk",
    "iter_weighted_draws",
    "weighted_draws",
    "weighted_sample_without_replacement",
    "topk_indices",
    "power_weights",
    "entropy_plan_parts",
    "entropy_plan",
]

#: draws per chunk of a with-replacement plan. Part of the plan's definition: chunk ``j`` holds plan positions
#: ``[j * DRAW_CHUNK, (j + 1) * DRAW_CHUNK)`` and is drawn from the generator of ``(seed, epoch, j)``.
DRAW_CHUNK = 1 << 18
#: keys per block of a without-replacement plan (block ``b`` from the generator of ``(seed, epoch, b)``).
KEY_BLOCK = 1 << 20
#: elements per chunk for validation passes (no full-size temporaries on N = 1e8).
_SCAN = 1 << 22
#: sampled keys used to locate the cut-off of a without-replacement draw.
_KEY_SAMPLE = 1 << 18

# stream tags: the extra parts of epoch_generator(seed, epoch, *stream), one per independent use
_S_DRAW = 101
_S_KEYS = 102
_S_KEY_SAMPLE = 103
_S_ORDER = 104
_S_RANDOM_PART = 105
_S_CLASS = 106

# ------------------------------------------------------------------------------------------------------
# input checks specific to weights, exclusion and scores
# ------------------------------------------------------------------------------------------------------


def _first_index(t: torch.Tensor, pred: Any) -> int:
    """First index where ``pred(chunk)`` is True, scanning in chunks (no full-size mask)."""
    for s in range(0, t.numel(), _SCAN):
        hit = torch.nonzero(pred(t[s : s + _SCAN]))
        if hit.numel():
            return s + int(hit[0, 0])
    return -1


def check_weights(weights: Any, name: str = "weights") -> torch.Tensor:
    """A 1-D, finite, non-negative weight vector with a positive entry, as a CPU float tensor.

    float32/float64 tensors are returned without a copy (a float16/bfloat16 or integer input is converted to
    float32/float64). Validation is one ``aminmax`` pass; the first bad index is searched for only on failure.

    Raises:
        TypeError: not a tensor/array/sequence of real numbers.
        ValueError: not 1-D, empty, NaN/inf, a negative entry, or all zeros; the message names the index.
    """
    t = as_tensor(weights, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers; got {short_repr(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        i = _first_index(t, lambda c: ~torch.isfinite(c))
        raise ValueError(f"{name} must be finite; got {t[i].item()} at index {i}")
    if lo < 0:
        i = _first_index(t, lambda c: c < 0)
        raise ValueError(f"{name} must be non-negative; got {t[i].item()} at index {i}")
    if hi <= 0:
        raise ValueError(f"{name} must have at least one positive entry; all {t.numel()} are zero")
    return t


def _count_positive(t: torch.Tensor) -> int:
    return sum(int(torch.count_nonzero(t[s : s + _SCAN] > 0)) for s in range(0, t.numel(), _SCAN))


def exclude_mask(exclude: Any, n: int, name: str = "exclude") -> Optional[torch.Tensor]:
    """A bool mask of shape ``(n,)`` (True = never select) from ``None``, a bool mask or integer indices.

    Raises:
        TypeError: floating-point values, or not a tensor/array/sequence.
        ValueError: a mask of the wrong length, or an index outside ``[0, n)``.
    """
    if exclude is None:
        return None
    t = as_tensor(exclude, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (indices or a bool mask); got shape {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.numel() == 0 and t.dtype != torch.bool:  # e.g. [] (a float tensor): nothing excluded
        return torch.zeros(n, dtype=torch.bool)
    if t.dtype == torch.bool:
        if t.numel() != n:
            raise ValueError(f"{name} as a bool mask must have length {n}; got length {t.numel()}")
        return t.clone()
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be integer indices or a bool mask; got {short_repr(t)}")
    t = t.to(torch.int64)
    mask = torch.zeros(n, dtype=torch.bool)
    if t.numel() == 0:
        return mask
    bad = (t < 0) | (t >= n)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{name} indices must be in [0, {n}); got {int(t[i])} at position {i}")
    mask[t] = True
    return mask


def _check_num_samples(num_samples: Any) -> int:
    return check_int(num_samples, "num_samples", min_value=1)


def _check_seed_epoch(seed: Any, epoch: Any) -> tuple[int, int]:
    return check_int(seed, "seed"), check_int(epoch, "epoch", min_value=0)


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


# ------------------------------------------------------------------------------------------------------
# with replacement: chunked inverse-CDF draws
# ------------------------------------------------------------------------------------------------------


class CumulativeWeights:
    """The float64 cumulative sum of a weight vector, for inverse-CDF draws with ``torch.searchsorted``.

    8 bytes per weight, built in place (one float64 copy of the weights, then ``cumsum_``). Index ``i`` is
    drawn when a uniform ``u`` in ``[0, total)`` falls in ``[cumsum[i-1], cumsum[i])``, so a zero weight is
    never drawn. float64 keeps every probability within about ``N * 2**-53`` of the total, relative (float32
    would lose weights below ``2**-24`` of the total, i.e. uniform weights beyond 16.7M samples).

    Weights near the ends of float64 (a sum that would overflow, e.g. ``[1e308] * 3``, or subnormal weights
    such as ``1e-320``, whose few significant bits would quantise the draws) are first multiplied by a power
    of two that brings the largest to ``[0.5, 1)``: exact, so the draws are those of any scaled copy.

    Args:
        weights: validated 1-D non-negative weights (see :func:`check_weights`).
    """

    def __init__(self, weights: torch.Tensor) -> None:
        cum = weights.to(torch.float64, copy=True)
        factors = _scale_factors(float(cum.max()))
        if factors is not None:
            cum.mul_(factors[0]).mul_(factors[1])
        cum.cumsum_(0)
        self.cumsum = cum
        self.total = float(cum[-1])
        # the first position reaching the total is the last weight that still moves the float64 sum
        self.last = int(torch.searchsorted(cum, cum[-1:], right=False)[0])

    def __len__(self) -> int:
        return self.cumsum.numel()

    def probabilities(self, indices: torch.Tensor) -> torch.Tensor:
        """float64 draw probabilities ``w_i / sum(w)`` of ``indices`` as the cumulative sums hold them."""
        idx = indices.to(torch.int64)
        hi = self.cumsum[idx]
        lo = torch.where(idx > 0, self.cumsum[(idx - 1).clamp_min(0)], torch.zeros((), dtype=torch.float64))
        return (hi - lo) / self.total


#: weights whose largest has a binary exponent beyond +-_SAFE_EXP are rescaled (see :func:`_scale_factors`):
#: below it a float64 sum of up to 2**63 weights cannot overflow and no weight that matters is subnormal.
_SAFE_EXP = 960


def _scale_factors(largest: float, safe_exp: int = _SAFE_EXP) -> Optional[tuple[float, float]]:
    """Two powers of two whose product brings ``largest`` (positive, finite) to ``[0.5, 1)``, or None when its
    binary exponent is within ``+-safe_exp`` (no rescaling needed). Multiplying by them is exact for every
    result that stays normal, so the draws of rescaled weights equal those of any scaled copy. Two factors
    because the product itself may not exist in float64 (``2**1073`` for a largest weight of ``5e-324``)."""
    e = math.frexp(largest)[1]
    if -safe_exp <= e <= safe_exp:
        return None
    a = -e // 2
    return math.ldexp(1.0, a), math.ldexp(1.0, -e - a)


def _as_table(weights: Any) -> CumulativeWeights:
    if isinstance(weights, CumulativeWeights):
        return weights
    return CumulativeWeights(check_weights(weights))


def _chunk_length(num_samples: int, chunk: int) -> int:
    return min(DRAW_CHUNK, num_samples - chunk * DRAW_CHUNK)


def weighted_draw_chunk(
    weights: CumulativeWeights | Any,
    num_samples: int,
    chunk: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    stream: tuple[int, ...] = (),
) -> torch.Tensor:
    """Chunk ``chunk`` of a with-replacement plan of ``num_samples`` draws (positions
    ``[chunk * DRAW_CHUNK, ...)``), regenerable on its own.

    The chunk's uniforms are sorted before ``searchsorted`` (neighbouring searches then touch neighbouring
    memory: about 2-3x faster at N = 1e8) and the resulting draws are put back in a uniformly random order
    with ``randperm``; i.i.d. draws are exchangeable, so this is exactly the distribution of i.i.d. draws.
    With ``shuffle=False`` the chunk is left in ascending index order (sequential reads, e.g. of a memmap).

    Args:
        weights: a :class:`CumulativeWeights` (reuse it across chunks) or raw weights.
        num_samples: length of the whole plan.
        chunk: chunk number, in ``[0, ceil(num_samples / DRAW_CHUNK))``.
        seed, epoch: the plan's seed and epoch.
        shuffle: random order within the chunk (else ascending).
        stream: extra generator parts (distinguishes independent uses of the same seed and epoch).

    Returns:
        int64 tensor of ``min(DRAW_CHUNK, num_samples - chunk * DRAW_CHUNK)`` indices.
    """
    table = _as_table(weights)
    num_samples = _check_num_samples(num_samples)
    n_chunks = -(-num_samples // DRAW_CHUNK)
    chunk = check_int(chunk, "chunk", min_value=0, max_value=n_chunks - 1)
    seed, epoch = _check_seed_epoch(seed, epoch)
    return _draw_chunk(table, _chunk_length(num_samples, chunk), seed, epoch, (*stream, chunk), shuffle)


def _draw_chunk(
    table: CumulativeWeights, length: int, seed: int, epoch: int, stream: tuple[int, ...], shuffle: bool
) -> torch.Tensor:
    g = epoch_generator(seed, epoch, _S_DRAW, *stream)
    u = torch.rand(length, dtype=torch.float64, generator=g)
    u.mul_(table.total)
    u = torch.sort(u).values
    idx = torch.searchsorted(table.cumsum, u, right=True)
    idx.clamp_(max=table.last)  # u * total may round up to total
    if shuffle:
        idx = idx[torch.randperm(length, generator=g)]
    return idx


def iter_weighted_draws(
    weights: CumulativeWeights | Any,
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    shuffle: bool = True,
    stream: tuple[int, ...] = (),
) -> Iterator[torch.Tensor]:
    """The with-replacement plan from position ``start`` on, chunk by chunk (O(1) to reach ``start``)."""
    table = _as_table(weights)
    num_samples = _check_num_samples(num_samples)
    seed, epoch = _check_seed_epoch(seed, epoch)
    start = check_int(start, "start", min_value=0, max_value=num_samples)
    return _iter_draws(table, num_samples, seed, epoch, start, shuffle, stream)


def _iter_draws(
    table: CumulativeWeights,
    num_samples: int,
    seed: int,
    epoch: int,
    start: int,
    shuffle: bool,
    stream: tuple[int, ...],
) -> Iterator[torch.Tensor]:
    chunk, offset = divmod(start, DRAW_CHUNK)
    while chunk * DRAW_CHUNK < num_samples:
        part = _draw_chunk(table, _chunk_length(num_samples, chunk), seed, epoch, (*stream, chunk), shuffle)
        yield part[offset:] if offset else part
        offset = 0
        chunk += 1


def weighted_draws(
    weights: CumulativeWeights | Any,
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    stream: tuple[int, ...] = (),
) -> torch.Tensor:
    """The whole with-replacement plan: ``num_samples`` i.i.d. indices, ``P(i) = w_i / sum(w)``.

    The concatenation of :func:`weighted_draw_chunk` over all chunks (so any slice of it can be regenerated
    alone). Works for any number of weights (no 2**24 limit).

    Example::

        >>> plan = weighted_draws(torch.tensor([0.0, 1.0, 3.0]), 8, seed=0, epoch=0)
        >>> sorted(set(plan.tolist())) <= [1, 2]
        True
    """
    parts = list(
        iter_weighted_draws(weights, num_samples, seed=seed, epoch=epoch, shuffle=shuffle, stream=stream)
    )
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------------
# without replacement: exponential keys, exact k smallest over regenerated blocks
# ------------------------------------------------------------------------------------------------------


def _select_k(values: torch.Tensor, k: int, *, largest: bool) -> torch.Tensor:
    """Indices (ascending, int64) of the ``k`` largest (or smallest) values; equal values by lower index.

    Exact: a bound ``b`` on the k-th value is found, the candidates ``values >= b`` (or ``<= b``) are listed
    in index order, the k-th value ``t`` is found among them, and of the candidates equal to ``t`` only the
    lowest indices are kept. For small ``k`` the bound is the k-th best of ``4k`` block extremes (each is an
    element, so at least ``k`` elements reach it; on typical data about ``1.2k`` do): one ``amax`` pass and
    one compare pass instead of a full ``torch.topk`` (3x faster at N = 1e6, k = 1000). Else ``kthvalue``.
    """
    n = values.numel()
    if k >= n:
        return torch.arange(n)
    if k <= 4096 and n >= 64 * k:
        blocks = 4 * k
        head = values[: blocks * (n // blocks)].view(blocks, -1)
        ext = head.amax(dim=1) if largest else head.amin(dim=1)
        kth = torch.topk(ext, k, largest=largest, sorted=False).values
        bound = kth.min() if largest else kth.max()
    elif k <= 4096:
        kth = torch.topk(values, k, largest=largest, sorted=False).values
        bound = kth.min() if largest else kth.max()
    else:
        bound = torch.kthvalue(values, n - k + 1 if largest else k).values
    cand = torch.nonzero(values >= bound if largest else values <= bound).squeeze(1)
    if cand.numel() == k:
        return cand
    cv = values[cand]
    top = torch.topk(cv, k, largest=largest, sorted=False).values
    t = top.min() if largest else top.max()
    strict = cand[cv > t if largest else cv < t]
    ties = cand[cv == t][: k - strict.numel()]
    return torch.sort(torch.cat([strict, ties])).values


class _KeyForm:
    """How keys ``E / w`` are formed for one weight vector, so that they neither overflow nor underflow.

    - plain: ``E / w`` (weights with a largest entry within ``2**+-64`` and no positive entry below ``2**-1000``
      relative: every key is a normal float64);
    - scaled: ``E / (w * 2**k)``, the largest weight brought to ``[0.5, 1)`` (exact, so the same order of keys
      and the same selection as any scaled copy of the weights, e.g. ``1e-320`` or ``1e308`` weights);
    - log: ``log(E) - log(w)`` when positive weights span more than ``2**1000`` (``E / w`` would overflow to
      ``inf`` and tie), the same order as ``E / w`` in exact arithmetic.
    """

    def __init__(self, weights: torch.Tensor) -> None:
        smallest, largest = (float(x) for x in torch.aminmax(weights))
        self.factors = _scale_factors(largest, 64)
        self.log = False
        if weights.dtype == torch.float64:  # float32 weights span at most 2**277: never needed
            k = 0 if self.factors is None else -math.frexp(largest)[1]  # the scale is 2**k
            low = math.ldexp(1.0, -1000 - k)  # positive weights below it would give keys beyond float64
            if smallest > 0:
                self.log = smallest < low
            elif low > 0:  # zeros present: look for a positive weight below ``low`` (one more pass)
                self.log = _first_index(weights, lambda c: (c > 0) & (c < low)) >= 0

    def keys(self, e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Keys from ``Exp(1)`` draws ``e`` (float64, overwritten) and the matching weights ``w``."""
        if self.log:
            return e.log_().sub_(w.to(torch.float64).log())
        if self.factors is not None:
            return e.div_(w.to(torch.float64).mul(self.factors[0]).mul_(self.factors[1]))
        return e.div_(w)


def _key_block(
    weights: torch.Tensor, b: int, seed: int, epoch: int, stream: tuple[int, ...], form: Optional[_KeyForm] = None
) -> torch.Tensor:
    """Keys ``E_i / w_i`` of block ``b`` (formed by ``form``), with ``E = -log(1 - U) ~ Exp(1)`` from a float64
    uniform ``U`` (inverse CDF: half the cost of ``Tensor.exponential_`` here). A zero weight gives ``+inf``
    (or NaN in the 2**-53 case ``E = 0``: NaN compares false everywhere, so it is never selected either)."""
    s = b * KEY_BLOCK
    w = weights[s : s + KEY_BLOCK]
    g = epoch_generator(seed, epoch, _S_KEYS, *stream, b)
    keys = torch.rand(w.numel(), dtype=torch.float64, generator=g)
    keys.neg_().log1p_().neg_()
    return (form or _KeyForm(weights)).keys(keys, w)


def _cutoff_sample(
    weights: torch.Tensor, seed: int, epoch: int, stream: tuple[int, ...], form: _KeyForm
) -> torch.Tensor:
    """Sorted keys of ``_KEY_SAMPLE`` uniformly random positions, each with its own fresh ``Exp(1)`` draw.

    Each sampled key is ``<= t`` with probability exactly ``F(t) / N``, where ``F(t)`` is the expected number
    of actual keys ``<= t``: the same distribution as the actual keys at random positions, at the cost of a
    gather instead of a pass over all N keys.
    """
    g = epoch_generator(seed, epoch, _S_KEY_SAMPLE, *stream)
    pos = torch.randint(weights.numel(), (_KEY_SAMPLE,), generator=g)
    e = torch.rand(_KEY_SAMPLE, dtype=torch.float64, generator=g).neg_().log1p_().neg_()
    return torch.sort(form.keys(e, weights[pos])).values


def _k_smallest_keys(
    weights: torch.Tensor, k: int, seed: int, epoch: int, stream: tuple[int, ...], index_dtype: torch.dtype
) -> torch.Tensor:
    """Indices of the ``k`` smallest keys (ties by lower index), in a deterministic order: ascending when the
    keys fit one block, else ascending within each of two groups (below the cut-off, then the band)."""
    n = weights.numel()
    nb = -(-n // KEY_BLOCK)
    form = _KeyForm(weights)
    if nb == 1:
        keys = _key_block(weights, 0, seed, epoch, stream, form)
        keys.masked_fill_(weights == 0, math.inf)  # no NaN for topk / kthvalue
        return _select_k(keys, k, largest=False).to(index_dtype)
    sample_sorted = _cutoff_sample(weights, seed, epoch, stream, form)
    s = sample_sorted.numel()
    q = k / n
    # the cut-off's rank in the sample +- z standard deviations of a binomial count (+2 for rounding); the
    # actual count's own spread (sd <= sqrt(k)) is smaller than the sample's scaled to N. If the estimate
    # misses (a rare event) widen it, and at last take every finite key as the band: exact either way, only
    # slower and larger.
    for z in (6.0, 48.0, math.inf):
        t_lo, t_hi = -math.inf, math.inf
        if math.isfinite(z):
            half = z * math.sqrt(s * q * (1 - q)) + 2
            j_lo, j_hi = math.floor(q * s - half), math.ceil(q * s + half)
            if j_lo >= 0:
                t_lo = float(sample_sorted[j_lo])
            if j_hi < s:
                t_hi = float(sample_sorted[j_hi])
        # one pass over the blocks: keep the indices below t_lo and the band [t_lo, t_hi]
        below: list[torch.Tensor] = []
        band_keys: list[torch.Tensor] = []
        band_idx: list[torch.Tensor] = []
        count_below = 0
        for b in range(nb):
            keys = _key_block(weights, b, seed, epoch, stream, form)
            cand = torch.nonzero(keys <= t_hi if math.isfinite(t_hi) else keys < math.inf).squeeze(1)
            ck = keys[cand]
            del keys
            low = ck < t_lo
            lo = cand[low]
            count_below += lo.numel()
            if count_below > k:
                break
            below.append((lo + b * KEY_BLOCK).to(index_dtype))
            in_band = ~low
            band_keys.append(ck[in_band])
            band_idx.append(cand[in_band] + b * KEY_BLOCK)
        band_total = sum(x.numel() for x in band_keys)
        if count_below <= k <= count_below + band_total:
            break
    need = k - count_below
    bk, bi = torch.cat(band_keys), torch.cat(band_idx)
    del band_keys, band_idx
    # the band is in index order, so a stable sort breaks ties by lower index
    order = torch.sort(bk, stable=True).indices[:need]
    picked = torch.sort(bi[order]).values.to(index_dtype)
    return torch.cat([*below, picked])


def weighted_sample_without_replacement(
    weights: Any,
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    index_dtype: torch.dtype = torch.int64,
    stream: tuple[int, ...] = (),
) -> torch.Tensor:
    """``num_samples`` distinct indices, a weighted draw without replacement (successive draws each with
    probability proportional to the weights of the indices not yet drawn).

    Method: exponential keys ``E_i / w_i`` (``E_i ~ Exp(1)``), the ``num_samples`` smallest win (Efraimidis &
    Spirakis 2006); zero weights get infinite keys and are never chosen. Streamed over blocks of
    :data:`KEY_BLOCK` keys (see the module docstring), so N = 1e8 needs no full-size key array. Weights near
    the ends of float64 (``1e308``, subnormal ``1e-320``) are rescaled by a power of two first (the selection of
    any scaled copy), and positive weights spanning more than ``2**1000`` use keys ``log E_i - log w_i`` (the
    same order), so no two keys tie at ``inf`` or ``0``.

    Args:
        weights: 1-D non-negative weights with at least ``num_samples`` positive entries.
        num_samples: how many distinct indices.
        seed, epoch: the plan's seed and epoch.
        shuffle: uniformly random order (``randperm``); else ascending index order.
        index_dtype: ``torch.int64`` (default) or ``torch.int32`` (half the memory, for ``N < 2**31``).
        stream: extra generator parts.

    Returns:
        1-D tensor of ``num_samples`` distinct indices.

    Example::

        >>> plan = weighted_sample_without_replacement(torch.tensor([1.0, 0.0, 2.0, 5.0]), 3, seed=0, epoch=0)
        >>> sorted(plan.tolist())
        [0, 2, 3]
    """
    w = check_weights(weights)
    num_samples = _check_num_samples(num_samples)
    seed, epoch = _check_seed_epoch(seed, epoch)
    shuffle = check_bool(shuffle, "shuffle")
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64; got {index_dtype}")
    if index_dtype == torch.int32 and w.numel() >= 2**31:
        raise ValueError(f"index_dtype=torch.int32 needs fewer than 2**31 weights; got {w.numel()}")
    positive = _count_positive(w)
    if num_samples > positive:
        raise ValueError(
            f"num_samples must be <= the number of positive weights ({positive} of {w.numel()}) without "
            f"replacement; got {num_samples}"
        )
    return _without_replacement(w, num_samples, seed, epoch, shuffle, index_dtype, stream)


def _without_replacement(
    w: torch.Tensor,
    k: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    index_dtype: torch.dtype,
    stream: tuple[int, ...],
) -> torch.Tensor:
    sel = _k_smallest_keys(w, k, seed, epoch, stream, index_dtype)
    return _order(sel, seed, epoch, shuffle, stream)


def _order(sel: torch.Tensor, seed: int, epoch: int, shuffle: bool, stream: tuple[int, ...]) -> torch.Tensor:
    """A uniformly random permutation of ``sel`` (shuffle) or ``sel`` in ascending order."""
    if shuffle:
        g = epoch_generator(seed, epoch, _S_ORDER, *stream)
        dtype = torch.int32 if sel.numel() < 2**31 else torch.int64
        return sel[torch.randperm(sel.numel(), generator=g, dtype=dtype)]
    if sel.dtype == torch.int32:
        arr = sel.numpy()
        arr.sort()  # in place: no int64 index tensor as torch.sort would return
        return sel
    return torch.sort(sel).values


# ------------------------------------------------------------------------------------------------------
# scores: top-k and power weights
# ------------------------------------------------------------------------------------------------------


def _check_scores(scores: Any, name: str = "scores", *, non_negative: bool) -> torch.Tensor:
    t = as_tensor(scores, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers; got {short_repr(t)}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    t = t.detach().cpu()
    if not t.is_floating_point():
        t = t.double()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    lo, hi = torch.aminmax(t)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        i = _first_index(t, lambda c: ~torch.isfinite(c))
        raise ValueError(f"{name} must be finite; got {t[i].item()} at index {i}")
    if non_negative and float(lo) < 0:
        i = _first_index(t, lambda c: c < 0)
        raise ValueError(
            f"{name} must be non-negative for mode='proportional'; got {t[i].item()} at index {i}"
        )
    return t


def topk_indices(scores: Any, k: int, *, exclude: Any = None) -> torch.Tensor:
    """Exactly the ``k`` highest-score indices, ties broken by lower index, in ascending index order.

    Args:
        scores: 1-D finite scores.
        k: how many, in ``[1, N - excluded]``.
        exclude: indices or a bool mask never to select.

    Example::

        >>> topk_indices(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)
        tensor([1, 3])
    """
    s = _check_scores(scores, non_negative=False)
    k = check_int(k, "k", min_value=1)
    mask = exclude_mask(exclude, s.numel())
    pool = s.numel() - (int(mask.sum()) if mask is not None else 0)
    if k > pool:
        raise ValueError(f"k must be <= the number of selectable scores ({pool}); got {k}")
    return _topk(s, k, mask)


def _topk(s: torch.Tensor, k: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None or not bool(mask.any()):
        return _select_k(s, k, largest=True)
    pool_idx = torch.nonzero(~mask).squeeze(1)
    return pool_idx[_select_k(s[pool_idx], k, largest=True)]  # pool_idx is ascending: order and ties kept


def power_weights(scores: Any, temperature: float = 1.0) -> torch.Tensor:
    """Sampling weights ``(score / max(score)) ** (1 / temperature)`` in float64 (power sampling).

    Dividing by the maximum first makes the result scale-free and keeps small temperatures from overflowing
    (they may underflow small scores to 0: such indices are then never drawn).

    Args:
        scores: 1-D non-negative finite scores, at least one positive.
        temperature: ``> 0``; 1 = proportional to the score, -> 0 approaches top-k, large -> uniform.
    """
    s = _check_scores(scores, non_negative=True)
    temperature = check_float(temperature, "temperature", low=0.0, low_inclusive=False)
    m = float(s.max())
    if m <= 0:
        raise ValueError(
            f"scores must have at least one positive entry for mode='proportional'; all {s.numel()} are 0"
        )
    return _power(s, temperature, m)


def _power(s: torch.Tensor, temperature: float, m: float) -> torch.Tensor:
    w = s.to(torch.float64) / m
    if temperature != 1.0:
        w.pow_(1.0 / temperature)
    return w


# ------------------------------------------------------------------------------------------------------
# the EntropySampler plan
# ------------------------------------------------------------------------------------------------------

MODES = ("topk", "proportional")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _split_counts(num_samples: int, random_fraction: float) -> tuple[int, int]:
    """``(score part, random part)``: the random part is ``round(random_fraction * num_samples)``, half up."""
    n_rand = min(num_samples, _round_half_up(random_fraction * num_samples))
    return num_samples - n_rand, n_rand


def _quotas(
    class_ids: torch.Tensor, num_classes: int, pool: torch.Tensor, n: int, min_per_class: int
) -> torch.Tensor:
    from torch_pretrain_update.sampling.plans import stratified_quotas  # the same quotas as StratifiedSampler

    counts = torch.bincount(class_ids[pool], minlength=num_classes)
    return stratified_quotas(counts, n, min_per_class=min_per_class)


def _validate_plan_args(
    scores: Any,
    num_samples: Any,
    mode: Any,
    temperature: Any,
    replacement: Any,
    random_fraction: Any,
    exclude: Any,
    labels: Any,
    min_per_class: Any,
) -> dict[str, Any]:
    mode = check_choice(mode, "mode", MODES)
    s = _check_scores(scores, non_negative=(mode == "proportional"))
    n = s.numel()
    num_samples = _check_num_samples(num_samples)
    temperature = check_float(temperature, "temperature", low=0.0, low_inclusive=False)
    replacement = check_bool(replacement, "replacement")
    random_fraction = check_float(random_fraction, "random_fraction", low=0.0, high=1.0)
    min_per_class = check_int(min_per_class, "min_per_class", min_value=0)
    if replacement and mode == "topk":
        raise ValueError(
            "replacement=True needs mode='proportional' (top-k selects distinct indices); got mode='topk'"
        )
    mask = exclude_mask(exclude, n)
    pool_size = n - (int(mask.sum()) if mask is not None else 0)
    if pool_size == 0:
        raise ValueError(f"exclude removes all {n} indices: nothing is left to select")
    if not replacement and num_samples > pool_size:
        raise ValueError(
            f"num_samples must be <= the number of selectable indices ({pool_size} of {n} after exclude) "
            f"without replacement; got {num_samples}"
        )
    lab, class_ids, classes = None, None, None
    if labels is not None:
        lab, _ = check_labels(labels, "stratify", max_classes=None)  # grouping only: any label value
        if lab.numel() != n:
            raise ValueError(f"stratify must have one label per score ({n}); got {lab.numel()} labels")
        class_ids, classes = compact_labels(lab)  # classes = the distinct label values, ascending
    n_score, n_rand = _split_counts(num_samples, random_fraction)
    return {
        "scores": s,
        "num_samples": num_samples,
        "mode": mode,
        "temperature": temperature,
        "replacement": replacement,
        "random_fraction": random_fraction,
        "mask": mask,
        "labels": lab,
        "class_ids": class_ids,
        "classes": classes,
        "num_classes": 0 if classes is None else classes.numel(),
        "min_per_class": min_per_class,
        "n_score": n_score,
        "n_rand": n_rand,
    }


class _PlanInputs:
    """Validated, precomputed inputs of the EntropySampler plan (weights, pool, classes). Internal."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        s: torch.Tensor = self.scores
        mask: Optional[torch.Tensor] = self.mask
        self.n = s.numel()
        self.pool_size = self.n - (int(mask.sum()) if mask is not None else 0)
        self._pool: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.quotas: Optional[torch.Tensor] = None
        if self.mode == "proportional" and self.n_score > 0:
            m = float(s.max() if mask is None else s[~mask].max())
            if m <= 0:
                raise ValueError(
                    f"scores must have a positive entry among the {self.pool_size} selectable indices for "
                    "mode='proportional'; all are 0"
                )
            w = _power(s, self.temperature, m)
            if mask is not None:
                w[mask] = 0.0
            self.weights = w
        if self.labels is not None and self.n_score > 0:
            self.quotas = _quotas(self.class_ids, self.num_classes, self.pool, self.n_score, self.min_per_class)
        if self.weights is not None:
            self._check_positive()

    def _check_positive(self) -> None:
        w = self.weights
        if self.replacement:  # any positive weight will do (checked globally above); per class below
            if self.quotas is not None:
                pos_per_class = torch.bincount(self.class_ids[w > 0], minlength=self.num_classes)
                short = torch.nonzero((self.quotas > 0) & (pos_per_class == 0)).squeeze(1)
                if short.numel():
                    c = int(short[0])
                    raise ValueError(
                        f"stratify: class {int(self.classes[c])} has quota {int(self.quotas[c])} but no positive "
                        "selectable "
                        "score to draw from; use mode='topk' or a larger temperature"
                    )
            return
        if self.quotas is None:
            positive = int(torch.count_nonzero(w > 0))
            if self.n_score > positive:
                raise ValueError(
                    f"num_samples asks for {self.n_score} score-drawn indices without replacement but only "
                    f"{positive} selectable scores are positive after score ** (1 / temperature); use "
                    "replacement=True, a larger temperature, random_fraction > 0 or mode='topk'"
                )
            return
        pos_per_class = torch.bincount(self.class_ids[w > 0], minlength=self.num_classes)
        short = torch.nonzero(self.quotas > pos_per_class).squeeze(1)
        if short.numel():
            c = int(short[0])
            raise ValueError(
                f"stratify: class {int(self.classes[c])} has quota {int(self.quotas[c])} but only "
                f"{int(pos_per_class[c])} positive selectable scores for a proportional draw without replacement; use "
                "replacement=True or mode='topk'"
            )

    @property
    def pool(self) -> torch.Tensor:
        """Ascending indices of the selectable pool (built on first use: top-k alone never needs it)."""
        if self._pool is None:
            self._pool = torch.arange(self.n) if self.mask is None else torch.nonzero(~self.mask).squeeze(1)
        return self._pool

    def class_members(self, c: int) -> torch.Tensor:
        """Selectable indices of the ``c``-th class present (label value ``classes[c]``)."""
        return self.pool[self.class_ids[self.pool] == c]


def _score_part(inp: _PlanInputs, seed: int, epoch: int) -> torch.Tensor:
    k = inp.n_score
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if inp.quotas is None:
        return _score_draw(inp, inp.scores, inp.weights, inp.mask, k, seed, epoch, ())
    parts = []
    for c in range(inp.num_classes):
        q = int(inp.quotas[c])
        if q == 0:
            continue
        members = inp.class_members(c)
        w = inp.weights[members] if inp.weights is not None else None
        # the class's draws are keyed by its label value, not by its rank among the classes present
        local = _score_draw(inp, inp.scores[members], w, None, q, seed, epoch, (_S_CLASS, int(inp.classes[c])))
        parts.append(members[local])
    return torch.cat(parts)


def _score_draw(
    inp: _PlanInputs,
    scores: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    k: int,
    seed: int,
    epoch: int,
    stream: tuple[int, ...],
) -> torch.Tensor:
    if inp.mode == "topk":
        return _topk(scores, k, mask)
    if inp.replacement:
        table = CumulativeWeights(weights)
        return torch.cat(list(_iter_draws(table, k, seed, epoch, 0, True, stream)))
    return _without_replacement(weights, k, seed, epoch, False, torch.int64, stream)


def _random_part(inp: _PlanInputs, picked: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    k = inp.n_rand
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    g = epoch_generator(seed, epoch, _S_RANDOM_PART)
    if inp.replacement:  # i.i.d. uniform over the pool ("not picked" has no meaning with replacement)
        return inp.pool[torch.randint(inp.pool_size, (k,), generator=g)]
    avail = torch.ones(inp.n, dtype=torch.bool)
    if inp.mask is not None:
        avail &= ~inp.mask
    avail[picked] = False
    rest = torch.nonzero(avail).squeeze(1)
    return torch.sort(rest[torch.randperm(rest.numel(), generator=g)[:k]]).values


def entropy_plan_parts(
    scores: Any,
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    mode: str = "topk",
    temperature: float = 1.0,
    replacement: bool = False,
    random_fraction: float = 0.0,
    exclude: Any = None,
    stratify: Any = None,
    min_per_class: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of the EntropySampler plan before ordering: ``(score_part, random_part)``.

    - ``n_rand = round(random_fraction * num_samples)`` (half up) indices form the random part, the other
      ``n_score`` the score part.
    - Score part over the selectable pool (all indices not in ``exclude``): ``mode="topk"``: exactly the
      ``n_score`` highest scores, ties by lower index (ascending index order). ``mode="proportional"``: a
      draw with probability proportional to ``score ** (1 / temperature)``, with replacement (i.i.d., in draw
      order) or without (ascending index order). With ``stratify=labels`` the ``n_score`` are split into
      per-class quotas (:func:`torch_pretrain_update.sampling.plans.stratified_quotas` over the pool's class counts,
      ``min_per_class``) and each class contributes its top-``q_c`` (or its own draw), classes in ascending
      order.
    - Random part: without replacement, uniform over the pool minus the score part (ascending index order);
      with replacement, i.i.d. uniform over the pool.

    Args:
        scores: 1-D finite scores (non-negative for ``mode="proportional"``).
        num_samples: plan length.
        seed, epoch: the plan's seed and epoch (top-k without ``random_fraction`` does not depend on them).
        mode: ``"topk"`` or ``"proportional"``.
        temperature: ``> 0``, the power ``1 / temperature`` of proportional sampling.
        replacement: draw with replacement (``mode="proportional"`` only).
        random_fraction: in ``[0, 1]``.
        exclude: indices or a bool mask never to select.
        stratify: per-index class labels (true or predicted), or None.
        min_per_class: minimum quota per class with ``stratify`` (as in ``StratifiedSampler``).

    Returns:
        two int64 tensors of lengths ``n_score`` and ``n_rand``.
    """
    kw = _validate_plan_args(
        scores, num_samples, mode, temperature, replacement, random_fraction, exclude, stratify, min_per_class
    )
    seed, epoch = _check_seed_epoch(seed, epoch)
    inp = _PlanInputs(**kw)
    return _parts(inp, seed, epoch)


def _parts(inp: _PlanInputs, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    score = _score_part(inp, seed, epoch)
    rand = _random_part(inp, score, seed, epoch)
    return score, rand


def _plan_from_inputs(inp: _PlanInputs, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    score, rand = _parts(inp, seed, epoch)
    return _order(torch.cat([score, rand]), seed, epoch, shuffle, ()).to(torch.int64)


def entropy_plan(
    scores: Any,
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    mode: str = "topk",
    temperature: float = 1.0,
    replacement: bool = False,
    random_fraction: float = 0.0,
    exclude: Any = None,
    stratify: Any = None,
    min_per_class: int = 1,
    shuffle: bool = True,
) -> torch.Tensor:
    """The EntropySampler's global plan of one epoch: :func:`entropy_plan_parts` concatenated, then in a
    uniformly random order (``shuffle=True``, a ``randperm`` seeded by ``(seed, epoch)``) or in ascending
    index order (``shuffle=False``).

    Example::

        >>> s = torch.tensor([0.2, 0.7, 0.1, 0.9, 0.5])
        >>> entropy_plan(s, 2, seed=0, epoch=0, shuffle=False)
        tensor([1, 3])
    """
    kw = _validate_plan_args(
        scores, num_samples, mode, temperature, replacement, random_fraction, exclude, stratify, min_per_class
    )
    seed, epoch = _check_seed_epoch(seed, epoch)
    shuffle = check_bool(shuffle, "shuffle")
    return _plan_from_inputs(_PlanInputs(**kw), seed, epoch, shuffle)


def _mixture_probabilities(inp: _PlanInputs, indices: torch.Tensor) -> torch.Tensor:
    """Per-draw probability ``m_i`` of index ``i`` under the plan's mixture of parts (internal to
    ``EntropySampler.importance_weights``).

    The plan is ``n_score`` draws from ``P_score`` plus ``n_rand`` from the uniform ``1 / pool_size``;
    ``m_i = (n_score * P_score(i) + n_rand / pool_size) / num_samples``. Without stratify
    ``P_score(i) = w_i / sum(w)``; with stratify, class ``c`` contributes ``q_c`` draws of ``w_i / W_c``, so
    ``n_score * P_score(i) = q_c * w_i / W_c``.
    """
    idx = indices.to(torch.int64)
    num = torch.zeros(idx.numel(), dtype=torch.float64)
    if inp.n_score > 0:
        w = inp.weights[idx]
        if inp.quotas is None:
            num += inp.n_score * w / float(inp.weights.sum())
        else:
            class_w = torch.zeros(inp.num_classes, dtype=torch.float64)
            class_w.index_add_(0, inp.class_ids, inp.weights)
            c = inp.class_ids[idx]
            qc = inp.quotas[c].to(torch.float64)
            wc = class_w[c]
            # w / W_c first: both may be tiny (a class of subnormal weights) while their ratio is not
            ratio = w / torch.where(wc > 0, wc, torch.ones((), dtype=torch.float64))
            num += torch.where(wc > 0, qc * ratio, torch.zeros((), dtype=torch.float64))
    if inp.n_rand > 0:
        num += inp.n_rand / inp.pool_size
    if inp.mask is not None:
        num[inp.mask[idx]] = 0.0
    return num / inp.num_samples
