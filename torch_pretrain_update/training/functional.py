"""Functional forms of the distillation losses, as ``torch.nn.functional`` stands beside ``torch.nn``.

Each loss module of :mod:`torch_pretrain_update.training.distill` forwards to its function here:
:func:`kd_loss` (:class:`~torch_pretrain_update.KDLoss`), :func:`dkd_loss` (:class:`~torch_pretrain_update.DKDLoss`),
:func:`pseudo_label_loss` (:class:`~torch_pretrain_update.PseudoLabelLoss`) and :func:`feature_hint_loss`
(:class:`~torch_pretrain_update.FeatureHintLoss`, whose regressor is passed in). The formulas, shapes and the
conventions they share (T², batchmean, ``sum w * loss / B`` weights, the finiteness check) are documented on the
classes and in the ``distill`` module.

``kd_loss`` and ``dkd_loss`` run a fused kernel by default (value and gradient in one blocked pass, a single
backward); ``fused=False`` computes the same loss from differentiable torch ops, for a gradient of the gradient
(``create_graph=True``) at the cost of autograd's (N, C) intermediates.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from torch_pretrain_update._checks import check_bool, check_float, check_int, short_repr
from torch_pretrain_update.training._kernels import (
    _compute_dtype,
    _dkd_kernel,
    _dkd_parts,
    _FusedRowLoss,
    _kd_kernel,
    _prepare,
    _scale,
)
from torch_pretrain_update.training._loss_checks import (
    _check_logits,
    _check_positions,
    _check_teacher,
    _check_temperature,
    _raise_nonfinite,
    _validate_values,
)
from torch_pretrain_update.training.sparse_teacher import SparseTeacher, _check_sparse_block, _complete_sparse

__all__ = ["kd_loss", "dkd_loss", "pseudo_label_loss", "feature_hint_loss"]


def _rows(student: torch.Tensor, teacher, target, weight, mask):
    """The positions as rows (see ``_prepare``), label range and weights checked."""
    prepared = _prepare(student, teacher, target, weight, mask)
    _validate_values(prepared[2], prepared[3], student.shape[-1])
    return prepared


def _row_loss(student: torch.Tensor, prepared, fused: bool, name: str, kernel: Callable, rows: Callable, *hparams):
    """``sum_r scale_r * row_r``: by the fused ``kernel`` factory, or from the differentiable ``rows``; both take
    ``(zs, zt, y, *hparams, compute_dtype)``."""
    zs, zt, y, w, n_den = prepared
    cdt = _compute_dtype(student)
    scale = _scale(w, n_den, cdt)
    if fused:
        need_grad = torch.is_grad_enabled() and student.requires_grad
        return _FusedRowLoss.apply(zs, kernel(zs, zt, y, *hparams, cdt), scale, need_grad, name)
    r = rows(zs, zt, y, *hparams, cdt)
    return ((r * scale).sum() if isinstance(scale, torch.Tensor) else r.sum() * scale).to(student.dtype)


def _kd_rows(zs: torch.Tensor, zt: torch.Tensor | SparseTeacher, y: Optional[torch.Tensor], alpha: float,
             temp: float, cdt: torch.dtype) -> torch.Tensor:
    """The unfused KD rows, differentiable any number of times."""
    z = zs.to(cdt)
    rows = z.new_zeros(z.shape[0])
    if alpha > 0.0:
        if isinstance(zt, SparseTeacher):
            lp = zt.log_probs.to(cdt)
            _check_sparse_block(lp, zt.indices, z.shape[1], 0)
            tc = _complete_sparse(lp, zt.indices, z.shape[1])
        else:
            tc = zt.to(cdt)
        ls = F.log_softmax(z / temp, dim=1)
        lq = F.log_softmax(tc / temp, dim=1)
        q = lq.exp()
        kl = torch.where(q > 0, q * (lq - ls), 0.0).sum(dim=1)  # a sparse tail of probability 0 adds 0
        rows = rows + (alpha * temp * temp) * kl
    if alpha < 1.0:
        if y is None:  # kd_loss refuses a missing target unless alpha == 1
            raise ValueError(f"target is required when alpha < 1; got target=None with alpha={alpha:g}")
        rows = rows + (1.0 - alpha) * F.cross_entropy(z, y, reduction="none")
    return rows


def _dkd_rows(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, temp: float,
              cdt: torch.dtype) -> torch.Tensor:
    """The unfused DKD rows, differentiable any number of times (same formulas as the fused kernel)."""
    yc = y.unsqueeze(1)
    ls_t, ls_o, ls_hat = _dkd_parts(zs.to(cdt) / temp, yc, inplace=False)
    lq_t, lq_o, lq_hat = _dkd_parts(zt.to(cdt) / temp, yc, inplace=False)
    tckd = lq_t.exp() * (lq_t - ls_t) + lq_o.exp() * (lq_o - ls_o)
    at_target = torch.zeros_like(lq_hat, dtype=torch.bool).scatter_(1, yc, True)
    nckd = torch.where(at_target, 0.0, lq_hat.exp() * (lq_hat - ls_hat)).sum(dim=1, keepdim=True)
    return ((alpha * tckd + beta * nckd) * (temp * temp)).reshape(-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weight: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    check_finite: bool = True,
    fused: bool = True,
) -> torch.Tensor:
    r"""``(1 - alpha) * CE(z_s, y) + alpha * T**2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batchmean.

    ``alpha`` weighs the distillation term (torchdistill's ``alpha`` weighs the cross-entropy: pass ``1 - a``).
    See :class:`~torch_pretrain_update.KDLoss` for shapes, ``weight``/``mask`` and sparse teachers.

    Args:
        student_logits: (B, C) or (B, L, C).
        teacher_logits: same shape (detached), or a :class:`~torch_pretrain_update.SparseTeacher`.
        target: integer labels (B,) or (B, L); may be ``None`` only with ``alpha=1``.
        temperature: T > 0.
        alpha: weight of the distillation term in [0, 1].
        weight: per-sample (B,) or per-position (B, L) weights.
        mask: bool (B,) or (B, L); only True positions count.
        check_finite: raise ``ValueError`` naming the input when the loss is not finite.
        fused: ``True`` for the fused kernel (a single backward), ``False`` for differentiable torch ops.

    Example::

        >>> student = torch.randn(32, 10, requires_grad=True)
        >>> loss = kd_loss(student, torch.randn(32, 10), torch.randint(0, 10, (32,)), temperature=4.0, alpha=0.9)
        >>> loss.backward()
    """
    temp = _check_temperature(temperature)
    alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
    check_finite = check_bool(check_finite, "check_finite")
    fused = check_bool(fused, "fused")
    student = _check_logits(student_logits, "student_logits")
    teacher = _check_teacher(teacher_logits, student, allow_sparse=True)
    if target is None:
        if alpha != 1.0:
            raise ValueError(
                f"target is required when alpha < 1 (the label term has weight 1 - alpha = {1 - alpha:g}); "
                "pass target, or alpha=1.0 for pure distillation"
            )
    else:
        target = _check_positions(target, "target", student, kind="target")
    if weight is not None:
        weight = _check_positions(weight, "weight", student, kind="weight")
    if mask is not None:
        mask = _check_positions(mask, "mask", student, kind="mask")
    prepared = _rows(student, teacher, target, weight, mask)
    loss = _row_loss(student, prepared, fused, "KD loss", _kd_kernel, _kd_rows, alpha, temp)
    if check_finite and not math.isfinite(loss.item()):
        _raise_nonfinite(
            "KD loss", {"student_logits": student, "teacher_logits": teacher if alpha > 0.0 else None}, mask
        )
    return loss


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    weight: Optional[torch.Tensor] = None,
    check_finite: bool = True,
    fused: bool = True,
) -> torch.Tensor:
    r"""Decoupled knowledge distillation ``T**2 * (alpha * TCKD + beta * NCKD)``, batchmean; see
    :class:`~torch_pretrain_update.DKDLoss`.

    Args:
        student_logits: (B, C) or (B, L, C).
        teacher_logits: dense, same shape (detached).
        target: integer labels (B,) or (B, L).
        alpha: weight of TCKD (>= 0).
        beta: weight of NCKD (>= 0).
        temperature: T > 0.
        weight: per-sample (B,) or per-position (B, L) weights.
        check_finite: raise ``ValueError`` naming the input when the loss is not finite.
        fused: ``True`` for the fused kernel (a single backward), ``False`` for differentiable torch ops.

    Example::

        >>> student = torch.randn(16, 100, requires_grad=True)
        >>> target = torch.randint(0, 100, (16,))
        >>> loss = F.cross_entropy(student, target) + dkd_loss(student, torch.randn(16, 100), target, beta=8.0)
    """
    alpha = check_float(alpha, "alpha", low=0.0)
    beta = check_float(beta, "beta", low=0.0)
    temp = _check_temperature(temperature)
    check_finite = check_bool(check_finite, "check_finite")
    fused = check_bool(fused, "fused")
    student = _check_logits(student_logits, "student_logits")
    teacher = _check_teacher(teacher_logits, student, allow_sparse=False)
    if target is None:
        raise ValueError("target is required by DKD (TCKD and NCKD are defined by the target class)")
    target = _check_positions(target, "target", student, kind="target")
    if weight is not None:
        weight = _check_positions(weight, "weight", student, kind="weight")
    prepared = _rows(student, teacher, target, weight, None)
    loss = _row_loss(student, prepared, fused, "DKD loss", _dkd_kernel, _dkd_rows, alpha, beta, temp)
    if check_finite and not math.isfinite(loss.item()):
        _raise_nonfinite("DKD loss", {"student_logits": student, "teacher_logits": teacher})
    return loss


def pseudo_label_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    threshold: Optional[float] = None,
    weight: Optional[torch.Tensor] = None,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Cross-entropy against the teacher's hard labels ``argmax(z_t)``, optionally only where the teacher's
    confidence reaches ``threshold``, summed and divided by B; see :class:`~torch_pretrain_update.PseudoLabelLoss`.

    Args:
        student_logits: (B, C) or (B, L, C).
        teacher_logits: same shape (detached).
        threshold: confidence threshold in (0, 1], or ``None`` for none.
        weight: per-sample (B,) or per-position (B, L) weights.
        check_finite: raise ``ValueError`` naming the input when the loss or the teacher is not finite.

    Example::

        >>> loss = pseudo_label_loss(torch.randn(64, 10, requires_grad=True), torch.randn(64, 10), threshold=0.95)
    """
    if threshold is not None:
        threshold = check_float(threshold, "threshold", low=0.0, high=1.0, low_inclusive=False)
    check_finite = check_bool(check_finite, "check_finite")
    student = _check_logits(student_logits, "student_logits")
    teacher = _check_teacher(teacher_logits, student, allow_sparse=False)
    if weight is not None:
        weight = _check_positions(weight, "weight", student, kind="weight")
    zs, zt, _, w, n_den = _rows(student, teacher, None, weight, None)
    with torch.no_grad():
        t_max, labels = zt.max(dim=1)
        teacher_ok = torch.isfinite(zt).all() if check_finite else None  # None exactly when not check_finite
        keep = None
        if threshold is not None:
            # max softmax = exp(max - logsumexp), computed in at least float32
            zt32 = zt.to(torch.promote_types(zt.dtype, torch.float32))
            conf = torch.exp(t_max.to(zt32.dtype) - torch.logsumexp(zt32, dim=1))
            keep = conf >= threshold
    row = F.cross_entropy(zs, labels, reduction="none")
    scale = torch.ones_like(row) if w is None else w.to(row.dtype)
    if keep is not None:
        scale = scale * keep.to(row.dtype)
    loss = (row * scale).sum() / n_den
    if teacher_ok is not None:
        ok = torch.stack([torch.isfinite(loss), teacher_ok]).tolist()
        if not ok[1]:
            _raise_nonfinite("pseudo-label loss", {"teacher_logits": teacher})
        if not ok[0]:
            _raise_nonfinite("pseudo-label loss", {"student_logits": student})
    return loss


def _channel_dim(x: object, dim: int, name: str) -> int:
    """The non-negative channel dimension ``dim`` of features ``x`` (at least 2-D, not the batch dimension)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor; got {short_repr(x)}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be at least 2-D (B, D, ...); got shape {tuple(x.shape)}")
    d = dim if dim >= 0 else x.ndim + dim
    if not 1 <= d < x.ndim:
        raise ValueError(f"dim={dim} is not a channel dimension of {name} with shape {tuple(x.shape)}")
    return d


def feature_hint_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    regressor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    *,
    dim: int = 1,
    weight: Optional[torch.Tensor] = None,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""FitNets hint loss ``mean((r(f_s) - f_t) ** 2)``; see :class:`~torch_pretrain_update.FeatureHintLoss`.

    Args:
        student_features: (B, D_s, ...) features, channels at ``dim``.
        teacher_features: (B, D_t, ...) features (detached), the same positions as the student's.
        regressor: ``r``, applied to the student's features with the channels last (e.g. an ``nn.Linear(D_s,
            D_t)``); ``None`` compares the features directly (then ``D_s`` must equal ``D_t``).
        dim: the channel dimension (1 for (B, D) or (B, D, H, W); -1 for (B, L, D) tokens).
        weight: per-sample weights (B,): ``sum_b w_b * mse_b / B``.
        check_finite: raise ``ValueError`` naming the input when the loss is not finite.

    Example::

        >>> regressor = nn.Linear(64, 256)
        >>> loss = feature_hint_loss(torch.randn(8, 64, 7, 7), torch.randn(8, 256, 7, 7), regressor)
    """
    dim = check_int(dim, "dim")
    check_finite = check_bool(check_finite, "check_finite")
    if regressor is not None and not callable(regressor):
        raise TypeError(f"regressor must be callable (e.g. an nn.Linear) or None; got {short_repr(regressor)}")
    fs = student_features.movedim(_channel_dim(student_features, dim, "student_features"), -1)
    ft = teacher_features.detach().movedim(_channel_dim(teacher_features, dim, "teacher_features"), -1)
    if fs.shape[:-1] != ft.shape[:-1]:
        raise ValueError(
            f"student_features and teacher_features must agree outside the channel dimension (batch and "
            f"spatial/token positions); got {tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
            " (pool or interpolate one of them first)"
        )
    if fs.numel() == 0:  # the mean of nothing: say so instead of reporting a NaN loss
        raise ValueError(
            f"student_features must hold at least one feature vector; got shape {tuple(student_features.shape)}"
        )
    if ft.device != fs.device:
        raise ValueError(f"teacher_features must be on the student's device {fs.device}; got {ft.device}")
    out = fs if regressor is None else regressor(fs)
    if out.shape[-1] != ft.shape[-1]:
        raise ValueError(
            f"teacher_features has {ft.shape[-1]} channels at dim {dim} but the student's features "
            f"{'' if regressor is None else 'after the regressor '}have {out.shape[-1]}; pass a regressor that maps "
            "one to the other"
        )
    sq = (out - ft.to(out.dtype)).square()
    b = sq.shape[0]
    if weight is None:
        loss = sq.mean()
    else:
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (b,):
            raise ValueError(f"weight must be a tensor of shape ({b},); got {short_repr(weight)}")
        if weight.device != fs.device:
            raise ValueError(f"weight must be on the student's device {fs.device}; got {weight.device}")
        _validate_values(None, weight, 1)
        loss = (sq.reshape(b, -1).mean(dim=1) * weight.detach().to(sq.dtype)).sum() / b
    if check_finite and not math.isfinite(loss.item()):
        _raise_nonfinite("feature hint loss", {"student_features": fs, "teacher_features": ft})
    return loss
