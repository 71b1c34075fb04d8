"""Distillation losses against independent float64 numpy references written from the formulas, gradcheck,
Hinton's high-temperature limit, sparse (top-k) teachers, and the error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_pretrain_update import DKDLoss, FeatureHintLoss, KDLoss, PseudoLabelLoss, SparseTeacher

# ---------------------------------------------------------------------------------------------------------------
# numpy float64 references (row-wise formulas, no torch)
# ---------------------------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def np_kd_rows(zs, zt_logp_or_logits, y, T, alpha):
    """Per-row (1 - a) CE + a T^2 KL(softmax(zt/T) || softmax(zs/T)); zt may be log-probs (same after tempering)."""
    rows = []
    for i in range(zs.shape[0]):
        ls = np_log_softmax(zs[i] / T)
        lq = np_log_softmax(zt_logp_or_logits[i] / T)
        q = np.exp(lq)
        kl = float(np.sum(np.where(q > 0, q * (lq - np.where(q > 0, ls, 0)), 0.0)))
        ce = -np_log_softmax(zs[i])[y[i]] if y is not None else 0.0
        rows.append((1 - alpha) * ce + alpha * T * T * kl)
    return np.array(rows)


def np_kd_grad_rows(zs, zt, y, T, alpha):
    s = np.exp(np_log_softmax(zs / T))
    q = np.exp(np_log_softmax(zt / T))
    g = alpha * T * (s - q)
    if alpha < 1:
        p = np.exp(np_log_softmax(zs))
        p[np.arange(len(y)), y] -= 1.0
        g = g + (1 - alpha) * p
    return g


def np_dkd_rows(zs, zt, y, T, alpha, beta):
    """TCKD / NCKD of Zhao et al. from their definitions: binary (p_t, 1 - p_t) KL and the KL over the
    renormalised non-target classes (the target column is deleted, not masked)."""
    tck, nck = [], []
    for i in range(zs.shape[0]):
        ls = np_log_softmax(zs[i] / T)
        lq = np_log_softmax(zt[i] / T)
        t = y[i]
        qt = np.exp(lq[t])
        others = np.delete(np.arange(zs.shape[1]), t)
        ls_o = np_log_softmax(zs[i, others] / T)
        lq_o = np_log_softmax(zt[i, others] / T)
        # log(1 - p_t) as logsumexp over the other classes minus the full logsumexp (exact for p_t -> 1)
        log1ms = np_logsumexp(zs[i, others] / T) - np_logsumexp(zs[i] / T)
        log1mq = np_logsumexp(zt[i, others] / T) - np_logsumexp(zt[i] / T)
        tckd = qt * (lq[t] - ls[t]) + np.exp(log1mq) * (log1mq - log1ms)
        nckd = float(np.sum(np.exp(lq_o) * (lq_o - ls_o)))
        tck.append(tckd)
        nck.append(nckd)
    tck, nck = np.array(tck), np.array(nck)
    return T * T * (alpha * tck + beta * nck), tck, nck


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def make(B=16, C=10, scale=3.0, seed=0, L=None):
    g = np.random.default_rng(seed)
    shape = (B, C) if L is None else (B, L, C)
    zs = g.normal(size=shape) * scale
    zt = g.normal(size=shape) * scale
    y = g.integers(0, C, size=shape[:-1])
    return zs, zt, y


# ---------------------------------------------------------------------------------------------------------------
# KD
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_kd_matches_reference_value_and_gradient(T, alpha):
    zs, zt, y = make(B=24, C=13, seed=int(T * 10 + alpha * 100))
    ref = np_kd_rows(zs, zt, y, T, alpha).mean()
    ref_grad = np_kd_grad_rows(zs, zt, y, T, alpha) / zs.shape[0]
    s = t64(zs).requires_grad_()
    loss = KDLoss(temperature=T, alpha=alpha)(s, t64(zt), torch.tensor(y))
    loss.backward()
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13)


def test_kd_float32_matches_float64_reference_and_torch_formula():
    zs, zt, y = make(B=64, C=1000, seed=3)
    T, alpha = 4.0, 0.9
    ref = np_kd_rows(zs, zt, y, T, alpha).mean()
    s32 = torch.tensor(zs, dtype=torch.float32, requires_grad=True)
    loss = KDLoss(T, alpha)(s32, torch.tensor(zt, dtype=torch.float32), torch.tensor(y))
    loss.backward()
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)
    np.testing.assert_allclose(
        s32.grad.numpy(), np_kd_grad_rows(zs, zt, y, T, alpha) / 64, rtol=1e-3, atol=1e-8
    )
    # The formula from DESIGN.md, as torch ops
    s2 = torch.tensor(zs, dtype=torch.float32)
    design = alpha * F.kl_div(
        F.log_softmax(s2 / T, -1), F.log_softmax(torch.tensor(zt, dtype=torch.float32) / T, -1),
        log_target=True, reduction="batchmean",
    ) * T * T + (1 - alpha) * F.cross_entropy(s2, torch.tensor(y))
    np.testing.assert_allclose(loss.item(), design.item(), rtol=1e-5)


def test_kd_without_target_needs_alpha_one_and_keeps_T_squared():
    zs, zt, _ = make(B=8, C=5, seed=4)
    with pytest.raises(ValueError, match="target is required when alpha < 1"):
        KDLoss(alpha=0.5)(t64(zs), t64(zt))
    for T in (1.0, 3.0, 10.0):
        loss = KDLoss(temperature=T, alpha=1.0)(t64(zs), t64(zt))
        kl = np_kd_rows(zs, zt, None, T, 1.0) / (T * T)
        np.testing.assert_allclose(loss.item(), T * T * kl.mean(), rtol=1e-12)


def test_kd_token_level_mask_and_weights_read_only_selected_positions():
    B, L, C = 3, 7, 11
    zs, zt, y = make(B=B, L=L, C=C, seed=5)
    g = np.random.default_rng(6)
    mask = g.random((B, L)) < 0.6
    mask[0, 0] = True
    # garbage where the mask is False: NaN logits and padding labels must never be read
    zs_bad, zt_bad, y_bad = zs.copy(), zt.copy(), y.copy()
    zs_bad[~mask] = np.nan
    zt_bad[~mask] = np.inf
    y_bad[~mask] = -100
    T, alpha = 2.0, 0.7
    for weight in (None, g.random(B) * 2, g.random((B, L)) * 2):
        rows = np_kd_rows(zs[mask], zt[mask], y[mask], T, alpha)
        if weight is None:
            w = np.ones(mask.sum())
        elif weight.ndim == 1:
            w = np.broadcast_to(weight[:, None], (B, L))[mask]
        else:
            w = weight[mask]
        ref = float((w * rows).sum() / mask.sum())
        s = t64(zs_bad).requires_grad_()
        loss = KDLoss(T, alpha)(
            s, t64(zt_bad), torch.tensor(y_bad), weight=None if weight is None else t64(weight),
            mask=torch.tensor(mask),
        )
        loss.backward()
        np.testing.assert_allclose(loss.item(), ref, rtol=1e-12)
        grad = s.grad.numpy()
        assert np.all(grad[~mask] == 0.0)
        ref_grad = np_kd_grad_rows(zs[mask], zt[mask], y[mask], T, alpha) * w[:, None] / mask.sum()
        np.testing.assert_allclose(grad[mask], ref_grad, rtol=1e-9, atol=1e-14)


def test_kd_weights_are_sum_over_batch_size_not_over_weight_sum():
    zs, zt, y = make(B=10, C=4, seed=7)
    w = np.linspace(0.1, 3.0, 10)
    loss = KDLoss(3.0, 0.5)(t64(zs), t64(zt), torch.tensor(y), weight=t64(w))
    rows = np_kd_rows(zs, zt, y, 3.0, 0.5)
    np.testing.assert_allclose(loss.item(), (w * rows).sum() / 10, rtol=1e-12)
    assert abs(loss.item() - (w * rows).sum() / w.sum()) > 1e-3


def test_kd_empty_mask_gives_zero_loss_and_zero_grad():
    zs, zt, y = make(B=2, L=3, C=4, seed=8)
    s = t64(zs).requires_grad_()
    loss = KDLoss(2.0, 0.5)(s, t64(zt), torch.tensor(y), mask=torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_kd_hinton_high_temperature_limit():
    """At large T with zero-mean logits, d(T^2 KL)/dz_s -> (z_s - z_t) / C per sample, / B for batchmean."""
    B, C = 6, 20
    zs, zt, _ = make(B=B, C=C, scale=1.0, seed=9)
    zs -= zs.mean(axis=1, keepdims=True)
    zt -= zt.mean(axis=1, keepdims=True)
    expected = (zs - zt) / (C * B)
    errs = []
    for T in (100.0, 1000.0, 10000.0):
        s = t64(zs).requires_grad_()
        KDLoss(temperature=T, alpha=1.0)(s, t64(zt)).backward()
        errs.append(np.abs(s.grad.numpy() - expected).max() / np.abs(expected).max())
    assert errs[1] < 2e-3
    assert errs[2] < 2e-4
    assert errs[0] > errs[1] > errs[2]  # converges as 1/T


def test_kd_teacher_is_detached_and_inputs_are_not_modified():
    zs, zt, y = make(B=5, C=6, seed=10)
    s = t64(zs).requires_grad_()
    t = t64(zt).requires_grad_()
    s_copy, t_copy = s.detach().clone(), t.detach().clone()
    KDLoss(2.0, 0.5)(s, t, torch.tensor(y)).backward()
    assert t.grad is None
    assert torch.equal(s.detach(), s_copy) and torch.equal(t.detach(), t_copy)
    # same with float32 (the kernel's compute dtype, where .to() returns views of the inputs)
    s32, t32 = s.detach().float().requires_grad_(), t.detach().float()
    s32c, t32c = s32.detach().clone(), t32.clone()
    KDLoss(2.0, 0.5)(s32, t32, torch.tensor(y)).backward()
    assert torch.equal(s32.detach(), s32c) and torch.equal(t32, t32c)


def test_kd_float16_teacher_and_bfloat16_student():
    zs, zt, y = make(B=32, C=50, seed=11)
    T, alpha = 4.0, 0.9
    t16 = torch.tensor(zt, dtype=torch.float16)
    ref = np_kd_rows(zs, t16.double().numpy(), y, T, alpha).mean()
    loss = KDLoss(T, alpha)(torch.tensor(zs, dtype=torch.float32), t16, torch.tensor(y))
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)
    sb = torch.tensor(zs, dtype=torch.bfloat16, requires_grad=True)
    lb = KDLoss(T, alpha)(sb, t16, torch.tensor(y))
    lb.backward()
    assert lb.dtype == torch.bfloat16 and sb.grad.dtype == torch.bfloat16
    ref_b = np_kd_rows(sb.detach().double().numpy(), t16.double().numpy(), y, T, alpha).mean()
    np.testing.assert_allclose(lb.item(), ref_b, rtol=1e-2)


def test_kd_no_grad_path_gives_same_value():
    zs, zt, y = make(B=9, C=7, seed=12)
    s = t64(zs).requires_grad_()
    with_grad = KDLoss(3.0, 0.4)(s, t64(zt), torch.tensor(y))
    with torch.no_grad():
        without = KDLoss(3.0, 0.4)(s, t64(zt), torch.tensor(y))
    assert not without.requires_grad
    assert with_grad.item() == without.item()


def test_kd_many_blocks_equals_one_block(monkeypatch):
    """The fused kernel works block by block; the block size must not change the result."""
    import torch_pretrain_update.training._kernels as D

    zs, zt, y = make(B=37, C=9, seed=13)
    w = np.random.default_rng(1).random(37)
    out = []
    for elems in (1 << 20, 9 * 5, 1):
        monkeypatch.setattr(D, "_CPU_BLOCK_ELEMENTS", elems)
        s = t64(zs).requires_grad_()
        loss = KDLoss(2.0, 0.6)(s, t64(zt), torch.tensor(y), weight=t64(w))
        loss.backward()
        out.append((loss.item(), s.grad.clone()))
    for v, g in out[1:]:
        np.testing.assert_allclose(v, out[0][0], rtol=1e-13)
        torch.testing.assert_close(g, out[0][1], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# sparse (top-k) teacher
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_sparse_teacher_with_k_equal_C_equals_dense(T):
    zs, zt, y = make(B=12, L=3, C=16, seed=14)
    mask = torch.tensor(np.random.default_rng(2).random((12, 3)) < 0.7)
    sparse = SparseTeacher.from_logits(t64(zt), k=16)
    # shuffle the order of the k entries: the order must not matter
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    sparse = SparseTeacher(sparse.log_probs[..., perm], sparse.indices[..., perm])
    loss_fn = KDLoss(T, 0.8)
    s1, s2 = t64(zs).requires_grad_(), t64(zs).requires_grad_()
    dense = loss_fn(s1, t64(zt), torch.tensor(y), mask=mask)
    sp = loss_fn(s2, sparse, torch.tensor(y), mask=mask)
    dense.backward()
    sp.backward()
    np.testing.assert_allclose(sp.item(), dense.item(), rtol=1e-12)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-10, atol=1e-15)


def test_sparse_teacher_top_k_spreads_remaining_mass_uniformly():
    B, C, k, T = 10, 12, 4, 3.0
    zs, zt, _ = make(B=B, C=C, seed=15)
    sparse = SparseTeacher.from_logits(t64(zt), k=k)
    # independent completion: keep the top-k log-probs, give the others log((1 - sum p_topk) / (C - k))
    lp = np_log_softmax(zt)
    completed = np.empty_like(lp)
    for i in range(B):
        top = np.argsort(-lp[i])[:k]
        rest = 1.0 - np.exp(lp[i, top]).sum()
        completed[i] = np.log(rest / (C - k))
        completed[i, top] = lp[i, top]
    np.testing.assert_allclose(np.exp(completed).sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(sparse.dense_log_probs(C).numpy(), completed, rtol=1e-12)
    ref = np_kd_rows(zs, completed, None, T, 1.0).mean()
    s = t64(zs).requires_grad_()
    loss = KDLoss(T, 1.0)(s, sparse)
    loss.backward()
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-12)
    np.testing.assert_allclose(
        s.grad.numpy(), np_kd_grad_rows(zs, completed, np.zeros(B, int), T, 1.0) / B, rtol=1e-9, atol=1e-15
    )
    # and it differs from the dense loss (the tail is flattened)
    assert abs(loss.item() - KDLoss(T, 1.0)(t64(zs), t64(zt)).item()) > 1e-4


def test_sparse_teacher_with_no_remaining_mass_gives_zero_tail():
    # top-2 carries all the mass (up to float64 rounding: the tail of a 1000-logit gap underflows)
    zt = torch.tensor([[1000.0, 1000.0, 0.0, 0.0]], dtype=torch.float64)
    sparse = SparseTeacher.from_logits(zt, 2)
    zs = torch.tensor([[0.3, -0.2, 0.1, 0.5]], dtype=torch.float64, requires_grad=True)
    loss = KDLoss(2.0, 1.0)(zs, sparse)
    ls = np_log_softmax(zs.detach().numpy()[0] / 2.0)
    ref = 4.0 * (0.5 * (np.log(0.5) - ls[0]) + 0.5 * (np.log(0.5) - ls[1]))
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-12)
    loss.backward()
    assert torch.isfinite(zs.grad).all()


def test_sparse_teacher_validation():
    zs = torch.randn(3, 6)
    lp, idx = torch.log_softmax(torch.randn(3, 6), -1).topk(3, -1)
    with pytest.raises(ValueError, match="distinct"):
        KDLoss(2.0, 1.0)(zs, SparseTeacher(lp, torch.tensor([[0, 1, 1], [0, 1, 2], [0, 1, 2]])))
    with pytest.raises(ValueError, match=r"must be in \[0, 6\)"):
        KDLoss(2.0, 1.0)(zs, SparseTeacher(lp, torch.tensor([[0, 1, 6], [0, 1, 2], [0, 1, 2]])))
    with pytest.raises(ValueError, match="log-probabilities"):
        KDLoss(2.0, 1.0)(zs, SparseTeacher(lp + 5.0, idx))  # raw logits, not log-probs
    with pytest.raises(ValueError, match="positions"):
        KDLoss(2.0, 1.0)(zs, SparseTeacher(lp[:2], idx[:2]))
    with pytest.raises(ValueError, match="same shape"):
        SparseTeacher(lp, idx[:, :2])
    with pytest.raises(TypeError, match="indices"):
        SparseTeacher(lp, idx.float())
    with pytest.raises(TypeError, match="SparseTeacher is accepted by KDLoss"):
        DKDLoss()(zs, SparseTeacher(lp, idx), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"SparseTeacher.log_probs\) must be finite"):
        bad = lp.clone()
        bad[1, 0] = float("nan")
        KDLoss(2.0, 1.0)(zs, SparseTeacher(bad, idx))


# ---------------------------------------------------------------------------------------------------------------
# DKD
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.0), (0.0, 1.0, 6.0)])
def test_dkd_matches_reference(alpha, beta, T):
    zs, zt, y = make(B=20, C=9, seed=16)
    ref, _, _ = np_dkd_rows(zs, zt, y, T, alpha, beta)
    w = np.random.default_rng(3).random(20)
    loss = DKDLoss(alpha, beta, T)(t64(zs), t64(zt), torch.tensor(y))
    np.testing.assert_allclose(loss.item(), ref.mean(), rtol=1e-11)
    loss_w = DKDLoss(alpha, beta, T)(t64(zs), t64(zt), torch.tensor(y), weight=t64(w))
    np.testing.assert_allclose(loss_w.item(), (w * ref).sum() / 20, rtol=1e-11)


def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd():
    """KL(q || s) = TCKD + (1 - q_t) NCKD per sample (Zhao et al., eq. 1), checked through the modules."""
    zs, zt, y = make(B=15, C=8, seed=17)
    T = 3.0
    lq_t = np_log_softmax(zt / T)[np.arange(15), y]
    kd = KDLoss(T, alpha=1.0)(t64(zs), t64(zt))
    tckd = DKDLoss(alpha=1.0, beta=0.0, temperature=T)(t64(zs), t64(zt), torch.tensor(y))
    nckd_w = DKDLoss(alpha=0.0, beta=1.0, temperature=T)(
        t64(zs), t64(zt), torch.tensor(y), weight=t64(1.0 - np.exp(lq_t))
    )
    np.testing.assert_allclose(kd.item(), tckd.item() + nckd_w.item(), rtol=1e-12)
    # and the per-sample pieces agree with the reference decomposition
    _, tck, nck = np_dkd_rows(zs, zt, y, T, 1.0, 1.0)
    kl = np_kd_rows(zs, zt, None, T, 1.0) / (T * T)
    np.testing.assert_allclose(kl, tck + (1 - np.exp(lq_t)) * nck, rtol=1e-10)


def test_dkd_is_safe_where_the_minus_1000_trick_fails():
    """Logits / T above 1000 (the reference code masks with -1000) and a teacher certain of the target."""
    zs, zt, y = make(B=6, C=5, scale=3000.0, seed=18)
    zt[np.arange(6), y] = 1e5  # teacher certain: 1 - p_t underflows to 0
    s = t64(zs).requires_grad_()
    loss = DKDLoss(1.0, 8.0, 1.0)(s, t64(zt), torch.tensor(y))
    loss.backward()
    ref, _, _ = np_dkd_rows(zs, zt, y, 1.0, 1.0, 8.0)
    np.testing.assert_allclose(loss.item(), ref.mean(), rtol=1e-10)
    assert torch.isfinite(s.grad).all()


def test_dkd_token_level_and_target_required():
    zs, zt, y = make(B=2, L=4, C=6, seed=19)
    ref, _, _ = np_dkd_rows(zs.reshape(8, 6), zt.reshape(8, 6), y.reshape(8), 2.0, 1.0, 3.0)
    loss = DKDLoss(1.0, 3.0, 2.0)(t64(zs), t64(zt), torch.tensor(y))
    np.testing.assert_allclose(loss.item(), ref.mean(), rtol=1e-11)
    with pytest.raises(ValueError, match="target is required"):
        DKDLoss()(t64(zs), t64(zt), None)


# ---------------------------------------------------------------------------------------------------------------
# pseudo-labels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 0.5, 0.9])
def test_pseudo_label_loss_matches_reference(threshold):
    zs, zt, _ = make(B=40, C=6, scale=2.0, seed=20)
    w = np.random.default_rng(4).random(40)
    labels = zt.argmax(axis=1)
    conf = np.exp(np_log_softmax(zt)).max(axis=1)
    keep = np.ones(40) if threshold is None else (conf >= threshold).astype(float)
    if threshold is not None:
        assert 0 < keep.sum() < 40  # the threshold selects some but not all samples
    ce = -np_log_softmax(zs)[np.arange(40), labels]
    for weight in (None, w):
        ww = np.ones(40) if weight is None else weight
        ref = (ww * keep * ce).sum() / 40  # divided by B, not by the number kept
        loss = PseudoLabelLoss(threshold)(t64(zs), t64(zt), None if weight is None else t64(weight))
        np.testing.assert_allclose(loss.item(), ref, rtol=1e-12)


def test_pseudo_label_loss_rejects_nan_teacher_instead_of_dropping_it():
    zs, zt, _ = make(B=4, C=3, seed=21)
    zt[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"teacher_logits must be finite; position 2"):
        PseudoLabelLoss(0.5)(t64(zs), t64(zt))
    with pytest.raises(ValueError, match="threshold"):
        PseudoLabelLoss(threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        PseudoLabelLoss(threshold=1.5)


# ---------------------------------------------------------------------------------------------------------------
# feature hints
# ---------------------------------------------------------------------------------------------------------------


def test_feature_hint_loss_matches_reference_on_maps_vectors_and_tokens():
    g = np.random.default_rng(22)
    hint = FeatureHintLoss(4, 6).double()
    W = hint.regressor.weight.detach().numpy()
    b = hint.regressor.bias.detach().numpy()
    # (B, D, H, W) maps: a 1x1 convolution
    fs, ft = g.normal(size=(3, 4, 5, 2)), g.normal(size=(3, 6, 5, 2))
    pred = np.einsum("bdhw,ed->behw", fs, W) + b[None, :, None, None]
    np.testing.assert_allclose(hint(t64(fs), t64(ft)).item(), ((pred - ft) ** 2).mean(), rtol=1e-12)
    wts = g.random(3)
    per = ((pred - ft) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(hint(t64(fs), t64(ft), weight=t64(wts)).item(), (wts * per).sum() / 3, rtol=1e-12)
    # (B, D) vectors
    fs2, ft2 = g.normal(size=(5, 4)), g.normal(size=(5, 6))
    np.testing.assert_allclose(hint(t64(fs2), t64(ft2)).item(), ((fs2 @ W.T + b - ft2) ** 2).mean(), rtol=1e-12)
    # (B, L, D) tokens with dim=-1
    tok = FeatureHintLoss(4, 6, dim=-1).double()
    tok.load_state_dict(hint.state_dict())
    fs3, ft3 = g.normal(size=(2, 7, 4)), g.normal(size=(2, 7, 6))
    np.testing.assert_allclose(tok(t64(fs3), t64(ft3)).item(), ((fs3 @ W.T + b - ft3) ** 2).mean(), rtol=1e-12)


def test_feature_hint_regressor_is_trainable_through_parameters():
    torch.manual_seed(0)
    hint = FeatureHintLoss(3, 5)
    names = {n for n, _ in hint.named_parameters()}
    assert names == {"regressor.weight", "regressor.bias"}
    fs = torch.randn(64, 3)
    ft = fs @ torch.randn(3, 5) + 0.5  # reachable exactly by a linear map
    opt = torch.optim.SGD(hint.parameters(), lr=0.2)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = hint(fs, ft)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 1e-3 * first


def test_feature_hint_errors():
    hint = FeatureHintLoss(4, 6)
    with pytest.raises(ValueError, match="student_dim=4"):
        hint(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="teacher_dim=6"):
        hint(torch.randn(2, 4), torch.randn(2, 7))
    with pytest.raises(ValueError, match="pool or interpolate"):
        hint(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="student_features must be finite"):
        hint(torch.tensor([[0.0, float("inf"), 0.0, 0.0]]), torch.randn(1, 6))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        hint(torch.randn(2, 4), torch.randn(2, 6), weight=torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------------------------------------------------------
# gradcheck (float64) on every loss
# ---------------------------------------------------------------------------------------------------------------


def test_gradcheck_all_losses():
    zs, zt, y = make(B=4, C=5, seed=23)
    s = t64(zs).requires_grad_()
    y_t = torch.tensor(y)
    w = t64(np.array([0.5, 1.0, 2.0, 0.0]))
    assert torch.autograd.gradcheck(lambda z: KDLoss(3.0, 0.6)(z, t64(zt), y_t, weight=w), (s,))
    assert torch.autograd.gradcheck(lambda z: KDLoss(0.7, 0.0)(z, t64(zt), y_t), (s,))
    sparse = SparseTeacher.from_logits(t64(zt), 2)
    assert torch.autograd.gradcheck(lambda z: KDLoss(2.0, 1.0)(z, sparse), (s,))
    zs3, zt3, y3 = make(B=2, L=3, C=4, seed=24)
    m = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(
        lambda z: KDLoss(2.0, 0.5)(z, t64(zt3), torch.tensor(y3), mask=m), (t64(zs3).requires_grad_(),)
    )
    assert torch.autograd.gradcheck(lambda z: DKDLoss(1.0, 8.0, 4.0)(z, t64(zt), y_t, weight=w), (s,))
    assert torch.autograd.gradcheck(lambda z: DKDLoss(0.5, 2.0, 1.0)(z, t64(zt), y_t), (s,))
    assert torch.autograd.gradcheck(lambda z: PseudoLabelLoss(0.3)(z, t64(zt), w), (s,))
    hint = FeatureHintLoss(3, 2).double()
    fs, ft = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True), torch.randn(4, 2, 2, dtype=torch.float64)
    W = hint.regressor.weight.detach().clone().requires_grad_()
    b = hint.regressor.bias.detach().clone().requires_grad_()

    def hint_fn(f, W_, b_):
        return torch.func.functional_call(hint, {"regressor.weight": W_, "regressor.bias": b_}, (f, ft))

    assert torch.autograd.gradcheck(hint_fn, (fs, W, b))


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DKDLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        KDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        KDLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        DKDLoss(beta=-1.0)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        KDLoss(temperature="4")


def test_input_errors_name_the_argument():
    kd = KDLoss(2.0, 0.5)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape .* \(different batch shape\)"):
        kd(s, torch.randn(3, 5), y)
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape .* \(different number of classes\)"):
        kd(s, torch.randn(4, 6), y)
    with pytest.raises(ValueError, match=r"target must be class indices in \[0, 5\); got 5 at position 2"):
        kd(s, t, torch.tensor([0, 1, 5, 3]))
    with pytest.raises(ValueError, match=r"target must be class indices in \[0, 5\); got -1"):
        DKDLoss()(s, t, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        kd(s, t, y.float())
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        kd(s, t, y[:3])
    with pytest.raises(ValueError, match="weight must be >= 0; got -2.0 at position 1"):
        kd(s, t, y, weight=torch.tensor([1.0, -2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weight must be finite"):
        kd(s, t, y, weight=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        kd(s, t, y, mask=torch.ones(4))
    with pytest.raises(ValueError, match="student_logits must be"):
        kd(torch.randn(4), torch.randn(4), y)
    with pytest.raises(TypeError, match="student_logits must have a floating dtype"):
        kd(torch.ones(4, 5, dtype=torch.long), t, y)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor"):
        kd(s, t.numpy(), y)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_reported_with_their_position(where, value):
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    y = torch.zeros(2, 3, dtype=torch.long)
    (s if where == "student" else t)[1, 2, 3] = value
    with pytest.raises(ValueError, match=rf"{where}_logits must be finite; position \(1, 2\)"):
        KDLoss(2.0, 0.5)(s, t, y)
    with pytest.raises(ValueError, match=rf"{where}_logits must be finite; position \(1, 2\)"):
        DKDLoss()(s, t, y)
    # masked out: not read, no error
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(KDLoss(2.0, 0.5)(s, t, y, mask=mask))
    # opting out of the check gives a non-finite loss instead of an error
    assert not torch.isfinite(KDLoss(2.0, 0.5, check_finite=False)(s, t, y))


def test_fused_backward_with_retain_graph_scaled_losses_and_a_model_upstream():
    zs, zt, y = make(B=5, C=7, seed=25)
    s = t64(zs).requires_grad_()
    kd = KDLoss(2.0, 0.5)
    loss = kd(s, t64(zt), torch.tensor(y))
    loss.backward(retain_graph=True)
    g1 = s.grad.clone()
    s.grad.mul_(100.0)  # in-place on .grad must not touch what the graph saved
    loss.backward()
    torch.testing.assert_close(s.grad, 101 * g1)
    s.grad = None
    (3.0 * kd(s, t64(zt), torch.tensor(y))).backward()
    torch.testing.assert_close(s.grad, 3 * g1)
    # a layer upstream of the loss: the weight gradient equals the one through the reference formula
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    kd(x @ w, t64(zt), torch.tensor(y)).backward()
    ours = w.grad.clone()
    w.grad = None
    T = 2.0
    ref = 0.5 * F.kl_div(F.log_softmax(x @ w / T, -1), F.log_softmax(t64(zt) / T, -1), log_target=True,
                         reduction="batchmean") * T * T + 0.5 * F.cross_entropy(x @ w, torch.tensor(y))
    ref.backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-10, atol=1e-12)
