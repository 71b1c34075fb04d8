"""Per-sequence and per-token scores of a language model's token logits: entropy, negative log-likelihood, margin.

Input is a (N, L, V) tensor of token logits (N sequences of L positions over a vocabulary of V tokens), with an
optional (N, L) bool padding mask (True = a real token). Convention as in :mod:`torch_pretrain_update.scoring.scores`:
a higher score means the model is *less* sure (more uncertain, or the text more surprising), so
:func:`sequence_scores` feeds ``EntropySampler.from_scores`` directly.

Per-token values (nats):

- ``"entropy"``: ``-sum_v p_v ln p_v`` of the predicted distribution (``0 ln 0 = 0``: ``-inf`` logits are fine).
- ``"nll"``: ``-ln p(target)``; ``targets[:, t]`` is the token that ``logits[:, t]`` predicts (for a causal LM
  run on ``input_ids``: ``logits[:, :-1]`` with ``targets = input_ids[:, 1:]``, the shift is the caller's). Mean
  NLL is log-perplexity: ``exp(sequence_scores(..., score="nll"))`` is a sequence's perplexity.
- ``"margin"``: ``1 - (p_top1 - p_top2)``, as :func:`torch_pretrain_update.scoring.scores.margin`.

The work runs in chunks of sequences (and of positions, when one sequence alone is large), computed in log space
(``log_softmax``): extra memory is bounded by one chunk, not by N. Logits at padding positions are never used
(they may hold anything, NaN included). Validation costs no extra pass: a NaN or ``+inf`` logit (or a position
whose logits are all ``-inf``) makes its token's value non-finite; the result is checked once and only then is
the bad position looked for.

The kernels are this module's own rather than those of :mod:`~torch_pretrain_update.scoring.scores`: there a ``-inf``
logit is an error (its entropy form ``p * log p`` gives ``0 * -inf = NaN``), while a language model's banned tokens
make ``-inf`` logits normal here; and the margin from two ``amax`` passes measured about 2x faster than ``topk``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch

from torch_pretrain_update._checks import check_bool, check_choice, check_int, first_bad_row, short_repr

__all__ = ["sequence_scores", "token_weights", "SEQUENCE_SCORE_NAMES"]

Logits = Union[torch.Tensor, np.ndarray]

SEQUENCE_SCORE_NAMES = ("entropy", "nll", "margin")
_REDUCTIONS = ("mean", "sum")

#: elements per chunk when ``chunk_size`` is not given: 1 MiB of float32 temporaries per buffer, which stay in
#: the CPU cache between the passes of a chunk (measured 1.5-2x faster than 16 MiB chunks at V = 256).
_CHUNK_ELEMENTS = 1 << 18
#: a single sequence above this many elements is split along its positions too
_MAX_SEQUENCE_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------------


def _check_logits(logits: Any) -> Logits:
    if not isinstance(logits, (np.ndarray, torch.Tensor)):
        raise TypeError(f"logits must be a (N, L, V) torch.Tensor or numpy.ndarray; got {type(logits).__name__}")
    floating = logits.dtype.kind == "f" if isinstance(logits, np.ndarray) else logits.is_floating_point()
    if not floating:
        raise TypeError(f"logits must have a floating dtype; got {short_repr(logits)}")
    if logits.ndim != 3:
        raise ValueError(f"logits must be 3-D of shape (N, L, V); got shape {tuple(logits.shape)}")
    n, length, v = logits.shape
    if n == 0 or length == 0:
        raise ValueError(f"logits must have at least one sequence and one position; got shape {tuple(logits.shape)}")
    if v < 2:
        raise ValueError(f"logits must have a vocabulary of at least 2 tokens (last dimension); got shape "
                         f"{tuple(logits.shape)}")
    return logits


def _device(logits: Logits) -> torch.device:
    return logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")


def _as_positions(x: Any, name: str, logits: Logits) -> torch.Tensor:
    """A tensor of shape (N, L) on the logits' device (ndarrays are converted; no copy of a tensor)."""
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array; got {short_repr(x)}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray of shape {tuple(logits.shape[:2])}; got "
                        f"{type(x).__name__}")
    return x


def _check_positions(x: torch.Tensor, name: str, logits: Logits) -> torch.Tensor:
    if tuple(x.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:2])} (logits' (N, L)); got {tuple(x.shape)}")
    if x.device != _device(logits):
        raise ValueError(f"{name} must be on the logits' device {_device(logits)}; got {x.device}")
    return x.detach()


def _check_mask(mask: Any, logits: Logits) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    m = _as_positions(mask, "mask", logits)
    if m.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = real token); got {short_repr(m)}. An integer attention mask "
            "converts with attention_mask.bool()"
        )
    m = _check_positions(m, "mask", logits)
    empty = ~m.any(dim=1)
    if bool(empty.any()):
        i = first_bad_row(empty)
        raise ValueError(
            f"mask row {i} has no real token (all False): its score would be a mean over 0 tokens; drop the row "
            "or exclude it from selection"
        )
    return m


def _check_targets(targets: Any, mask: Optional[torch.Tensor], logits: Logits) -> torch.Tensor:
    if targets is None:
        raise ValueError("targets is required for score='nll' (the token id each logits position predicts)")
    t = _as_positions(targets, "targets", logits)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"targets must hold integer token ids; got {short_repr(t)}")
    t = _check_positions(t, "targets", logits).to(torch.int64)
    v = logits.shape[2]
    real = t if mask is None else torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))
    lo, hi = (int(x) for x in torch.aminmax(real))
    if lo < 0 or hi >= v:
        flat = real.reshape(-1)
        j = first_bad_row((flat < 0) | (flat >= v))
        i, pos = divmod(j, t.shape[1])
        raise ValueError(
            f"targets must be token ids in [0, {v}) at real positions; got {int(flat[j])} at row {i}, position {pos}"
        )
    return t


def _chunk_rows(chunk_size: Any, shape: tuple[int, int, int]) -> int:
    _, length, v = shape
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // (length * v))
    return check_int(chunk_size, "chunk_size", min_value=1)


# ------------------------------------------------------------------------------------------------------
# per-token kernels on one chunk (c, l, V) -> (c, l)
# ------------------------------------------------------------------------------------------------------


def _entropy_tokens(z: torch.Tensor, safe: bool) -> torch.Tensor:
    lp = torch.log_softmax(z, dim=-1)
    if safe:
        # -inf logits give lp = -inf and p = 0; 0 * -inf is NaN, 0 * (most negative float) is 0. NaN stays NaN.
        lp.clamp_min_(torch.finfo(lp.dtype).min)
    p = lp.exp()
    return p.mul_(lp).sum(dim=-1).neg_()


def _nll_tokens(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # padding positions may hold any id (e.g. -100): read position 0 there, the value is discarded
    idx = t.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
    return torch.log_softmax(z, dim=-1).gather(-1, idx).squeeze(-1).neg_()


def _margin_tokens(z: torch.Tensor) -> torch.Tensor:
    """``1 - (p1 - p2)`` from log-probabilities: the top-1 by ``amax``, the top-2 by ``amax`` with the top-1
    masked out (a tied maximum counts twice, as ``torch.topk`` does): about 2x cheaper than ``topk`` here."""
    lp = torch.log_softmax(z, dim=-1)
    m1 = lp.amax(dim=-1, keepdim=True)
    top = lp == m1
    ties = top.sum(dim=-1) > 1
    m2 = lp.masked_fill_(top, -math.inf).amax(dim=-1)
    m1 = m1.squeeze(-1)
    m2 = torch.where(ties, m1, m2)
    return 1.0 - (m1.exp() - m2.exp())


def _token_values(z: torch.Tensor, t: Optional[torch.Tensor], score: str, safe: bool = False) -> torch.Tensor:
    if score == "entropy":
        return _entropy_tokens(z, safe)
    if score == "nll":
        if t is None:  # _check_targets makes it required for "nll"; this keeps the types honest
            raise ValueError("targets is required for score='nll' (the token id each logits position predicts)")
        return _nll_tokens(z, t)
    return _margin_tokens(z)


def _blocks(shape: tuple[int, int, int], rows: int, split_positions: bool):
    """``(n0, n1, l0, l1)`` blocks: ``rows`` sequences at a time, and positions split when one sequence is large."""
    n, length, v = shape
    step = length
    if split_positions and length * v > _MAX_SEQUENCE_ELEMENTS:
        step = max(1, _CHUNK_ELEMENTS // v)
        rows = 1
    for n0 in range(0, n, rows):
        for l0 in range(0, length, step):
            yield n0, min(n, n0 + rows), l0, min(length, l0 + step)


def _load(logits: Logits, n0: int, n1: int, l0: int, l1: int) -> torch.Tensor:
    part = logits[n0:n1, l0:l1]
    if isinstance(part, np.ndarray):
        part = torch.from_numpy(np.array(part, copy=True) if not part.flags.writeable else np.ascontiguousarray(part))
    part = part.detach()
    if part.dtype not in (torch.float32, torch.float64):
        part = part.float()  # float16 / bfloat16: compute in float32
    return part


def _raise_bad_position(logits: Logits, mask: Optional[torch.Tensor], targets: Optional[torch.Tensor],
                        score: str, row: int) -> None:
    """Find the first real position of ``row`` whose value is non-finite and raise naming it."""
    z = _load(logits, row, row + 1, 0, logits.shape[1])
    t = None if targets is None else targets[row : row + 1]
    vals = _token_values(z, t, score, safe=True)[0]
    z = z[0]
    bad = ~torch.isfinite(vals)
    if mask is not None:
        bad &= mask[row]
    pos = first_bad_row(bad) if bool(bad.any()) else 0
    zp = z[pos]
    if bool(torch.isnan(zp).any()):
        what = "a NaN logit"
    elif bool(torch.isposinf(zp).any()):
        what = "a +inf logit"
    elif bool(torch.isneginf(zp).all()):
        what = "all logits -inf (no token has a positive probability)"
    elif t is not None and bool(torch.isneginf(zp[int(t[0, pos])])):
        raise ValueError(
            f"targets: row {row}, position {pos} is token {int(t[0, pos])}, whose logit is -inf (probability 0): "
            "its negative log-likelihood is infinite"
        )
    else:
        what = "logits whose range overflows the log-softmax"
    raise ValueError(f"logits must be finite (or -inf) at real positions; row {row}, position {pos} has {what}: "
                     f"{zp.tolist()[:8]}")


def _run(logits: Any, mask: Any, score: Any, targets: Any, chunk_size: Any, *, per_token: bool):
    logits = _check_logits(logits)
    score = check_choice(score, "score", SEQUENCE_SCORE_NAMES)
    m = _check_mask(mask, logits)
    t = _check_targets(targets, m, logits) if score == "nll" else None
    rows = _chunk_rows(chunk_size, tuple(logits.shape))
    n, length, _ = logits.shape
    dev = _device(logits)
    tokens = torch.zeros(n, length, dtype=torch.float32, device=dev) if per_token else None
    sums = torch.zeros(n, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32, device=dev)
    zero = torch.zeros((), device=dev)
    with torch.no_grad():
        for n0, n1, l0, l1 in _blocks(tuple(logits.shape), rows, chunk_size is None):
            z = _load(logits, n0, n1, l0, l1)
            tc = None if t is None else t[n0:n1, l0:l1]
            mc = None if m is None else m[n0:n1, l0:l1]
            vals = _token_values(z, tc, score)
            if mc is not None:
                vals = torch.where(mc, vals, zero.to(vals.dtype))  # padding: never read, NaN there is dropped
            if score == "entropy" and not bool(torch.isfinite(vals).all()):
                # -inf logits (p = 0, 0 * -inf = NaN): recompute the chunk without NaN; a real NaN stays
                vals = _token_values(z, tc, score, safe=True)
                if mc is not None:
                    vals = torch.where(mc, vals, zero.to(vals.dtype))
            if tokens is not None:  # per_token
                tokens[n0:n1, l0:l1] = vals
            sums[n0:n1] += vals.sum(dim=1).to(sums.dtype)
        if not bool(torch.isfinite(sums).all()):
            _raise_bad_position(logits, m, t, score, first_bad_row(~torch.isfinite(sums)))
    return m, sums, tokens


# ------------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------------


def sequence_scores(
    logits: Logits,
    mask: Optional[Any] = None,
    *,
    score: str = "entropy",
    reduce: str = "mean",
    targets: Optional[Any] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """One uncertainty score per sequence from token logits: the mean (or sum) over real tokens of the per-token
    entropy, negative log-likelihood or margin. Higher = less sure, ready for ``EntropySampler.from_scores``.

    Args:
        logits: (N, L, V) float logits (tensor on any device, or ndarray, e.g. a memory-mapped one); float16 and
            bfloat16 are computed in float32 a chunk at a time. Logits may be ``-inf`` (a banned token); NaN,
            ``+inf`` or all ``-inf`` at a real position is a ``ValueError`` naming the row and position.
        mask: (N, L) bool, True = a real token (padding positions are never read). ``None``: every position is
            real. Every row needs at least one real token (a mean over 0 tokens is refused, naming the row).
        score: ``"entropy"`` (default), ``"nll"`` (needs ``targets``) or ``"margin"``.
        reduce: ``"mean"`` (default) or ``"sum"`` over the real tokens of each sequence.
        targets: (N, L) integer token ids for ``score="nll"``: ``logits[:, t]`` predicts ``targets[:, t]`` (shift
            a causal LM's ``input_ids`` yourself). Ids at padding positions are not read (``-100`` is fine).
        chunk_size: sequences per chunk (default: about 2**18 logits per chunk, and a single sequence above
            2**22 logits is also split along its positions). The result does not depend on it.

    Returns:
        float32 CPU tensor of shape (N,), in nats: mean entropy in ``[0, ln V]``, mean NLL ``>= 0`` (its ``exp``
        is the perplexity), mean margin in ``[0, 1]``.

    Raises:
        TypeError: logits not floating point, a non-bool mask, non-integer targets.
        ValueError: wrong shapes, an all-padding row, out-of-range targets, missing targets for ``"nll"``, or a
            non-finite logit at a real position.

    Example::

        >>> logits = torch.randn(4, 16, 100)
        >>> mask = torch.ones(4, 16, dtype=torch.bool)
        >>> mask[0, 10:] = False  # padding
        >>> s = sequence_scores(logits, mask)  # mean token entropy per sequence
        >>> s.shape, s.dtype
        (torch.Size([4]), torch.float32)
        >>> sampler = EntropySampler.from_scores(s, 2)  # doctest: +SKIP
    """
    reduce = check_choice(reduce, "reduce", _REDUCTIONS)
    m, sums, _ = _run(logits, mask, score, targets, chunk_size, per_token=False)
    if reduce == "mean":
        count = torch.full_like(sums, logits.shape[1]) if m is None else m.sum(dim=1).to(sums.dtype)
        sums = sums / count
    return sums.to(device="cpu", dtype=torch.float32)


def token_weights(
    logits: Logits,
    mask: Optional[Any] = None,
    *,
    score: str = "entropy",
    targets: Optional[Any] = None,
    normalize: bool = True,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token weights from the per-token scores of :func:`sequence_scores`, for the ``weight`` argument of
    ``KDLoss`` / ``kd_loss`` (token-level distillation that leans on the tokens the model is unsure about).

    Padding positions get weight 0. With ``normalize=True`` the weights are divided by their mean over the real
    tokens (so they average 1 there and the loss keeps its scale: ``KDLoss`` reduces as ``sum_p w_p * loss_p /
    P`` over the P positions of its ``mask``). The weights are constants (computed without gradient).

    Args:
        logits: (N, L, V) logits, as :func:`sequence_scores` (typically the teacher's or the current model's).
        mask: (N, L) bool, True = real token, or None.
        score: ``"entropy"``, ``"nll"`` (needs ``targets``) or ``"margin"``.
        targets: (N, L) token ids for ``score="nll"``.
        normalize: divide by the mean over real tokens (a ``ValueError`` if every real token scores 0).
        chunk_size: sequences per chunk, as :func:`sequence_scores`.

    Returns:
        float32 tensor of shape (N, L) on the logits' device.

    Example::

        >>> student = torch.randn(2, 8, 50, requires_grad=True)
        >>> teacher = torch.randn(2, 8, 50)
        >>> mask = torch.ones(2, 8, dtype=torch.bool)
        >>> w = token_weights(teacher, mask)  # mean 1 over real tokens
        >>> loss = KDLoss(alpha=1.0)(student, teacher, weight=w, mask=mask)  # doctest: +SKIP
    """
    normalize = check_bool(normalize, "normalize")
    m, sums, tokens = _run(logits, mask, score, targets, chunk_size, per_token=True)
    if normalize:
        count = tokens.numel() if m is None else int(m.sum())
        total = float(sums.sum(dtype=torch.float64))
        if not total > 0:
            raise ValueError(
                f"token_weights: every real token has {score} 0, so the weights cannot be normalised to mean 1; "
                "pass normalize=False"
            )
        tokens.mul_(count / total)
    return tokens
