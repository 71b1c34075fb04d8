"""Input checks shared by the distillation losses (:mod:`.functional`): shapes, dtypes, devices, label ranges and
weights up front with errors that name the argument, and the search for the input that made a loss non-finite."""

from __future__ import annotations

import math

import torch

from torch_pretrain_update._checks import check_float, first_bad_row, short_repr
from torch_pretrain_update.training.sparse_teacher import SparseTeacher

__all__: list[str] = []


def _check_temperature(temperature: float) -> float:
    return check_float(temperature, "temperature", low=0.0, low_inclusive=False)


def _check_logits(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype; got {short_repr(x)}")
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
            raise TypeError(f"{name} must hold integer class indices; got {short_repr(x)}")
        ok = tuple(x.shape) == pos
    elif kind == "mask":
        if x.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor; got {short_repr(x)}")
        ok = tuple(x.shape) == pos
    else:
        if not x.is_floating_point() and x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be a float tensor; got {short_repr(x)}")
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
