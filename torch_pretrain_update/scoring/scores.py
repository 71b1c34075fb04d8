"""Uncertainty scores of model outputs: entropy, margin, least confidence.

Convention: a higher score means the model is *less* sure. Input is a 2-D ``torch.Tensor`` or
``numpy.ndarray`` of shape (N, C), probabilities by default or logits with ``from_logits=True``; output is a
float32 tensor of shape (N,).

The work is done in chunks of rows, so N = 1e7 rows never need a second full-size copy (only one chunk of
temporaries), and a memory-mapped ``numpy`` array (``np.load(..., mmap_mode="r")``) is read chunk by chunk.
Validation is fused into the same pass: one ``aminmax`` and one row sum per chunk; the exact bad row is only
looked for when a chunk fails.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from torch_pretrain_update._checks import check_bool, check_choice, check_matrix, first_bad_row

__all__ = ["entropy", "margin", "least_confidence", "compute_scores", "SCORE_NAMES"]

Matrix = Union[torch.Tensor, np.ndarray]

SCORE_NAMES = ("entropy", "margin", "least_confidence")

#: rows per chunk: large enough that per-chunk Python overhead is negligible, small enough that a chunk of
#: temporaries stays far below the input size (2**16 rows x 1000 classes x 4 B = 256 MB at most).
_CHUNK_ELEMENTS = 1 << 22
_PROB_ATOL = 1e-3


def _chunks(x: Matrix, name: str):
    """Yield ``(start, chunk)`` with ``chunk`` a float tensor of at least float32 precision."""
    n, c = x.shape
    rows = max(1, _CHUNK_ELEMENTS // c)
    for start in range(0, n, rows):
        part = x[start : start + rows]
        if isinstance(part, np.ndarray):
            if not part.flags.writeable or not part.flags.c_contiguous:
                part = np.array(part)  # a chunk-sized copy, e.g. of a read-only memmap
            part = torch.from_numpy(part)
        if part.dtype not in (torch.float32, torch.float64):
            part = part.float()  # float16 / bfloat16: compute in float32
        yield start, part


def _check_probs_chunk(p: torch.Tensor, start: int, name: str) -> None:
    lo_t, hi_t = torch.aminmax(p)
    lo, hi = float(lo_t), float(hi_t)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = ~torch.isfinite(p).all(dim=1)
        i = first_bad_row(bad)
        raise ValueError(f"{name} must be finite; row {start + i} is {p[i].tolist()[:8]}")
    if lo < 0:
        i = first_bad_row((p < 0).any(dim=1))
        raise ValueError(
            f"{name} must be probabilities (>= 0); row {start + i} has {float(p[i].min())}. "
            "Pass from_logits=True for logits."
        )
    sums = p.sum(dim=1, dtype=torch.float64) if p.dtype != torch.float64 else p.sum(dim=1)
    off = (sums - 1.0).abs() > _PROB_ATOL
    if bool(off.any()):
        i = first_bad_row(off)
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {_PROB_ATOL}); row {start + i} sums to {float(sums[i]):.6g}. "
            "Pass from_logits=True for logits."
        )


#: up to this many columns a float32 row sum is exact to well within _PROB_ATOL / 2 (the worst-case rounding
#: error of summing C terms of total ~1 is about C * 2**-24 = 2.4e-4 at C = 4096)
_FAST_SUM_MAX_COLS = 4096


def _check_prob_sums_fast(p: torch.Tensor, start: int, name: str) -> None:
    """Screen a chunk with row sums by one matrix-vector product (BLAS; no float64 copy of the chunk).

    If the smallest or largest row sum is non-finite or off by more than ``_PROB_ATOL / 2``, the chunk goes
    to the exact check :func:`_check_probs_chunk`, which raises the same error (first bad row, same message)
    as before; rows within ``_PROB_ATOL / 2`` in float32 are within ``_PROB_ATOL`` in float64, so nothing else
    can fail it. NaN and inf make a row sum non-finite; negative entries are caught by the callers.
    Few, large ops on purpose: on a busy machine every extra parallel op costs a thread wake-up.
    """
    c = p.shape[1]
    if c > _FAST_SUM_MAX_COLS:
        _check_probs_chunk(p, start, name)
        return
    lo_t, hi_t = torch.aminmax(torch.mv(p, torch.ones(c, dtype=p.dtype, device=p.device)))
    lo, hi = float(lo_t), float(hi_t)
    if not (abs(lo - 1.0) <= _PROB_ATOL / 2 and abs(hi - 1.0) <= _PROB_ATOL / 2):  # NaN fails too
        _check_probs_chunk(p, start, name)


def _entropy_probs_fast(
    p: torch.Tensor, start: int, name: str, out: torch.Tensor, buf: torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum_c p ln p`` per row into ``out``: ``log`` + in-place ``mul`` + one matrix-vector product.

    About 1.3-1.6x one ``torch.log`` pass on an idle machine (``special.entr`` alone costs 2-3x, and a float64
    row sum as much again). ``0 * ln 0`` is NaN in this form: if any row comes out non-finite, those rows are
    recomputed with ``special.entr`` (``entr(0) = 0``); if still non-finite the row holds a NaN, an inf or a
    negative entry and the exact check raises its usual error. ``buf`` (at least ``p.numel()`` elements of
    ``p``'s dtype and device) is reused for the ``p ln p`` temporary: a fresh chunk-sized allocation each time
    would page-fault its memory in again. Returns the buffer for the next chunk.
    """
    if buf is None or buf.numel() < p.numel() or buf.dtype != p.dtype or buf.device != p.device:
        buf = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
    t = torch.log(p, out=buf[: p.numel()].view(p.shape))
    t.mul_(p)
    h = torch.mv(t, torch.full((p.shape[1],), -1.0, dtype=p.dtype, device=p.device))
    del t
    if not np.isfinite(float(h.sum())):
        rows = torch.nonzero(~torch.isfinite(h)).squeeze(1)
        fixed = torch.special.entr(p[rows]).sum(dim=1)
        if not bool(torch.isfinite(fixed).all()):
            _check_probs_chunk(p, start, name)  # raises: a NaN/inf/negative entry in the chunk
            # unreachable (entr is finite on finite non-negative input); kept so that nothing passes silently
            raise ValueError(f"{name}: non-finite entropy in rows {(rows[:8] + start).tolist()}")
        h[rows] = fixed
    out.copy_(h)
    return buf


def _check_logits_chunk(z: torch.Tensor, start: int, name: str) -> None:
    lo, hi = torch.aminmax(z)
    if not (np.isfinite(float(lo)) and np.isfinite(float(hi))):
        i = first_bad_row(~torch.isfinite(z).all(dim=1))
        raise ValueError(f"{name} must be finite logits; row {start + i} is {z[i].tolist()[:8]}")


def _score(x: Matrix, from_logits: bool, name: str, kernel: Callable[[torch.Tensor, bool], torch.Tensor]):
    check_matrix(x, name)
    from_logits = check_bool(from_logits, "from_logits")
    out = torch.empty(x.shape[0], dtype=torch.float32)
    buf = None
    with torch.no_grad():
        for start, part in _chunks(x, name):
            part = part.detach()
            if from_logits:
                _check_logits_chunk(part, start, name)
                res = kernel(part, from_logits)
            elif kernel is _entropy_kernel:
                _check_prob_sums_fast(part, start, name)
                # also detects NaN / inf / negative entries
                buf = _entropy_probs_fast(part, start, name, out[start : start + part.shape[0]], buf)
                continue
            else:
                _check_prob_sums_fast(part, start, name)
                lo = float(torch.amin(part))
                if not (lo >= 0 and np.isfinite(lo)):  # NaN fails both comparisons
                    _check_probs_chunk(part, start, name)
                res = kernel(part, from_logits)
            out[start : start + part.shape[0]] = res.to("cpu")
    return out


def _entropy_kernel(part: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if from_logits:
        logp = torch.log_softmax(part, dim=1)
        return (logp.exp() * logp).sum(dim=1).neg_().clamp_min_(0.0)
    # special.entr(p) = -p ln p with entr(0) = 0: no NaN on zero probabilities (np.log(0) * 0 would be NaN).
    return torch.special.entr(part).sum(dim=1)


def _log_normaliser(part: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z - z_max)`` per row: shifting first keeps float32 exact near the maximum (logits ~1e4)."""
    return torch.logsumexp(part - top1.unsqueeze(1), dim=1)


def _top2(part: torch.Tensor, from_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-2 probabilities; from logits computed in log space (stable for logits of +-1e4)."""
    top = torch.topk(part, 2, dim=1, sorted=True).values
    if not from_logits:
        return top[:, 0], top[:, 1]
    lse = _log_normaliser(part, top[:, 0])
    return (-lse).exp(), (top[:, 1] - top[:, 0] - lse).exp()


def _margin_kernel(part: torch.Tensor, from_logits: bool) -> torch.Tensor:
    p1, p2 = _top2(part, from_logits)
    return 1.0 - (p1 - p2)


def _least_confidence_kernel(part: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if from_logits:
        p1 = (-_log_normaliser(part, part.max(dim=1).values)).exp()
    else:
        p1 = part.max(dim=1).values
    return 1.0 - p1


def entropy(x: Matrix, *, from_logits: bool = False) -> torch.Tensor:
    """Shannon entropy ``-sum_c p_c ln p_c`` of each row (with ``0 ln 0 = 0``), in nats.

    Args:
        x: (N, C) probabilities (rows summing to 1 within 1e-3), or logits with ``from_logits=True``.
        from_logits: treat ``x`` as logits and compute in log space.

    Returns:
        float32 tensor of shape (N,); in ``[0, ln C]``.

    Example::

        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    return _score(x, from_logits, "x", _entropy_kernel)


def margin(x: Matrix, *, from_logits: bool = False) -> torch.Tensor:
    """``1 - (p_top1 - p_top2)`` of each row: near 1 when the two best classes are tied.

    Args:
        x: (N, C) probabilities, or logits with ``from_logits=True``.
        from_logits: treat ``x`` as logits.

    Example::

        >>> margin(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
        tensor([1.0000, 0.2000])
    """
    return _score(x, from_logits, "x", _margin_kernel)


def least_confidence(x: Matrix, *, from_logits: bool = False) -> torch.Tensor:
    """``1 - p_top1`` of each row.

    Args:
        x: (N, C) probabilities, or logits with ``from_logits=True``.
        from_logits: treat ``x`` as logits.

    Example::

        >>> least_confidence(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
        tensor([0.5000, 0.1000])
    """
    return _score(x, from_logits, "x", _least_confidence_kernel)


_KERNELS = {
    "entropy": _entropy_kernel,
    "margin": _margin_kernel,
    "least_confidence": _least_confidence_kernel,
}


def compute_scores(
    x: Matrix, score: str = "entropy", *, from_logits: bool = False, name: str = "probs"
) -> torch.Tensor:
    """Dispatch by name: ``score`` is one of ``"entropy"``, ``"margin"``, ``"least_confidence"``.

    ``name`` is the argument name used in error messages (callers such as samplers pass their own).
    """
    check_choice(score, "score", SCORE_NAMES)
    return _score(x, from_logits, name, _KERNELS[score])
