"""The functional forms beside the loss modules: the module forwards to its function (same value, same gradient),
the unfused path equals the fused kernel and supports a gradient of the gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_pretrain_update import (
    DKDLoss,
    FeatureHintLoss,
    KDLoss,
    PseudoLabelLoss,
    SparseTeacher,
    dkd_loss,
    feature_hint_loss,
    kd_loss,
    pseudo_label_loss,
)


def logits(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def value_and_grad(fn, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.detach().clone().requires_grad_()
    loss = fn(s)
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


CASES = {
    "dense": dict(shape=(12, 7)),
    "token-mask-weight": dict(shape=(3, 5, 7), mask=True, weight=True),
    "sparse": dict(shape=(12, 7), sparse=3),
    "no-target": dict(shape=(12, 7), alpha=1.0, target=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kd_module_function_and_unfused_agree(case):
    c = CASES[case]
    s, t = logits(*c["shape"], seed=1), logits(*c["shape"], seed=2)
    pos = c["shape"][:-1]
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, c["shape"][-1], pos, generator=g) if c.get("target", True) else None
    kw = {}
    if c.get("mask"):
        kw["mask"] = torch.rand(pos, generator=g) > 0.3
    if c.get("weight"):
        kw["weight"] = torch.rand(pos, generator=g, dtype=torch.float64)
    teacher = SparseTeacher.from_logits(t, c["sparse"]) if c.get("sparse") else t
    alpha = c.get("alpha", 0.7)
    module = value_and_grad(lambda x: KDLoss(2.0, alpha)(x, teacher, y, **kw), s)
    fused = value_and_grad(lambda x: kd_loss(x, teacher, y, temperature=2.0, alpha=alpha, **kw), s)
    unfused = value_and_grad(lambda x: kd_loss(x, teacher, y, temperature=2.0, alpha=alpha, fused=False, **kw), s)
    assert torch.equal(module[0], fused[0]) and torch.equal(module[1], fused[1])
    torch.testing.assert_close(unfused[0], fused[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(unfused[1], fused[1], rtol=1e-11, atol=1e-15)


def test_kd_unfused_matches_torch_formula():
    s, t = logits(8, 6, seed=4), logits(8, 6, seed=5)
    y = torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(6))
    ref = 0.4 * F.kl_div(F.log_softmax(s / 3, 1), F.log_softmax(t / 3, 1), log_target=True, reduction="batchmean") \
        * 9 + 0.6 * F.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y, temperature=3.0, alpha=0.4, fused=False), ref, rtol=1e-13, atol=0)


def test_dkd_module_function_and_unfused_agree():
    s, t = logits(3, 4, 9, seed=7), logits(3, 4, 9, seed=8)
    g = torch.Generator().manual_seed(9)
    y = torch.randint(0, 9, (3, 4), generator=g)
    w = torch.rand(3, generator=g, dtype=torch.float64)
    module = value_and_grad(lambda x: DKDLoss(0.5, 4.0, 2.0)(x, t, y, w), s)
    fused = value_and_grad(lambda x: dkd_loss(x, t, y, alpha=0.5, beta=4.0, temperature=2.0, weight=w), s)
    unfused = value_and_grad(
        lambda x: dkd_loss(x, t, y, alpha=0.5, beta=4.0, temperature=2.0, weight=w, fused=False), s)
    assert torch.equal(module[0], fused[0]) and torch.equal(module[1], fused[1])
    torch.testing.assert_close(unfused[0], fused[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(unfused[1], fused[1], rtol=1e-11, atol=1e-15)


def test_unfused_losses_support_a_gradient_of_the_gradient():
    s = logits(3, 4, seed=10, scale=1.0).requires_grad_()
    t = logits(3, 4, seed=11, scale=1.0)
    y = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(12))
    for fn in (lambda x: kd_loss(x, t, y, temperature=2.0, alpha=0.6, fused=False),
               lambda x: dkd_loss(x, t, y, beta=2.0, temperature=2.0, fused=False)):
        assert torch.autograd.gradgradcheck(fn, (s,), fast_mode=True)
    # and the module spelling: a gradient penalty on the KD gradient
    (g,) = torch.autograd.grad(KDLoss(2.0, 0.6, fused=False)(s, t, y), s, create_graph=True)
    g.square().sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_pseudo_label_and_feature_hint_functions_equal_the_modules():
    s, t = logits(10, 4, seed=13), logits(10, 4, seed=14)
    w = torch.rand(10, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    assert torch.equal(PseudoLabelLoss(threshold=0.6)(s, t, w), pseudo_label_loss(s, t, threshold=0.6, weight=w))
    hint = FeatureHintLoss(3, 5, dim=-1).double()
    fs, ft = logits(2, 6, 3, seed=16), logits(2, 6, 5, seed=17)
    assert torch.equal(hint(fs, ft), feature_hint_loss(fs, ft, hint.regressor, dim=-1))
    ref = ((hint.regressor(fs) - ft) ** 2).mean()
    torch.testing.assert_close(feature_hint_loss(fs, ft, hint.regressor, dim=-1), ref, rtol=1e-14, atol=0)
    # without a regressor the features are compared directly, and must have as many channels
    same = logits(2, 3, 4, 4, seed=18)
    torch.testing.assert_close(feature_hint_loss(same, same * 0.5), (0.5 * same).square().mean())
    with pytest.raises(ValueError, match="teacher_features has 5 channels at dim -1 but the student's features have 3"):
        feature_hint_loss(fs, ft, dim=-1)
    with pytest.raises(TypeError, match="regressor must be callable"):
        feature_hint_loss(fs, ft, nn.Linear(3, 5).weight, dim=-1)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda s, t, y: kd_loss(s, t, y, fused="yes"), TypeError, "fused"),
    (lambda s, t, y: kd_loss(s, t, y, temperature=0.0), ValueError, "temperature"),
    (lambda s, t, y: kd_loss(s, t, None, alpha=0.5), ValueError, "target is required"),
    (lambda s, t, y: dkd_loss(s, t, y, beta=-1.0), ValueError, "beta"),
    (lambda s, t, y: dkd_loss(s, t, None), ValueError, "target is required"),
    (lambda s, t, y: pseudo_label_loss(s, t, threshold=1.5), ValueError, "threshold"),
    (lambda s, t, y: feature_hint_loss(s, t, dim=2), ValueError, "dim=2"),
])
def test_function_arguments_are_checked_like_the_modules(call, exc, needle):
    s, t = logits(4, 3, seed=19), logits(4, 3, seed=20)
    with pytest.raises(exc, match=needle):
        call(s, t, torch.zeros(4, dtype=torch.long))
