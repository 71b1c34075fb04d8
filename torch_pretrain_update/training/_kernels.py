"""The fused KD/DKD kernels: value and gradient in one pass over the logits, a block of rows at a time.

:func:`~torch_pretrain_update.kd_loss` and :func:`~torch_pretrain_update.dkd_loss` (``fused=True``, the default)
run through :class:`_FusedRowLoss`: temporaries are bounded by the block size, and only one tensor of the logits'
size (the gradient) is kept for backward, instead of the several (N, C) intermediates that autograd would keep for
``log_softmax`` + ``kl_div`` + ``cross_entropy``. The price is a single backward: the gradient is a constant of
the graph, so a gradient of the gradient (``create_graph=True``) is refused with an error that says what to use.
"""

from __future__ import annotations

from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F

from torch_pretrain_update.training.sparse_teacher import SparseTeacher, _check_sparse_block, _complete_sparse

__all__: list[str] = []

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
    def forward(
        ctx, student: torch.Tensor, kernel: _Kernel, scale: torch.Tensor | float, need_grad: bool, loss_name: str
    ):
        ctx.loss_name = loss_name
        n = student.shape[0]
        rows = _block_rows(student)
        if n <= rows:  # one block: no buffers, no copies
            row_loss, g, factor = kernel(0, n, need_grad)
            grad = None
            if g is not None:
                grad = g.mul_(scale[:, None] * factor if isinstance(scale, torch.Tensor) else scale * factor).to(
                    student.dtype
                )
        else:
            grad = torch.empty_like(student) if need_grad else None
            row_loss = torch.empty(n, dtype=_compute_dtype(student), device=student.device)
            for s in range(0, n, rows):
                e = min(n, s + rows)
                loss_blk, g, factor = kernel(s, e, need_grad)
                row_loss[s:e] = loss_blk
                if grad is not None:  # scale and store in one pass
                    # grad is allocated only when need_grad, and a kernel asked for need_grad returns its g
                    torch.mul(
                        cast(torch.Tensor, g),
                        scale[s:e, None] * factor if isinstance(scale, torch.Tensor) else scale * factor,
                        out=grad[s:e],
                    )
        loss = (row_loss * scale).sum() if isinstance(scale, torch.Tensor) else row_loss.sum() * scale
        ctx.save_for_backward(grad)
        return loss.to(student.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(..., create_graph=True)
            raise RuntimeError(
                f"{ctx.loss_name} computes its gradient in the forward pass (a fused kernel) and supports a single "
                "backward: a gradient of that gradient (create_graph=True, double backward, e.g. a gradient "
                "penalty or higher-order meta-learning) is not available from it. Pass fused=False (to "
                "KDLoss/DKDLoss or kd_loss/dkd_loss) for the unfused form built from differentiable torch ops "
                "(more memory). retain_graph=True, i.e. several backward passes through the same graph, works."
            )
        (grad,) = ctx.saved_tensors
        if grad is None:  # pragma: no cover - forward ran without requires_grad; autograd does not call backward
            return None, None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _prepare(
    student: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
):
    """Flatten positions to rows and apply the mask: returns (zs (N, C), teacher rows, y (N,), w (N,), n_den)."""
    c = student.shape[-1]
    pos_shape = student.shape[:-1]
    zs = student.reshape(-1, c)
    if isinstance(teacher, SparseTeacher):
        zt: torch.Tensor | SparseTeacher = SparseTeacher(
            teacher.log_probs.reshape(-1, teacher.k), teacher.indices.reshape(-1, teacher.k)
        )
    else:
        zt = teacher.reshape(-1, c)
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
        else:
            zt = zt[sel]
        y = y[sel] if y is not None else None
        w = w[sel] if w is not None else None
    n_den = max(zs.shape[0], 1)
    return zs, zt, y, w, n_den


def _scale(w: torch.Tensor | None, n_den: int, dtype: torch.dtype) -> torch.Tensor | float:
    if w is None:
        return 1.0 / n_den
    return w.to(dtype) / n_den


# --------------------------------------------------------------------------------------------------------------
# KD and DKD rows
# --------------------------------------------------------------------------------------------------------------


def _kd_kernel(zs: torch.Tensor, zt: torch.Tensor | SparseTeacher, y: torch.Tensor | None,
               alpha: float, temp: float, cdt: torch.dtype) -> _Kernel:
    """KD rows ``(1 - alpha) CE + alpha T^2 KL(q || s)`` and their gradient for rows [start, stop)."""
    c = zs.shape[-1]
    sparse = isinstance(zt, SparseTeacher)
    use_kl, use_ce = alpha > 0.0, alpha < 1.0

    def kernel(s: int, e: int, need_grad: bool):
        zc = zs[s:e].to(cdt)
        row = None
        g = None
        if use_kl:
            if isinstance(zt, SparseTeacher):
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
            if y is None:  # kd_loss refuses a missing target unless alpha == 1
                raise ValueError(f"target is required when alpha < 1; got target=None with alpha={alpha:g}")
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

    return kernel


def _dkd_parts(a: torch.Tensor, yc: torch.Tensor, inplace: bool):
    """For tempered logits ``a`` (R, C) and targets ``yc`` (R, 1): log p_t, log(1 - p_t) (R, 1), and the
    log-probabilities over the non-target classes (R, C), -inf at the target. ``inplace`` reuses ``a``."""
    a_t = a.gather(1, yc)
    others = a.scatter_(1, yc, float("-inf")) if inplace else a.scatter(1, yc, float("-inf"))
    lse_other = torch.logsumexp(others, dim=1, keepdim=True)
    # p_t = sigmoid(a_t - lse_other): both binary log-probabilities from one logit difference stay accurate when
    # p_t is tiny (many classes) and when it is close to 1; a difference of two logsumexps (log(1 - p_t) =
    # lse_other - lse_all) loses ~3 digits of float32 at C = 1000.
    d = a_t - lse_other
    hat = others.sub_(lse_other) if inplace else others - lse_other
    return F.logsigmoid(d), F.logsigmoid(-d), hat


def _dkd_kernel(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, temp: float,
                cdt: torch.dtype) -> _Kernel:
    """DKD rows ``T^2 (alpha TCKD + beta NCKD)`` and their gradient for rows [start, stop)."""

    def kernel(s: int, e: int, need_grad: bool):
        yc = y[s:e].unsqueeze(1)
        ls_t, ls_o, ls_hat = _dkd_parts(zs[s:e].to(cdt) / temp, yc, inplace=True)
        lq_t, lq_o, lq_hat = _dkd_parts(zt[s:e].to(cdt) / temp, yc, inplace=True)
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

    return kernel
