"""Weighted draws, with and without replacement: pure functions of ``(weights, seed, epoch)``.

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

No library offers chunked, position-addressable weighted draws or a streamed exact k-smallest selection over
regenerated keys, hence the hand-written parts below; every random number still comes from torch's generators
(``rand``, ``randperm``, ``randint``) seeded through :func:`epoch_generator`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import torch

from torch_pretrain_update._checks import check_bool, check_int
from torch_pretrain_update._rng import (
    STREAM_DRAW_ORDER,
    STREAM_KEY_SAMPLE,
    STREAM_KEYS,
    STREAM_WEIGHTED_DRAW,
    epoch_generator,
)
from torch_pretrain_update.sampling._inputs import (
    check_num_samples,
    check_seed_epoch,
    count_positive,
    first_index,
)

# ``as`` marks a re-export: other packages take the weight and exclude checks from here (_inputs is private).
from torch_pretrain_update.sampling._inputs import check_weights as check_weights
from torch_pretrain_update.sampling._inputs import exclude_mask as exclude_mask

__all__ = [
    "CumulativeWeights",
    "weighted_draw_chunk",
    "iter_weighted_draws",
    "weighted_draws",
    "weighted_sample_without_replacement",
]

#: draws per chunk of a with-replacement plan. Part of the plan's definition: chunk ``j`` holds plan positions
#: ``[j * DRAW_CHUNK, (j + 1) * DRAW_CHUNK)`` and is drawn from the generator of ``(seed, epoch, j)``.
DRAW_CHUNK = 1 << 18
#: keys per block of a without-replacement plan (block ``b`` from the generator of ``(seed, epoch, b)``).
KEY_BLOCK = 1 << 20
#: sampled keys used to locate the cut-off of a without-replacement draw.
_KEY_SAMPLE = 1 << 18

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
    num_samples = check_num_samples(num_samples)
    n_chunks = -(-num_samples // DRAW_CHUNK)
    chunk = check_int(chunk, "chunk", min_value=0, max_value=n_chunks - 1)
    seed, epoch = check_seed_epoch(seed, epoch)
    return _draw_chunk(table, _chunk_length(num_samples, chunk), seed, epoch, (*stream, chunk), shuffle)


def _draw_chunk(
    table: CumulativeWeights, length: int, seed: int, epoch: int, stream: tuple[int, ...], shuffle: bool
) -> torch.Tensor:
    g = epoch_generator(seed, epoch, STREAM_WEIGHTED_DRAW, *stream)
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
    num_samples = check_num_samples(num_samples)
    seed, epoch = check_seed_epoch(seed, epoch)
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
                self.log = first_index(weights, lambda c: (c > 0) & (c < low)) >= 0

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
    g = epoch_generator(seed, epoch, STREAM_KEYS, *stream, b)
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
    g = epoch_generator(seed, epoch, STREAM_KEY_SAMPLE, *stream)
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
    num_samples = check_num_samples(num_samples)
    seed, epoch = check_seed_epoch(seed, epoch)
    shuffle = check_bool(shuffle, "shuffle")
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64; got {index_dtype}")
    if index_dtype == torch.int32 and w.numel() >= 2**31:
        raise ValueError(f"index_dtype=torch.int32 needs fewer than 2**31 weights; got {w.numel()}")
    positive = count_positive(w)
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
        g = epoch_generator(seed, epoch, STREAM_DRAW_ORDER, *stream)
        dtype = torch.int32 if sel.numel() < 2**31 else torch.int64
        return sel[torch.randperm(sel.numel(), generator=g, dtype=dtype)]
    if sel.dtype == torch.int32:
        arr = sel.numpy()
        arr.sort()  # in place: no int64 index tensor as torch.sort would return
        return sel
    return torch.sort(sel).values
