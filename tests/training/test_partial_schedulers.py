"""unfreeze with optimizers and LR schedulers; GradualUnfreezing; checkpoint after unfreeze -> bit-exact resume."""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

from torch_pretrain_update import FrozenCheck, GradualUnfreezing, freeze, partial_optimizer, unfreeze

B0 = 0.1  # base lr of the first group


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(low=nn.Linear(2, 2), top=nn.Linear(2, 2)))


# factory(optimizer, scales): scales[i] = group i's base lr / B0 (used where the schedule sets lrs itself)
SCHEDULERS = {
    "LambdaLR": lambda o, s: S.LambdaLR(o, lambda e: 0.9 ** e + 0.01 * e),
    "StepLR": lambda o, s: S.StepLR(o, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda o, s: S.CosineAnnealingLR(o, T_max=12, eta_min=0.003),
    "OneCycleLR": lambda o, s: S.OneCycleLR(o, max_lr=[0.4 * x for x in s], total_steps=30),
    "ExponentialLR": lambda o, s: S.ExponentialLR(o, gamma=0.9),
    "MultiplicativeLR": lambda o, s: S.MultiplicativeLR(o, lambda e: 0.95),
    "MultiStepLR": lambda o, s: S.MultiStepLR(o, milestones=[4, 9], gamma=0.3),
    "LinearLR": lambda o, s: S.LinearLR(o, start_factor=0.1, total_iters=15),
    "PolynomialLR": lambda o, s: S.PolynomialLR(o, total_iters=25, power=2.0),
    "CosineAnnealingWarmRestarts": lambda o, s: S.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=0.002),
    "CyclicLR": lambda o, s: S.CyclicLR(o, base_lr=[0.01 * x for x in s], max_lr=[0.2 * x for x in s],
                                        step_size_up=3),
    "SequentialLR": lambda o, s: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.2, total_iters=4), S.ExponentialLR(o, gamma=0.9)], milestones=[4]),
    "ChainedScheduler": lambda o, s: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.95),
                                                         S.StepLR(o, step_size=4, gamma=0.5)]),
}


def lr_track(name: str, ratio: float, unfreeze_at: int, steps: int, incremental: bool):
    """Group lrs (and momenta) after every scheduler step. incremental: start with the top layer only and unfreeze
    the low layer at step `unfreeze_at`; otherwise (the reference) both groups from the start."""
    model = two_layer()
    top, low = list(model.top.parameters()), list(model.low.parameters())
    if incremental:
        freeze(model, "low.*")
        opt = torch.optim.SGD([{"params": top}], lr=B0, momentum=0.9)
        sched = SCHEDULERS[name](opt, [1.0])
    else:
        opt = torch.optim.SGD([{"params": top}, {"params": low, "lr": B0 * ratio}], lr=B0, momentum=0.9)
        sched = SCHEDULERS[name](opt, [1.0, ratio])
    out = []
    for step in range(steps):
        if incremental and step == unfreeze_at:
            # lr is the new group's *base* lr: what the schedule scales (initial_lr; OneCycle/CyclicLR set it)
            base = opt.param_groups[0]["initial_lr"]
            unfreeze(model, "low.*", optimizer=opt, lr=None if ratio == 1.0 else base * ratio, schedulers=[sched],
                     no_decay=False)
            assert len(sched.get_last_lr()) == 2
        if step >= unfreeze_at:
            out.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("ratio", [1.0, 0.5])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_new_group_follows_the_schedule(name, ratio):
    ref = lr_track(name, ratio, unfreeze_at=7, steps=24, incremental=False)
    got = lr_track(name, ratio, unfreeze_at=7, steps=24, incremental=True)
    assert len(got) == len(ref) == 17
    for i, (r, g) in enumerate(zip(ref, got)):
        assert g[0] == r[0], (i, "the old group is untouched")
        assert g[1][0] == pytest.approx(r[1][0], rel=1e-9, abs=1e-15), (i, "new group's lr")
        assert g[1][1] == pytest.approx(r[1][1], rel=1e-9), (i, "new group's momentum")
    assert len({round(x[1][0], 12) for x in got}) > 1  # the schedule actually moved during the check


def test_unpatched_schedulers_fail_on_a_new_group():
    """Why unfreeze extends the schedulers: torch's own add_param_group breaks these."""
    model = two_layer()
    opt = torch.optim.SGD(model.top.parameters(), lr=B0)
    lam = S.LambdaLR(opt, lambda e: 0.5)
    plat = S.ReduceLROnPlateau(opt, patience=0, min_lr=[0.0])
    opt.add_param_group({"params": list(model.low.parameters())})
    opt.step()
    with pytest.raises(ValueError):
        lam.step()
    with pytest.raises(RuntimeError, match="min_lrs"):
        for m in (1.0, 2.0, 3.0):
            plat.step(m)


@pytest.mark.parametrize("min_lr", [0.001, [0.001]])
def test_reduce_lr_on_plateau(min_lr):
    model = two_layer()
    freeze(model, "low.*")
    opt = torch.optim.SGD(model.top.parameters(), lr=B0)
    sched = S.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=min_lr)
    for m in (1.0, 2.0, 2.0):  # two bad epochs -> two reductions
        sched.step(m)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    unfreeze(model, "low.*", optimizer=opt, lr=0.04, schedulers=[sched], no_decay=False)
    assert opt.param_groups[1]["lr"] == 0.04 and sched.get_last_lr()[1] == 0.04
    assert sched.min_lrs == [0.001, 0.001]
    for m in (3.0, 3.0):
        sched.step(m)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025 / 4, 0.01])
    for _ in range(10):
        sched.step(4.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.001])


def test_default_lr_is_first_groups_base_lr_and_fresh_state():
    model = two_layer()
    freeze(model, "low.*")
    opt = torch.optim.AdamW(model.top.parameters(), lr=0.02, weight_decay=0.3, betas=(0.8, 0.95))
    x = torch.randn(4, 2)
    model(x).sum().backward()
    opt.step()
    names = unfreeze(model, "low.*", optimizer=opt, no_decay=False)
    assert names == ["low.weight", "low.bias"]
    g = opt.param_groups[1]
    assert g["params"][0] is model.low.weight and g["params"][1] is model.low.bias
    assert g["lr"] == 0.02 and g["weight_decay"] == 0.3 and g["betas"] == (0.8, 0.95)
    assert all(len(opt.state[p]) == 0 for p in g["params"])
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert int(opt.state[model.low.weight]["step"]) == 1 and int(opt.state[model.top.weight]["step"]) == 2
    # unfreezing again adds nothing: membership by identity
    assert unfreeze(model, "*", optimizer=opt) == ["low.weight", "low.bias", "top.weight", "top.bias"]
    assert len(opt.param_groups) == 2


def test_unfreeze_into_an_optimizer_built_with_names():
    model = two_layer()
    freeze(model, "low.*")
    try:
        opt = torch.optim.SGD(model.top.named_parameters(prefix="top"), lr=B0)
    except TypeError:  # torch < 2.6 takes no named parameters
        pytest.skip("this torch's optimizers do not take named parameters")
    assert opt.param_groups[0]["param_names"] == ["top.weight", "top.bias"]
    unfreeze(model, "low.*", optimizer=opt, no_decay=False)
    assert opt.param_groups[1]["param_names"] == ["low.weight", "low.bias"]
    assert opt.state_dict()["param_groups"][1]["param_names"] == ["low.weight", "low.bias"]


def test_unfreeze_no_decay_split():
    model = nn.Sequential(OrderedDict(low=nn.Linear(2, 4), norm=nn.LayerNorm(4), top=nn.Linear(4, 2)))
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="top.*", lr=0.01, weight_decay=0.2)
    unfreeze(model, ["low.*", "norm.*"], optimizer=opt, lr=0.004)  # the default split: ndim <= 1
    layout = [([n for n, p in model.named_parameters() if any(p is q for q in g["params"])],
               g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert layout == [
        (["top.weight"], 0.01, 0.2), (["top.bias"], 0.01, 0.0),
        (["low.weight"], 0.004, 0.2), (["low.bias", "norm.weight", "norm.bias"], 0.004, 0.0),
    ]


def test_unfreeze_argument_errors():
    model = two_layer()
    freeze(model, "low.*")
    opt = torch.optim.SGD(model.top.parameters(), lr=B0)
    other = torch.optim.SGD(model.top.parameters(), lr=B0)
    with pytest.raises(ValueError, match="different optimizer"):
        unfreeze(model, "low.*", optimizer=opt, schedulers=[S.StepLR(other, 2)])
    with pytest.raises(TypeError, match=r"schedulers\[0\]"):
        unfreeze(model, "low.*", optimizer=opt, schedulers=[object()])
    with pytest.raises(TypeError, match="schedulers must be a sequence"):
        unfreeze(model, "low.*", optimizer=opt, schedulers=S.StepLR(opt, 2))
    with pytest.raises(ValueError, match="optimizer is None"):
        unfreeze(model, "low.*", lr=0.1)
    with pytest.raises(ValueError, match="optimizer is None"):
        unfreeze(model, "low.*", schedulers=[S.StepLR(opt, 2)])
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        unfreeze(model, "low.*", optimizer="sgd")
    with pytest.raises(ValueError, match="lr must be >= 0"):
        unfreeze(model, "low.*", optimizer=opt, lr=-1.0)
    with pytest.raises(ValueError, match="lr must be finite"):
        unfreeze(model, "low.*", optimizer=opt, lr=math.inf)
    assert len(opt.param_groups) == 1 and not model.low.weight.requires_grad  # errors came first


# ------------------------------------------------------------------------------------------ GradualUnfreezing
def conv_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv1d(2, 4, 3, padding=1), bn=nn.BatchNorm1d(4), act=nn.ReLU(),
        mid=nn.Conv1d(4, 4, 3, padding=1), bn2=nn.BatchNorm1d(4), act2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool1d(1), flat=nn.Flatten(), head=nn.Linear(4, 3)))


STAGES = [["mid.*", "bn2.*"], ["conv.*", "bn.*"]]


def test_gradual_unfreezing_stages_lrs_and_bn():
    model = conv_model(0)
    opt = partial_optimizer(model, torch.optim.SGD, trainable="head.*", lr=0.26, momentum=0.9, no_decay=False)
    gu = GradualUnfreezing(model, opt, STAGES, lr_factor=1 / 2.6)
    assert gu.num_stages == 2 and gu.state_dict() == {"stage": 0, "num_stages": 2, "groups_added": []}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    check = FrozenCheck(model)
    model.train()(torch.randn(4, 2, 5))
    check.verify()
    assert gu.step() == ["mid.weight", "mid.bias", "bn2.weight", "bn2.bias"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.26, 0.1])
    assert model.bn2.training and not model.bn.training
    assert gu.step() == ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.26, 0.1, 0.1 / 2.6])
    assert gu.step() == [] and len(opt.param_groups) == 3
    assert gu.state_dict() == {"stage": 2, "num_stages": 2, "groups_added": [1, 1]}
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(list(model.parameters())) == len({id(p) for p in held})


def test_gradual_unfreezing_argument_errors():
    model = conv_model(0)
    opt = partial_optimizer(model, torch.optim.SGD, trainable=["head.*", "mid.*"], lr=0.1)
    with pytest.raises(ValueError, match=r"stages\[0\] selects parameters that are already in the optimizer"):
        GradualUnfreezing(model, opt, STAGES)
    opt = partial_optimizer(model, torch.optim.SGD, trainable="head.*", lr=0.1)
    with pytest.raises(ValueError, match=r"stages\[1\]: pattern 'nope\.\*'"):
        GradualUnfreezing(model, opt, [["mid.*"], ["nope.*"]])
    with pytest.raises(TypeError, match="stages must be a non-empty sequence"):
        GradualUnfreezing(model, opt, "mid.*")
    with pytest.raises(TypeError, match="stages must be a non-empty sequence"):
        GradualUnfreezing(model, opt, [])
    with pytest.raises(TypeError, match=r"stages\[0\]\[0\]"):
        GradualUnfreezing(model, opt, [[1]])
    with pytest.raises(ValueError, match="lr_factor"):
        GradualUnfreezing(model, opt, STAGES, lr_factor=0.0)
    gu = GradualUnfreezing(model, opt, STAGES)
    with pytest.raises(ValueError, match="num_stages"):
        gu.load_state_dict({"stage": 1, "num_stages": 3, "groups_added": [1]})
    with pytest.raises(ValueError, match="stage"):
        gu.load_state_dict({"stage": 5, "num_stages": 2, "groups_added": [1] * 5})
    with pytest.raises(ValueError, match="lacks key"):
        gu.load_state_dict({"stage": 1})
    with pytest.raises(ValueError, match=r"groups_added'\]=\[1\] but replaying the stages added \[2\]"):
        gu.load_state_dict({"stage": 1, "num_stages": 2, "groups_added": [1]})  # saved run was built otherwise
    assert gu.stage == 1  # the replay happened before the mismatch showed
    with pytest.raises(ValueError, match="never re-frozen"):
        gu.load_state_dict({"stage": 0, "num_stages": 2, "groups_added": []})


# --------------------------------------------------------------------------- checkpoint after unfreeze: resume
RESUME_SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 1.0 / (1 + 0.3 * e)),
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=20),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=0.5),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=15, eta_min=1e-4),
}


def build(sched_name: str, seed: int):
    model = conv_model(seed)
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="head.*", lr=0.01, weight_decay=0.05,
                            layer_decay=0.5)
    sched = RESUME_SCHEDULERS[sched_name](opt)
    gu = GradualUnfreezing(model, opt, STAGES, schedulers=[sched], lr_factor=1 / 2.6)
    return model, opt, sched, gu


def train_steps(model, opt, sched, gu, start: int, stop: int, unfreeze_at=(4, 8)):
    for step in range(start, stop):
        if step in unfreeze_at:
            gu.step()
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(6, 2, 7, generator=g), torch.randint(0, 3, (6,), generator=g)
        model.train()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if isinstance(sched, S.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()


def checkpoint(model, opt, sched, gu) -> dict:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gu": json.dumps(gu.state_dict())}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("sched_name", sorted(RESUME_SCHEDULERS))
def test_checkpoint_after_unfreeze_resumes_bit_exact(sched_name):
    model, opt, sched, gu = build(sched_name, seed=0)
    check = FrozenCheck(model)
    train_steps(model, opt, sched, gu, 0, 8)
    assert gu.stage == 1
    frozen_stage = [n for n in check.changed() if n.startswith(("conv.", "bn."))]
    assert frozen_stage == []  # stage 2 (conv, bn) untouched while frozen, BN statistics included
    train_steps(model, opt, sched, gu, 8, 10)
    assert gu.stage == 2 and len(opt.param_groups) == 2 + 2 + 2
    ckpt = checkpoint(model, opt, sched, gu)
    train_steps(model, opt, sched, gu, 10, 15)  # uninterrupted

    model2, opt2, sched2, gu2 = build(sched_name, seed=123)  # different init: loading must do the work
    assert not torch.equal(model2.head.weight, model.head.weight)
    model2.load_state_dict(ckpt["model"])
    gu2.load_state_dict(json.loads(ckpt["gu"]))  # before the optimizer: re-creates the added groups
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert len(opt2.param_groups) == 6 and gu2.state_dict() == gu.state_dict()
    train_steps(model2, opt2, sched2, gu2, 10, 15)

    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(model.named_buffers(), model2.buffers()):
        assert torch.equal(a, b), n
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    assert sched.get_last_lr() == sched2.get_last_lr()
    assert [m.training for m in model.modules()] == [m.training for m in model2.modules()]


def test_loading_the_optimizer_before_gradual_unfreezing_fails_loudly():
    model, opt, sched, gu = build("LambdaLR", seed=0)
    train_steps(model, opt, sched, gu, 0, 10)
    ckpt = checkpoint(model, opt, sched, gu)
    model2, opt2, sched2, gu2 = build("LambdaLR", seed=0)
    model2.load_state_dict(ckpt["model"])
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt2.load_state_dict(ckpt["opt"])
    gu2.load_state_dict(json.loads(ckpt["gu"]))  # the documented order then works
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train_steps(model2, opt2, sched2, gu2, 10, 11)
