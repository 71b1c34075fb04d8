"""Training pieces a user trusts without reading them: FrozenCheck sees replaced weights, one param-group rule for
partial_optimizer and unfreeze (timm's no-decay convention, layer decay continued), DKD's target-class term
accurate in float32, KD's alpha documented against torchdistill's, and a clear error for a double backward."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_pretrain_update import (
    DKDLoss,
    FrozenCheck,
    GradualUnfreezing,
    KDLoss,
    freeze,
    partial_optimizer,
    unfreeze,
)


def layout(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[tuple[str, ...], float, float]]:
    """(names, lr, weight_decay) of every param group, names in named_parameters() order."""
    out = []
    for g in opt.param_groups:
        names = tuple(n for n, p in model.named_parameters() if any(p is q for q in g["params"]))
        out.append((names, g["lr"], g.get("weight_decay")))
    return out


# ------------------------------------------------------------------------------------------------ FrozenCheck
def frozen_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), bn=nn.BatchNorm1d(4), head=nn.Linear(4, 2)))
    freeze(model, ["fc.*", "bn.*"])
    return model


def test_frozen_check_sees_weights_replaced_by_load_state_dict_assign():
    model = frozen_net()
    check = FrozenCheck(model)
    sd = model.state_dict()
    sd["fc.weight"] = sd["fc.weight"] + 1.0  # a new tensor: the old one stays untouched
    sd["bn.running_mean"] = sd["bn.running_mean"] + 1.0
    model.load_state_dict(sd, assign=True)
    assert not model.fc.weight.requires_grad  # assign keeps requires_grad: only the values differ
    assert check.changed() == ["fc.weight", "bn.running_mean"]
    with pytest.raises(RuntimeError, match=r"2 frozen tensor\(s\) changed.*fc\.weight.*bn\.running_mean"):
        check.verify()


def test_frozen_check_accepts_replaced_tensors_with_the_same_values():
    model = frozen_net()
    check = FrozenCheck(model)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model.fc.weight is not None and check.changed() == []
    check.verify()


def test_frozen_check_sees_a_reassigned_parameter():
    model = frozen_net()
    check = FrozenCheck(model)
    model.fc.weight = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    assert check.changed() == ["fc.weight"]
    with pytest.raises(RuntimeError, match=r"fc\.weight \(value changed\)"):
        check.verify()


def test_frozen_check_sees_a_parameter_made_trainable_or_removed():
    model = frozen_net()
    check = FrozenCheck(model)
    model.fc.bias.requires_grad_(True)  # same value, but no longer frozen
    model.fc.weight = nn.Parameter(model.fc.weight.detach().clone())  # same value, requires_grad=True
    model.bn.bias = None  # gone from named_parameters()
    assert check.changed() == ["fc.weight", "fc.bias", "bn.bias"]
    with pytest.raises(RuntimeError, match=r"fc\.weight \(requires_grad is True\).*bn\.bias \(missing\)"):
        check.verify()


# --------------------------------------------------------------------------------------- no-decay rule (timm)
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 8))  # 2-D: decayed unless no_weight_decay() lists it
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 8))
        self.enormous = nn.Linear(8, 8)  # its name contains "norm": still a weight matrix
        self.scale = nn.Parameter(torch.ones(8))  # 1-D, no "bias"/"norm" in the name
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enormous(x + self.cls_token) * self.scale)


class EncoderWithList(Encoder):
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


def no_decay_names(model: nn.Module, opt: torch.optim.Optimizer) -> set[str]:
    return {n for names, _, wd in layout(model, opt) if wd == 0.0 for n in names}


def test_no_decay_is_every_parameter_with_ndim_at_most_one():
    model = Encoder()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3)
    assert no_decay_names(model, opt) == {"enormous.bias", "scale", "head.bias"}
    decayed = {n for names, _, wd in layout(model, opt) if wd == 0.3 for n in names}
    assert decayed == {"cls_token", "pos_embed", "enormous.weight", "head.weight"}


def test_no_decay_adds_the_names_the_model_lists_in_no_weight_decay():
    model = EncoderWithList()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3)
    assert no_decay_names(model, opt) == {"cls_token", "pos_embed", "enormous.bias", "scale", "head.bias"}


def test_no_decay_patterns_are_globs_on_the_whole_name_and_must_match():
    model = Encoder()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3,
                            no_decay="enormous.*")
    assert no_decay_names(model, opt) == {"enormous.weight", "enormous.bias", "scale", "head.bias"}
    with pytest.raises(ValueError, match=r"no_decay: pattern 'norm' matches no parameter name.*'\*norm\*'"):
        partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3, no_decay="norm")
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3, no_decay=False)
    assert no_decay_names(model, opt) == set() and len(opt.param_groups) == 1


def test_unfreeze_applies_the_same_no_decay_rule_by_default():
    model = EncoderWithList()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="head.*", lr=0.1, weight_decay=0.3)
    unfreeze(model, ["cls_token", "pos_embed", "enormous.*", "scale"], optimizer=opt)
    other = EncoderWithList()
    full = partial_optimizer(other, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3)
    assert no_decay_names(model, opt) == {"cls_token", "pos_embed", "enormous.bias", "scale", "head.bias"}
    assert no_decay_names(model, opt) == no_decay_names(other, full)
    # into an optimizer that partial_optimizer did not build: the same default rule
    model = Encoder()
    freeze(model, "enormous.*")
    opt = torch.optim.AdamW([model.head.weight], lr=0.01, weight_decay=0.1)
    unfreeze(model, "enormous.*", optimizer=opt)
    assert layout(model, opt)[1:] == [(("enormous.weight",), 0.01, 0.1), (("enormous.bias",), 0.01, 0.0)]


# ------------------------------------------------------------------------------------- layer decay continued
def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))


def test_unfreeze_continues_layer_decay():
    model = stack()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable=["1.*", "2.*"], lr=0.001, weight_decay=0.05,
                            layer_decay=0.8)
    unfreeze(model, "0.*", optimizer=opt)
    new = layout(model, opt)[4:]
    assert [names for names, _, _ in new] == [("0.weight",), ("0.bias",)]
    assert [lr for _, lr, _ in new] == pytest.approx([0.001 * 0.8 ** 2] * 2, rel=1e-15)
    assert [wd for _, _, wd in new] == [0.05, 0.0]
    # exactly the groups of an optimizer built with everything trainable
    other = stack()
    full = partial_optimizer(other, torch.optim.AdamW, trainable="*", lr=0.001, weight_decay=0.05, layer_decay=0.8)
    assert sorted(layout(model, opt)) == sorted(layout(other, full))


def test_gradual_unfreezing_continues_layer_decay_by_default():
    model = stack()
    opt = partial_optimizer(model, torch.optim.SGD, trainable="2.*", lr=0.1, momentum=0.9, weight_decay=1e-4,
                            layer_decay=0.5)
    gu = GradualUnfreezing(model, opt, ["1.*", "0.*"])
    gu.step()
    gu.step()
    other = stack()
    full = partial_optimizer(other, torch.optim.SGD, trainable="*", lr=0.1, momentum=0.9, weight_decay=1e-4,
                             layer_decay=0.5)
    assert sorted(layout(model, opt)) == sorted(layout(other, full))


def test_unfreeze_explicit_arguments_override_the_optimizers_rule():
    model = stack()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="2.*", lr=0.001, weight_decay=0.05,
                            layer_decay=0.8)
    unfreeze(model, "1.*", optimizer=opt, lr=0.01, no_decay=False)
    assert layout(model, opt)[2:] == [(("1.weight", "1.bias"), 0.01, 0.05)]
    unfreeze(model, "0.*", optimizer=opt, layer_decay=0.5)
    assert layout(model, opt)[3:] == [(("0.weight",), 0.001 * 0.25, 0.05), (("0.bias",), 0.001 * 0.25, 0.0)]


# -------------------------------------------------------------------------------------- DKD float32 accuracy
def dkd_reference(zs, zt, y, T, alpha, beta):
    """Decoupled Knowledge Distillation (Zhao et al., 2022) in float64 from probabilities: TCKD is the KL between
    the binary distributions (p_t, 1 - p_t), 1 - p_t summed over the other classes; NCKD the KL between the
    distributions over the non-target classes, renormalised."""
    ps, pt = torch.softmax(zs.double() / T, 1), torch.softmax(zt.double() / T, 1)
    m = F.one_hot(y, zs.shape[1]).bool()
    s_t, t_t = ps[m], pt[m]
    s_o, t_o = ps.masked_fill(m, 0).sum(1), pt.masked_fill(m, 0).sum(1)
    tckd = t_t * torch.log(t_t / s_t) + t_o * torch.log(t_o / s_o)
    s_hat = ps.masked_fill(m, 0) / s_o[:, None]
    t_hat = pt.masked_fill(m, 0) / t_o[:, None]
    nckd = torch.where(m, 0.0, t_hat * torch.log(t_hat / s_hat.masked_fill(m, 1.0))).sum(1)
    return ((alpha * tckd + beta * nckd) * T * T).mean()


@pytest.mark.parametrize("scale,confident", [(1.0, 0.0), (3.0, 0.0), (3.0, 60.0)])
def test_dkd_target_class_term_is_accurate_in_float32(scale, confident):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(64, 1000, generator=g) * scale
    zt = torch.randn(64, 1000, generator=g) * scale
    y = torch.randint(0, 1000, (64,), generator=g)
    rows = torch.arange(64)
    zt[rows, y] += confident  # p_t -> 1: 1 - p_t must stay accurate there too
    zs[rows, y] += 0.8 * confident
    ref = dkd_reference(zs, zt, y, 4.0, 1.0, 0.0).item()
    got = DKDLoss(alpha=1.0, beta=0.0, temperature=4.0)(zs, zt, y).item()
    assert abs(got - ref) / abs(ref) < 2e-6, (got, ref)
    full = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)(zs, zt, y).item()
    ref_full = dkd_reference(zs, zt, y, 4.0, 1.0, 8.0).item()
    assert abs(full - ref_full) / abs(ref_full) < 2e-6


def test_dkd_float64_matches_the_reference_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    zs = (torch.randn(8, 12, generator=g, dtype=torch.float64) * 3).requires_grad_()
    zt = torch.randn(8, 12, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 12, (8,), generator=g)
    loss = DKDLoss(alpha=0.7, beta=2.0, temperature=2.0)(zs, zt, y)
    (g_ours,) = torch.autograd.grad(loss, zs)
    ref = dkd_reference(zs, zt, y, 2.0, 0.7, 2.0)
    (g_ref,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------- KD alpha, backward
def test_kd_docstring_says_which_term_alpha_weighs_and_how_torchdistill_differs():
    head = " ".join(KDLoss.__doc__.strip().splitlines()[:6])
    assert "alpha" in head and "torchdistill" in head and "1 - alpha" in head
    # and the behaviour it describes: alpha weighs the distillation term
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), log_target=True, reduction="batchmean") * 4
    ce = F.cross_entropy(s, y)
    torch.testing.assert_close(KDLoss(temperature=2.0, alpha=0.25)(s, t, y), 0.25 * kl + 0.75 * ce)


@pytest.mark.parametrize("loss_fn", [lambda s, t, y: KDLoss(2.0, 0.5)(s, t, y),
                                     lambda s, t, y: DKDLoss(1.0, 2.0, 2.0)(s, t, y)], ids=["KD", "DKD"])
def test_double_backward_of_the_fused_loss_says_what_to_do(loss_fn):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=g, requires_grad=True)
    t, y = torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g)
    with pytest.raises(RuntimeError, match=r"(?s)single backward.*create_graph.*fused=False"):
        torch.autograd.grad(loss_fn(s, t, y), s, create_graph=True)
    # retain_graph (backward twice through the same graph) is supported and accumulates
    loss = loss_fn(s, t, y)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)
    assert math.isfinite(loss.item())


def test_unfreeze_checks_its_rule_before_changing_anything():
    model = stack()
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="2.*", lr=0.001, weight_decay=0.05)
    with pytest.raises(ValueError, match=r"no_decay: pattern 'bias' matches no parameter name.*'\*bias\*'"):
        unfreeze(model, "0.*", optimizer=opt, no_decay="bias")
    with pytest.raises(ValueError, match="layers only sets the depth used by layer_decay"):
        unfreeze(model, "0.*", optimizer=opt, layers=["0.*", "1.*", "2.*"])
    with pytest.raises(ValueError, match="no_decay=True was given but optimizer is None"):
        unfreeze(model, "0.*", no_decay=True)
    assert not model[0].weight.requires_grad and len(opt.param_groups) == 2


def test_gradual_unfreezing_lr_factor_scales_the_top_lr_not_the_bottom_groups():
    model = stack()
    opt = partial_optimizer(model, torch.optim.SGD, trainable=["1.*", "2.*"], lr=0.1, layer_decay=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05, 0.1, 0.1]
    GradualUnfreezing(model, opt, ["0.*"], lr_factor=0.4).step()
    assert layout(model, opt)[4:] == [(("0.weight",), 0.1 * 0.4, 0.0), (("0.bias",), 0.1 * 0.4, 0.0)]
