"""Distillation losses on plain logits: knowledge distillation, decoupled KD, pseudo-labels, feature hints.

All losses are ``nn.Module`` s that take the student's and the teacher's outputs of one batch and return a scalar;
each forwards to a function of :mod:`torch_pretrain_update.training.functional` (:func:`~torch_pretrain_update.
kd_loss`, ``dkd_loss``, ``pseudo_label_loss``, ``feature_hint_loss``). Teacher outputs are always treated as
constants (detached). Conventions shared by every loss here:

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
distillation with large vocabularies (N = B*L positions, C = 32000 classes). The price: a single backward (several
with ``retain_graph=True``); a gradient of the gradient (``create_graph=True``) raises an error that points to
``fused=False``, the same loss from differentiable torch ops. The gradients are checked against finite differences
and the unfused form in the tests.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from torch_pretrain_update._checks import check_bool, check_float, check_int
from torch_pretrain_update.training._loss_checks import _check_temperature
from torch_pretrain_update.training.functional import (
    _channel_dim,
    dkd_loss,
    feature_hint_loss,
    kd_loss,
    pseudo_label_loss,
)
from torch_pretrain_update.training.sparse_teacher import SparseTeacher

__all__ = ["KDLoss", "DKDLoss", "PseudoLabelLoss", "FeatureHintLoss"]


class KDLoss(nn.Module):
    r"""Knowledge distillation (Hinton et al., 2015):
    ``(1 - alpha) * CE(z_s, y) + alpha * T**2 * KL(softmax(z_t / T) || softmax(z_s / T))``.

    ``alpha`` weighs the distillation (KL) term and ``1 - alpha`` the label cross-entropy. torchdistill's
    ``KDLoss`` is the other way round (its ``alpha`` weighs the cross-entropy and ``beta = 1 - alpha`` the KL
    term): its ``alpha=a`` is ``alpha=1 - a`` here.

    The KL divergence is summed over classes and averaged over samples (batchmean), computed in log space;
    the T² factor always applies. ``target=None`` is allowed only with ``alpha=1``. Teacher logits are
    detached. See the module docstring for the weight convention, the finiteness check and the fused kernel;
    :func:`~torch_pretrain_update.kd_loss` is the functional form.

    Args:
        temperature: T > 0 (default 4).
        alpha: weight of the soft-target term in [0, 1] (default 0.9); ``1 - alpha`` weighs the label CE.
        check_finite: raise ``ValueError`` naming the input when the loss is not finite (default True; costs
            one host synchronisation per call on a GPU, no extra pass over the logits).
        fused: ``True`` (default): the fused kernel, one backward only; ``False``: differentiable torch ops, for
            ``create_graph=True`` (more memory).
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

    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.9, *, check_finite: bool = True, fused: bool = True
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.alpha = check_float(alpha, "alpha", low=0.0, high=1.0)
        self.check_finite = check_bool(check_finite, "check_finite")
        self.fused = check_bool(fused, "fused")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}" + ("" if self.fused else ", fused=False")

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTeacher,
        target: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha, weight=weight,
            mask=mask, check_finite=self.check_finite, fused=self.fused,
        )


class DKDLoss(nn.Module):
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), as in its reference code (mdistiller):
    ``alpha * TCKD + beta * NCKD``, each multiplied by T² and averaged over samples (batchmean).

    * TCKD: the binary KL divergence between the teacher's and the student's target-class probabilities
      ``(p_t, 1 - p_t)`` at temperature T.
    * NCKD: the KL divergence between the teacher's and the student's distributions over the *non-target*
      classes (renormalised) at temperature T.

    KD = TCKD + (1 - p_t^teacher) * NCKD per sample. The label cross-entropy is *not* included (add your own, as
    the reference does). Numerically safe: the target class is removed with ``-inf`` in log space (not
    ``-1000`` on logits, which fails once logits / T exceed 1000), and ``log p_t``, ``log(1 - p_t)`` both come
    from one logit difference (``p_t = sigmoid(z_t / T - logsumexp`` of the other classes' ``z / T)``), so they
    keep float32 precision when ``p_t`` is tiny (many classes) and when the teacher is certain of the target
    class (``1 - p_t -> 0`` without NaN). The reference's warm-up factor ``min(epoch / warmup, 1)`` is a
    schedule: multiply the returned loss by it. :func:`~torch_pretrain_update.dkd_loss` is the functional form.

    Args:
        alpha: weight of TCKD (>= 0, default 1).
        beta: weight of NCKD (>= 0, default 8).
        temperature: T > 0 (default 4).
        check_finite: as in :class:`KDLoss`.
        fused: as in :class:`KDLoss`.

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
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        *,
        check_finite: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = check_float(alpha, "alpha", low=0.0)
        self.beta = check_float(beta, "beta", low=0.0)
        self.temperature = _check_temperature(temperature)
        self.check_finite = check_bool(check_finite, "check_finite")
        self.fused = check_bool(fused, "fused")

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}" + (
            "" if self.fused else ", fused=False"
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if target is None:
            raise ValueError("target is required by DKDLoss (TCKD and NCKD are defined by the target class)")
        return dkd_loss(
            student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta, temperature=self.temperature,
            weight=weight, check_finite=self.check_finite, fused=self.fused,
        )


class PseudoLabelLoss(nn.Module):
    r"""Distillation with hard pseudo-labels ``argmax(z_t)`` (DeiT's "hard" distillation; model distillation with
    teacher labels): ``sum_b w_b * m_b * CE(z_s[b], argmax z_t[b]) / B``.

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

    :func:`~torch_pretrain_update.pseudo_label_loss` is the functional form.

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
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return pseudo_label_loss(
            student_logits, teacher_logits, threshold=self.threshold, weight=weight, check_finite=self.check_finite
        )


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

    :func:`~torch_pretrain_update.feature_hint_loss` is the functional form (it takes the regressor).

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

    def forward(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        ds = _channel_dim(student_features, self.dim, "student_features")
        dt = _channel_dim(teacher_features, self.dim, "teacher_features")
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
        return feature_hint_loss(
            student_features, teacher_features, self.regressor, dim=self.dim, weight=weight,
            check_finite=self.check_finite,
        )
