"""Distillation losses on plain logits: knowledge distillation, decoupled KD, pseudo-labels, feature hints.

All losses are ``nn.Module`` s that take the student's and the teacher's outputs of one batch and return a scalar.
Teacher outputs are always treated as constants (detached). Conventions shared by every loss here:

* **T² always applies.** Soft-target terms are multiplied by ``temperature ** 2`` (Hinton et al., 2015), so
  that their gradients keep the same scale when the temperature changes; there is no case (``alpha=0``, no
  labels, ...) where it is silently dropped.
* **batchmean.** KL divergences are summed over classes and averaged over samples (or over the selected token
  positions), never averaged over classes (``reduction="mean"`` of ``nn.KLDivLoss`` is C times too small).
* **Weights.** ``weight`` holds per-sample (or per-position) weights, e.g. the importance weights emitted by this
  library's samplers and streams. The reduction is ``sum_b w_b * loss_b / B`` -- divided by the number of
  samples B, *not* by ``sum_b w_b`` -- so that importance weights ``1 / (N * p_b)`` keep the loss an unbiased
  estimate of the full-data loss. Weights are constants (no gradient flows into them) and must be finite and
  ``>= 0``.
* **Validation.** Shapes, dtypes, devices, label ranges and hyper-parameters are checked up front with errors that
  name the argument. Finiteness is checked on the *result*: one ``isfinite`` on the scalar loss (a NaN or inf
  logit that the loss reads always makes the loss non-finite); only then are the inputs searched for the bad
  row, so the check costs no extra pass over the logits. On a GPU this is one host synchronisation per call;
  ``check_finite=False`` removes it (a non-finite input then gives a NaN loss instead of an error).

:class:`KDLoss` and :class:`DKDLoss` compute their value *and* their gradient in one pass over the logits, a
block of rows at a time (a fused ``autograd.Function``): temporaries are bounded by the block size, and only one
tensor of the logits' size (the gradient) is kept for backward, instead of the several (N, C) intermediates that
autograd would keep for ``log_softmax`` + ``kl_div`` + ``cross_entropy``. This matters for token-level
distillation with large vocabularies (N = B*L positions, C = 32000 classes). The price: these two losses are
differentiable once (no double backward); the gradients are checked against finite differences in the tests.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch_pretrain_update._checks import _short, check_bool, check_float, check_int, first_bad_row

__all__ = ["KDLoss", "DKDLoss", "PseudoLabelLoss", "FeatureHintLoss", "SparseTeacher"]

#: Elements per block of the fused KD/DKD kernels (4 Mi elements: 16 MiB per float32 temporary, a few of them
#: per block). Every op of a block is an OpenMP parallel region; when the CPU is shared with other processes a
#: region can wait for a descheduled thread, so many small blocks are fragile. Measured on 2 threads of a shared
#: machine (blocks of 2**13..2**24 elements at C = 1000, 4096, 32000): KD fwd+bwd at 4096 x 32000 under load
#: took 4.4x the unfused reference's time with 2**15-element blocks, 1.8x with 2**18 and 0.25x with 2**22; at
#: lower load 2**18..2**22 were all 0.3-0.8x of the reference. On an accelerator the whole batch is one block
#: up to 2**26 elements.
_CPU_BLOCK_ELEMENTS = 1 << 22
_CPU_MIN_BLOCK_ROWS = 1
_GPU_BLOCK_ELEMENTS = 1 << 26
#: Top-k log-probabilities whose total exceeds exp(_SPARSE_LSE_TOL) are not log-probabilities (float16 storage
#: rounds each value by at most ~5e-4 relative, far below this tolerance).
_SPARSE_LSE_TOL = 1e-2


# --------------------------------------------------------------------------------------------------------------
# sparse (top-k) teacher targets
# --------------------------------------------------------------------------------------------------------------


class SparseTeacher:
    r"""Top-k teacher targets: the k largest log-probabilities (at temperature 1) of each sample and their class
    indices, e.g. as cached by :func:`~torch_pretrain_update.write_teacher_outputs` with ``topk``.

    :class:`KDLoss` accepts it in place of dense teacher logits. **Approximation:** the probability mass that the
    top k classes leave, ``r = 1 - sum_i exp(log_probs_i)``, is spread uniformly over the other ``C - k`` classes
    *at temperature 1*, i.e. every missing class gets the log-probability ``log(r / (C - k))``; the completed
    distribution is then tempered exactly like dense logits (``softmax(log_p / T)``). With ``k = C`` nothing is
    missing and the loss equals the dense loss. With ``k < C`` the teacher's ranking among the tail classes is
    lost (their total mass is kept at T = 1; at T > 1 tempering a flat tail gives it somewhat more mass than the
    true, uneven tail would get). If rounding makes the top-k mass reach 1, the tail gets probability 0.

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
            raise TypeError(f"log_probs must be a floating-point torch.Tensor; got {_short(log_probs)}")
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool \
                or indices.is_complex():
            raise TypeError(f"indices must be an integer torch.Tensor; got {_short(indices)}")
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
            raise TypeError(f"logits must be a floating-point torch.Tensor; got {_short(logits)}")
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
        """The completed (..., C) log-probabilities at temperature 1 that :class:`KDLoss` uses (see the class
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


# --------------------------------------------------------------------------------------------------------------
# shared validation
# --------------------------------------------------------------------------------------------------------------


def _check_hparams_T(temperature: float) -> float:
    return check_float(temperature, "temperature", low=0.0, low_inclusive=False)


def _check_logits(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype; got {_short(x)}")
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be (B, C) or (B, L, C) for token-level distillation; got shape {tuple(x.shape)}"
        )
    if x.shape[-1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (last dimension); got shape {tuple(x.shape)}")
    return x


def _check_teacher(teacher: object, student: torch.Tensor, *, allow_sparse: bool) -> torch.Tensor | SparseTeacher:
    if isinstance(teacher, SparseTeacher):
        if not allow_sparse:
            raise TypeError("teacher_logits must be a dense torch.Tensor here; SparseTeacher is accepted by KDLoss")
        if teacher.shape != student.shape[:-1]:
            raise ValueError(
                f"teacher_logits (SparseTeacher) must cover the student's positions {tuple(student.shape[:-1])}; "
                f"got {tuple(teacher.shape)}"
            )
        if teacher.k > student.shape[-1]:
            raise ValueError(
                f"teacher_logits (SparseTeacher) has k={teacher.k} > number of classes {student.shape[-1]}"
            )
        if teacher.device != student.device:
            raise ValueError(
                f"teacher_logits must be on the student's device {student.device}; got {teacher.device}"
            )
        return teacher
    teacher = _check_logits(teacher, "teacher_logits")
    if teacher.shape != student.shape:
        what = "number of classes" if teacher.shape[:-1] == student.shape[:-1] else "batch shape"
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student.shape)}; got "
            f"{tuple(teacher.shape)} (different {what})"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits must be on the student's device {student.device}; got {teacher.device}")
    return teacher.detach()


def _check_positions(x: object, name: str, student: torch.Tensor, *, kind: str) -> torch.Tensor:
    """target (int), mask (bool) or weight (float) over the student's positions (B,) or (B, L)."""
    pos = tuple(student.shape[:-1])
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {pos}; got {type(x).__name__}")
    if kind == "target":
        if x.is_floating_point() or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must hold integer class indices; got {_short(x)}")
        ok = tuple(x.shape) == pos
    elif kind == "mask":
        if x.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor; got {_short(x)}")
        ok = tuple(x.shape) == pos
    else:
        if not x.is_floating_point() and x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be a float tensor; got {_short(x)}")
        ok = tuple(x.shape) == pos or (len(pos) == 2 and tuple(x.shape) == pos[:1])
    if not ok:
        allowed = f"{pos}" + (f" or {pos[:1]}" if kind == "weight" and len(pos) == 2 else "")
        raise ValueError(f"{name} must have shape {allowed} (the student's positions); got {tuple(x.shape)}")
    if x.device != student.device:
        raise ValueError(f"{name} must be on the student's device {student.device}; got {x.device}")
    return x


def _validate_values(target: torch.Tensor | None, weight: torch.Tensor | None, num_classes: int) -> None:
    """Label range and weight validity with a single host synchronisation (both ranges fetched at once)."""
    parts = []
    if target is not None and target.numel():
        parts.append(torch.stack(torch.aminmax(target)).double())
    if weight is not None and weight.numel():
        parts.append(torch.stack(torch.aminmax(weight)).double())
    if not parts:
        return
    values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
    if target is not None and target.numel():
        lo, hi = values[:2]
        values = values[2:]
        if lo < 0 or hi >= num_classes:
            flat = target.reshape(-1)
            i = first_bad_row((flat < 0) | (flat >= num_classes))
            raise ValueError(f"target must be class indices in [0, {num_classes}); got {int(flat[i])} at position {i}")
    if weight is not None and weight.numel():
        lo, hi = values
        flat = weight.reshape(-1)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates through aminmax
            i = first_bad_row(~torch.isfinite(flat))
            raise ValueError(f"weight must be finite; got {float(flat[i])} at position {i}")
        if lo < 0:
            i = first_bad_row(flat < 0)
            raise ValueError(f"weight must be >= 0; got {float(flat[i])} at position {i}")


def _raise_nonfinite(
    loss_name: str,
    tensors: dict[str, torch.Tensor | SparseTeacher | None],
    mask: torch.Tensor | None = None,
) -> None:
    """Called once a loss came out non-finite: find the input responsible (among the positions the loss read,
    i.e. inside ``mask``) and name it with the position in the caller's layout."""
    for name, t in tensors.items():
        if t is None:
            continue
        if isinstance(t, SparseTeacher):
            t = t.log_probs
            name = f"{name} (SparseTeacher.log_probs)"
        t = t.detach()
        pos_shape = t.shape[:-1] if t.ndim > 1 else t.shape
        rows = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(-1, 1)
        bad = ~torch.isfinite(rows).all(dim=1)
        if mask is not None:
            bad &= mask.reshape(-1)
        if bool(bad.any()):
            i = first_bad_row(bad)
            row = rows[i]
            j = first_bad_row(~torch.isfinite(row))
            where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), pos_shape)) if len(pos_shape) > 1 \
                else i
            raise ValueError(
                f"{name} must be finite; position {where} has {float(row[j])} at index {j} (a NaN or infinite "
                f"value makes the {loss_name} undefined)"
            )
    raise ValueError(
        f"{loss_name} is not finite although its inputs are finite: values too large for their dtype? "
        "(compute in float32 or rescale)"
    )


# --------------------------------------------------------------------------------------------------------------
# fused row-block loss: value and gradient in one pass
# --------------------------------------------------------------------------------------------------------------

# kernel(start, stop, need_grad) -> (row_loss (R,), g (R, C) or None, factor), in the compute dtype; g * factor
# is the gradient of row_loss[r] with respect to student row r (the factor is applied with the row weights, in
# the pass that stores the gradient).
_Kernel = Callable[[int, int, bool], "tuple[torch.Tensor, Optional[torch.Tensor], float]"]


def _block_rows(x: torch.Tensor) -> int:
    c = x.shape[-1]
    if x.device.type == "cpu":
        return max(_CPU_MIN_BLOCK_ROWS, _CPU_BLOCK_ELEMENTS // c)
    return max(1, _GPU_BLOCK_ELEMENTS // c)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _FusedRowLoss(torch.autograd.Function):
    """loss = sum_r scale_r * row_loss_r; the gradient is computed in forward, block by block, and kept."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, kernel: _Kernel, scale: torch.Tensor | float, need_grad: bool):
        n = student.shape[0]
        rows = _block_rows(student)
        per_row = isinstance(scale, torch.Tensor)
        if n <= rows:  # one block: no buffers, no copies
            row_loss, g, factor = kernel(0, n, need_grad)
            grad = None
            if g is not None:
                grad = g.mul_(scale[:, None] * factor if per_row else scale * factor).to(student.dtype)
        else:
            grad = torch.empty_like(student) if need_grad else None
            row_loss = torch.empty(n, dtype=_compute_dtype(student), device=student.device)
            for s in range(0, n, rows):
                e = min(n, s + rows)
                loss_blk, g, factor = kernel(s, e, need_grad)
                row_loss[s:e] = loss_blk
                if grad is not None:  # scale and store in one pass
                    torch.mul(g, scale[s:e, None] * factor if per_row else scale * factor, out=grad[s:e])
        loss = (row_loss * scale).sum() if per_row else row_loss.sum() * scale
        ctx.save_for_backward(grad)
        return loss.to(student.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:  # pragma: no cover - forward ran without requires_grad; autograd does not call backward
            return None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None


def _prepare(
    student: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | None,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
):
    """Flatten positions to rows and apply the mask: returns (zs (N, C), teacher rows, y (N,), w (N,), n_den)."""
    c = student.shape[-1]
    pos_shape = student.shape[:-1]
    zs = student.reshape(-1, c)
    if isinstance(teacher, SparseTeacher):
        zt: torch.Tensor | SparseTeacher | None = SparseTeacher(
            teacher.log_probs.reshape(-1, teacher.k), teacher.indices.reshape(-1, teacher.k)
        )
    elif teacher is not None:
        zt = teacher.reshape(-1, c)
    else:
        zt = None
    y = target.reshape(-1).long() if target is not None else None
    w = None
    if weight is not None:
        w = weight.detach()
        if w.shape != pos_shape:  # (B,) weights for (B, L) positions
            w = w[:, None].expand(pos_shape)
        w = w.reshape(-1)
    if mask is not None:
        sel = mask.reshape(-1)
        zs = zs[sel]
        if isinstance(zt, SparseTeacher):
            zt = SparseTeacher(zt.log_probs[sel], zt.indices[sel])
        elif zt is not None:
            zt = zt[sel]
        y = y[sel] if y is not None else None
        w = w[sel] if w is not None else None
    n_den = max(zs.shape[0], 1)
    return zs, zt, y, w, n_den


def _scale(w: torch.Tensor | None, n_den: int, dtype: torch.dtype) -> torch.Tensor | float:
    if w is None:
        return 1.0 / n_den
    return w.to(dtype) / n_den


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


# --------------------------------------------------------------------------------------------------------------
# KD
# --------------------------------------------------------------------------------------------------------------


class KDLoss(nn.Module):
    r"""Knowledge distillation (Hinton et al., 2015):
    ``(1 - alpha) * CE(z_s, y) + alpha * T**2 * KL(softmax(z_t / T) || softmax(z_s / T))``.

    The KL divergence is summed over classes and averaged over samples (batchmean), computed in log space;
    the T² factor always applies. ``target=None`` is allowed only with ``alpha=1``. Teacher logits are
    detached. See the module docstring for the weight convention, the finiteness check and the fused kernel.

    Args:
        temperature: T > 0 (default 4).
        alpha: weight of the soft-target term in [0, 1] (default 0.9); ``1 - alpha`` weighs the label CE.
        check_finite: raise ``ValueError`` naming the input when the loss is not finite (default True; costs
            one host synchronisation per call on a GPU, no extra pass over the logits).

    Shapes (``forward(student_logits, teacher_logits, target=None, weight=None, mask=None)``):
        * ``student_logits``: (B, C), or (B, L, C) for token-level distillation.
        * ``teacher_logits``: same shape as ``student_logits`` (any float dtype, e.g. float16 from a cache),
          or a :class:`SparseTeacher` of top-k log-probabilities with leading shape (B,) or (B, L).
        * ``target``: integer labels (B,) or (B, L). Positions outside ``mask`` are never read (padding labels
          such as -100 are fine there).
        * ``weight``: (B,) per-sample or (B, L) per-position weights; the loss is
          ``sum_p w_p * loss_p / P`` over the P counted positions.
        * ``mask``: bool (B,) or (B, L); only True positions count and the loss is averaged over them
          (0 when none is selected). Logits at masked-out positions are never read.

    Example::

        >>> criterion = KDLoss(temperature=4.0, alpha=0.9)
        >>> student = torch.randn(32, 10, requires_grad=True)
        >>> with torch.no_grad():
        ...     teacher = torch.randn(32, 10)  # teacher_model(x)
        >>> loss = criterion(student, teacher, torch.randint(0, 10, (32,)))
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, *, check_finite: bool = True) -> None:
        super().__init__()
        self.temperature = _check_hparams_T(temperature)
        self.alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
        self.check_finite = check_bool(check_finite, "check_finite")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTeacher,
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        student = _check_logits(student_logits, "student_logits")
        teacher = _check_teacher(teacher_logits, student, allow_sparse=True)
        alpha, temp = self.alpha, self.temperature
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
        c = student.shape[-1]
        zs, zt, y, w, n_den = _prepare(student, teacher, target, weight, mask)
        _validate_values(y, w, c)
        sparse = isinstance(zt, SparseTeacher)
        cdt = _compute_dtype(student)
        use_kl = alpha > 0.0
        use_ce = alpha < 1.0

        def kernel(s: int, e: int, need_grad: bool):
            zc = zs[s:e].to(cdt)
            row = None
            g = None
            if use_kl:
                if sparse:
                    lp = zt.log_probs[s:e].to(cdt)
                    idx = zt.indices[s:e]
                    _check_sparse_block(lp, idx, c, s)
                    tc = _complete_sparse(lp, idx, c)
                else:
                    tc = zt[s:e].to(cdt)
                ls = torch.log_softmax(zc / temp, dim=1)
                lq = torch.log_softmax(tc.div_(temp) if sparse else tc / temp, dim=1)
                q = torch.exp(lq)
                diff = lq.sub_(ls)
                if sparse:  # a tail of probability 0: 0 * (-inf) terms are 0
                    diff.masked_fill_(q == 0, 0.0)
                kl = diff.mul_(q).sum(dim=1)  # (a batched dot via bmm is ~10x slower on CPU)
                row = kl.mul_(alpha * temp * temp)
                if need_grad:  # d(alpha T^2 KL)/dz_s = alpha T (softmax(z_s/T) - q)
                    g = ls.exp_().sub_(q)
            if use_ce:
                l1 = torch.log_softmax(zc, dim=1)
                yc = y[s:e].unsqueeze(1)
                ce = l1.gather(1, yc).reshape(-1).neg_().mul_(1.0 - alpha)
                row = ce if row is None else row.add_(ce)
                if need_grad:  # d((1 - alpha) CE)/dz_s = (1 - alpha) (softmax(z_s) - onehot(y))
                    p = l1.exp_()
                    p.scatter_add_(1, yc, torch.full(yc.shape, -1.0, dtype=cdt, device=p.device))
                    if g is None:
                        return row, p, 1.0 - alpha
                    g.add_(p, alpha=(1.0 - alpha) / (alpha * temp))
            return row, g, alpha * temp

        need_grad = torch.is_grad_enabled() and student.requires_grad
        loss = _FusedRowLoss.apply(zs, kernel, _scale(w, n_den, cdt), need_grad)
        if self.check_finite and not math.isfinite(loss.item()):
            _raise_nonfinite(
                "KD loss", {"student_logits": student, "teacher_logits": teacher if use_kl else None}, mask
            )
        return loss


# --------------------------------------------------------------------------------------------------------------
# DKD
# --------------------------------------------------------------------------------------------------------------


class DKDLoss(nn.Module):
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), as in its reference code (mdistiller):
    ``alpha * TCKD + beta * NCKD``, each multiplied by T² and averaged over samples (batchmean).

    * TCKD: the binary KL divergence between the teacher's and the student's target-class probabilities
      ``(p_t, 1 - p_t)`` at temperature T.
    * NCKD: the KL divergence between the teacher's and the student's distributions over the *non-target*
      classes (renormalised) at temperature T.

    KD = TCKD + (1 - p_t^teacher) * NCKD per sample. The label cross-entropy is *not* included (add your own, as
    the reference does). Numerically safe: the target class is removed with ``-inf`` in log space (not
    ``-1000`` on logits, which fails once logits / T exceed 1000), and both terms are computed from logsumexps,
    so a teacher that is certain of the target class gives ``1 - p_t = 0`` without NaN. The reference's warm-up
    factor ``min(epoch / warmup, 1)`` is a schedule: multiply the returned loss by it.

    Args:
        alpha: weight of TCKD (>= 0, default 1).
        beta: weight of NCKD (>= 0, default 8).
        temperature: T > 0 (default 4).
        check_finite: as in :class:`KDLoss`.

    ``forward(student_logits, teacher_logits, target, weight=None)``: logits (B, C) or (B, L, C), dense teacher
    of the same shape, integer target (B,) or (B, L), optional weight (B,) or (B, L) with the ``sum w * loss / B``
    convention.

    Example::

        >>> dkd = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
        >>> student = torch.randn(16, 100, requires_grad=True)
        >>> target = torch.randint(0, 100, (16,))
        >>> loss = F.cross_entropy(student, target) + dkd(student, torch.randn(16, 100), target)
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, *, check_finite: bool = True
    ) -> None:
        super().__init__()
        self.alpha = check_float(alpha, "alpha", low=0.0)
        self.beta = check_float(beta, "beta", low=0.0)
        self.temperature = _check_hparams_T(temperature)
        self.check_finite = check_bool(check_finite, "check_finite")

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        student = _check_logits(student_logits, "student_logits")
        teacher = _check_teacher(teacher_logits, student, allow_sparse=False)
        if target is None:
            raise ValueError("target is required by DKDLoss (TCKD and NCKD are defined by the target class)")
        target = _check_positions(target, "target", student, kind="target")
        if weight is not None:
            weight = _check_positions(weight, "weight", student, kind="weight")
        c = student.shape[-1]
        zs, zt, y, w, n_den = _prepare(student, teacher, target, weight, None)
        _validate_values(y, w, c)
        cdt = _compute_dtype(student)
        alpha, beta, temp = self.alpha, self.beta, self.temperature

        def parts(z: torch.Tensor, yc: torch.Tensor):
            """log p_t, log(1 - p_t), and the log-probs over the non-target classes (-inf at the target)."""
            a = z / temp
            lse_all = torch.logsumexp(a, dim=1, keepdim=True)
            a_t = a.gather(1, yc)
            a.scatter_(1, yc, float("-inf"))
            lse_other = torch.logsumexp(a, dim=1, keepdim=True)
            return a_t - lse_all, lse_other - lse_all, a.sub_(lse_other)

        def kernel(s: int, e: int, need_grad: bool):
            yc = y[s:e].unsqueeze(1)
            ls_t, ls_o, ls_hat = parts(zs[s:e].to(cdt), yc)
            lq_t, lq_o, lq_hat = parts(zt[s:e].to(cdt), yc)
            q_t, q_o = lq_t.exp(), lq_o.exp()
            tckd = q_t * (lq_t - ls_t) + q_o * (lq_o - ls_o)
            q_hat = lq_hat.exp()
            diff = lq_hat.sub_(ls_hat)
            diff.scatter_(1, yc, 0.0)  # the target column is -inf - (-inf); its weight q_hat is 0
            nckd = diff.mul_(q_hat).sum(dim=1, keepdim=True)
            row = (alpha * tckd + beta * nckd).mul_(temp * temp).reshape(-1)
            g = None
            if need_grad:
                # d/da_j (a = z_s / T): TCKD -> s_t - q_t at j = t, s_hat_j (q_t - s_t) elsewhere;
                # NCKD -> s_hat_j - q_hat_j off the target, 0 at it. Times T^2 / T for z_s.
                s_t = ls_t.exp()
                s_hat = ls_hat.exp_()
                g = s_hat.mul_(alpha * (q_t - s_t) + beta).sub_(q_hat, alpha=beta)
                g.scatter_(1, yc, alpha * (s_t - q_t))
            return row, g, temp

        need_grad = torch.is_grad_enabled() and student.requires_grad
        loss = _FusedRowLoss.apply(zs, kernel, _scale(w, n_den, cdt), need_grad)
        if self.check_finite and not math.isfinite(loss.item()):
            _raise_nonfinite("DKD loss", {"student_logits": student, "teacher_logits": teacher})
        return loss


# --------------------------------------------------------------------------------------------------------------
# pseudo-labels and feature hints
# --------------------------------------------------------------------------------------------------------------


class PseudoLabelLoss(nn.Module):
    r"""Distillation with hard pseudo-labels ``argmax(z_t)`` (DeiT's "hard" distillation; the seed's "model
    distillation" with teacher labels): ``sum_b w_b * m_b * CE(z_s[b], argmax z_t[b]) / B``.

    With ``threshold=tau``, ``m_b = 1`` only for samples whose teacher confidence ``max softmax(z_t[b])`` is
    ``>= tau`` (0 otherwise); the sum is still divided by B, the number of samples in the batch (FixMatch's
    convention, so that the loss shrinks when few pseudo-labels are trusted). Without a threshold every sample
    counts.

    Args:
        threshold: confidence threshold tau in (0, 1], or None (default) for no threshold.
        check_finite: as in :class:`KDLoss`; the teacher is checked too (a NaN teacher row would otherwise
            silently give label 0 or be dropped by the threshold).

    ``forward(student_logits, teacher_logits, weight=None)``: logits (B, C) or (B, L, C) (positions are
    samples), weight (B,) or (B, L).

    Example::

        >>> loss = PseudoLabelLoss(threshold=0.95)(torch.randn(64, 10, requires_grad=True), torch.randn(64, 10))
    """

    def __init__(self, threshold: float | None = None, *, check_finite: bool = True) -> None:
        super().__init__()
        if threshold is not None:
            threshold = check_float(threshold, "threshold", low=0.0, high=1.0, low_inclusive=False)
        self.threshold = threshold
        self.check_finite = check_bool(check_finite, "check_finite")

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        student = _check_logits(student_logits, "student_logits")
        teacher = _check_teacher(teacher_logits, student, allow_sparse=False)
        if weight is not None:
            weight = _check_positions(weight, "weight", student, kind="weight")
        c = student.shape[-1]
        zs, zt, _, w, n_den = _prepare(student, teacher, None, weight, None)
        _validate_values(None, w, c)
        with torch.no_grad():
            t_max, labels = zt.max(dim=1)
            teacher_ok = torch.isfinite(zt).all() if self.check_finite else None
            keep = None
            if self.threshold is not None:
                # max softmax = exp(max - logsumexp), computed in at least float32
                zt32 = zt.to(torch.promote_types(zt.dtype, torch.float32))
                conf = torch.exp(t_max.to(zt32.dtype) - torch.logsumexp(zt32, dim=1))
                keep = conf >= self.threshold
        row = F.cross_entropy(zs, labels, reduction="none")
        scale = torch.ones_like(row) if w is None else w.to(row.dtype)
        if keep is not None:
            scale = scale * keep.to(row.dtype)
        loss = (row * scale).sum() / n_den
        if self.check_finite:
            ok = torch.stack([torch.isfinite(loss), teacher_ok]).tolist()
            if not ok[1]:
                _raise_nonfinite("pseudo-label loss", {"teacher_logits": teacher})
            if not ok[0]:
                _raise_nonfinite("pseudo-label loss", {"student_logits": student})
        return loss


class FeatureHintLoss(nn.Module):
    r"""FitNets hint loss (Romero et al., 2015): ``mean((r(f_s) - f_t) ** 2)`` with a learnable linear regressor
    ``r`` from the student's feature width to the teacher's (a 1x1 convolution on feature maps).

    The regressor's parameters are this module's parameters: add them to the optimizer, e.g.
    ``optim.SGD([*student.parameters(), *hint.parameters()], lr=...)``. The teacher features are detached.
    The loss is the mean squared error over all elements (batch, channels, spatial positions or tokens); with
    ``weight`` (B,) it is ``sum_b w_b * mse_b / B`` with ``mse_b`` the mean over sample b's elements.

    Args:
        student_dim: channels of the student's features.
        teacher_dim: channels of the teacher's features.
        dim: the channel dimension of the features (default 1: (B, D) vectors or (B, D, H, W) maps; use -1 for
            (B, L, D) token features).
        bias: whether the regressor has a bias (default True).
        check_finite: as in :class:`KDLoss`.

    Example::

        >>> hint = FeatureHintLoss(student_dim=64, teacher_dim=256)
        >>> loss = hint(torch.randn(8, 64, 7, 7, requires_grad=True), torch.randn(8, 256, 7, 7))
        >>> optimizer = torch.optim.SGD(hint.parameters(), lr=0.1)
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, *, dim: int = 1, bias: bool = True, check_finite: bool = True
    ) -> None:
        super().__init__()
        self.student_dim = check_int(student_dim, "student_dim", min_value=1)
        self.teacher_dim = check_int(teacher_dim, "teacher_dim", min_value=1)
        self.dim = check_int(dim, "dim")
        self.check_finite = check_bool(check_finite, "check_finite")
        self.regressor = nn.Linear(self.student_dim, self.teacher_dim, bias=check_bool(bias, "bias"))

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, dim={self.dim}"

    def _channel_dim(self, x: torch.Tensor, name: str) -> int:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor; got {_short(x)}")
        if x.ndim < 2:
            raise ValueError(f"{name} must be at least 2-D (B, D, ...); got shape {tuple(x.shape)}")
        d = self.dim if self.dim >= 0 else x.ndim + self.dim
        if not 1 <= d < x.ndim:
            raise ValueError(f"dim={self.dim} is not a channel dimension of {name} with shape {tuple(x.shape)}")
        return d

    def forward(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ds = self._channel_dim(student_features, "student_features")
        dt = self._channel_dim(teacher_features, "teacher_features")
        if student_features.shape[ds] != self.student_dim:
            raise ValueError(
                f"student_features must have student_dim={self.student_dim} channels at dim {self.dim}; got shape "
                f"{tuple(student_features.shape)}"
            )
        if teacher_features.shape[dt] != self.teacher_dim:
            raise ValueError(
                f"teacher_features must have teacher_dim={self.teacher_dim} channels at dim {self.dim}; got shape "
                f"{tuple(teacher_features.shape)}"
            )
        fs = student_features.movedim(ds, -1)
        ft = teacher_features.detach().movedim(dt, -1)
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
        diff = self.regressor(fs) - ft.to(fs.dtype)
        sq = diff.square()
        b = sq.shape[0]
        if weight is None:
            loss = sq.mean()
        else:
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (b,):
                raise ValueError(f"weight must be a tensor of shape ({b},); got {_short(weight)}")
            if weight.device != fs.device:
                raise ValueError(f"weight must be on the student's device {fs.device}; got {weight.device}")
            _validate_values(None, weight, 1)
            loss = (sq.reshape(b, -1).mean(dim=1) * weight.detach().to(sq.dtype)).sum() / b
        if self.check_finite and not math.isfinite(loss.item()):
            _raise_nonfinite("feature hint loss", {"student_features": fs, "teacher_features": ft})
        return loss
