"""Sparse (top-k) teacher targets for :class:`~torch_pretrain_update.KDLoss`: :class:`SparseTeacher`, its
completion to a full distribution, and the checks of one block of it."""

from __future__ import annotations

import math

import torch

from torch_pretrain_update._checks import check_int, first_bad_row, short_repr

__all__ = ["SparseTeacher"]

#: Top-k log-probabilities whose total exceeds exp(_SPARSE_LSE_TOL) are not log-probabilities (float16 storage
#: rounds each value by at most ~5e-4 relative, far below this tolerance).
_SPARSE_LSE_TOL = 1e-2


class SparseTeacher:
    r"""Top-k teacher targets: the k largest log-probabilities (at temperature 1) of each sample and their class
    indices, e.g. as cached by :func:`~torch_pretrain_update.write_teacher_outputs` with ``topk``.

    :class:`~torch_pretrain_update.KDLoss` accepts it in place of dense teacher logits. **Approximation:** the
    probability mass that the top k classes leave, ``r = 1 - sum_i exp(log_probs_i)``, is spread uniformly over the
    other ``C - k`` classes *at temperature 1*, i.e. every missing class gets the log-probability
    ``log(r / (C - k))``; the completed distribution is then tempered exactly like dense logits
    (``softmax(log_p / T)``). With ``k = C`` nothing is missing and the loss equals the dense loss. With ``k < C``
    the teacher's ranking among the tail classes is lost (their total mass is kept at T = 1; at T > 1 tempering a
    flat tail gives it somewhat more mass than the true, uneven tail would get). If rounding makes the top-k mass
    reach 1, the tail gets probability 0.

    Args:
        log_probs: float tensor (..., k), log-probabilities at temperature 1 (``log_softmax`` of the teacher's
            logits, **not** raw logits: raw logits carry no information about the mass of the other classes).
        indices: integer tensor (..., k) of distinct class indices, same shape and device as ``log_probs``.

    Example::

        >>> teacher = torch.randn(8, 1000)
        >>> sparse = SparseTeacher.from_logits(teacher, k=32)
        >>> loss = KDLoss(alpha=1.0)(torch.randn(8, 1000, requires_grad=True), sparse)
    """

    __slots__ = ("log_probs", "indices")

    def __init__(self, log_probs: torch.Tensor, indices: torch.Tensor) -> None:
        if not isinstance(log_probs, torch.Tensor) or not log_probs.is_floating_point():
            raise TypeError(f"log_probs must be a floating-point torch.Tensor; got {short_repr(log_probs)}")
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool \
                or indices.is_complex():
            raise TypeError(f"indices must be an integer torch.Tensor; got {short_repr(indices)}")
        if log_probs.ndim == 0 or log_probs.shape != indices.shape:
            raise ValueError(
                f"log_probs and indices must have the same shape (..., k); got {tuple(log_probs.shape)} and "
                f"{tuple(indices.shape)}"
            )
        if log_probs.shape[-1] == 0:
            raise ValueError(f"k (the last dimension of log_probs) must be >= 1; got shape {tuple(log_probs.shape)}")
        if log_probs.device != indices.device:
            raise ValueError(
                f"log_probs and indices must be on one device; got {log_probs.device} and {indices.device}"
            )
        self.log_probs = log_probs.detach()
        self.indices = indices.detach().long()

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> SparseTeacher:
        """The top ``k`` classes of ``log_softmax(logits)`` (computed in at least float32)."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"logits must be a floating-point torch.Tensor; got {short_repr(logits)}")
        if logits.ndim == 0:
            raise ValueError("logits must have a class dimension; got a 0-d tensor")
        k = check_int(k, "k", min_value=1, max_value=logits.shape[-1])
        with torch.no_grad():
            lp = torch.log_softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            values, indices = torch.topk(lp, k, dim=-1)
        return cls(values, indices)

    @property
    def k(self) -> int:
        return self.log_probs.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Leading shape (without k): the shape of the student's logits without the class dimension."""
        return self.log_probs.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    def to(self, *args, **kwargs) -> SparseTeacher:
        """Move (and cast ``log_probs``, like ``Tensor.to``); indices stay int64."""
        lp = self.log_probs.to(*args, **kwargs)
        return SparseTeacher(lp, self.indices.to(lp.device))

    def dense_log_probs(self, num_classes: int) -> torch.Tensor:
        """The completed (..., C) log-probabilities at temperature 1 that ``KDLoss`` uses (see the class
        docstring for the approximation). Allocates the full (..., C) tensor: for inspection, not training."""
        num_classes = check_int(num_classes, "num_classes", min_value=self.k)
        lp = self.log_probs.to(torch.promote_types(self.log_probs.dtype, torch.float32)).reshape(-1, self.k)
        out = _complete_sparse(lp, self.indices.reshape(-1, self.k), num_classes)
        return out.reshape(*self.shape, num_classes)

    def __repr__(self) -> str:
        return f"SparseTeacher(shape={tuple(self.shape)}, k={self.k}, dtype={self.log_probs.dtype})"


def _complete_sparse(lp: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(R, k) top-k log-probs -> (R, C) completed log-probs; the tail gets log(r / (C - k)) each, or -inf when
    the top-k mass already reaches 1."""
    rows, k = lp.shape
    if k == num_classes:
        fill = torch.zeros((rows, 1), dtype=lp.dtype, device=lp.device)
    else:
        lse = torch.logsumexp(lp, dim=1, keepdim=True).clamp_max(0.0)
        # log(1 - exp(lse)) = log(-expm1(lse)): exact for lse near 0 (almost all mass in the top k)
        fill = torch.log(-torch.expm1(lse)) - math.log(num_classes - k)
    out = fill.expand(rows, num_classes).clone()
    out.scatter_(1, idx, lp)
    return out




def _check_sparse_block(lp: torch.Tensor, idx: torch.Tensor, c: int, start: int) -> None:
    """Distinct indices in range and a total mass <= 1 for one block of top-k targets (sparse path only)."""
    lse = torch.logsumexp(lp, dim=1)
    counts = torch.zeros((lp.shape[0], c), dtype=torch.int32, device=lp.device)
    in_range = bool(((idx >= 0) & (idx < c)).all())
    if not in_range:
        bad = ((idx < 0) | (idx >= c)).any(dim=1)
        i = first_bad_row(bad)
        raise ValueError(
            f"teacher_logits (SparseTeacher.indices) must be in [0, {c}); position {start + i} has "
            f"{idx[i].tolist()[:8]}"
        )
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))
    dup = (counts > 1).any(dim=1)
    too_much = lse > _SPARSE_LSE_TOL
    flags = torch.stack([dup.any(), too_much.any()]).tolist()
    if flags[0]:
        i = first_bad_row(dup)
        raise ValueError(
            f"teacher_logits (SparseTeacher.indices) must be distinct per position; position {start + i} "
            f"repeats a class"
        )
    if flags[1]:
        i = first_bad_row(too_much)
        raise ValueError(
            f"teacher_logits (SparseTeacher.log_probs) must be log-probabilities (total mass <= 1); position "
            f"{start + i} has logsumexp {float(lse[i]):.4g} > 0. Pass log_softmax outputs, not raw logits "
            "(SparseTeacher.from_logits does this)."
        )
