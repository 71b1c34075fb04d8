"""partial_optimizer: groups by identity, no-decay rules, layer-wise learning rates, errors."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from torch_pretrain_update import partial_optimizer


class Net(nn.Module):
    """Layers by the documented default: root params (bottom), embed, block0, block1, head (top); act has none."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 8))
        self.embed = nn.Linear(4, 8)
        self.block0 = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), norm=nn.LayerNorm(8)))
        self.act = nn.ReLU()
        self.block1 = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), bn=nn.BatchNorm1d(8)))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.cls_token
        h = self.act(self.block0(h))
        return self.head(self.act(self.block1(h)))


ALL = ["cls_token", "embed.weight", "embed.bias", "block0.fc.weight", "block0.fc.bias", "block0.norm.weight",
       "block0.norm.bias", "block1.fc.weight", "block1.fc.bias", "block1.bn.weight", "block1.bn.bias",
       "head.weight", "head.bias"]
# Written out by hand from the documented rule (every parameter with ndim <= 1).
NO_DECAY = {"embed.bias", "block0.fc.bias", "block0.norm.weight", "block0.norm.bias", "block1.fc.bias",
            "block1.bn.weight", "block1.bn.bias", "head.bias"}
DEPTH = {"cls_token": 4, "embed": 3, "block0": 2, "block1": 1, "head": 0}  # from the top, default layers


def group_of(opt: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_layer_decay_and_no_decay_give_documented_lrs():
    torch.manual_seed(0)
    model = Net()
    names = dict(model.named_parameters())
    assert list(names) == ALL
    trainable = ["cls_token", "embed.*", "block0.*", "block1.*", "head.*"]
    lr, wd, decay = 0.01, 0.05, 0.65
    opt = partial_optimizer(model, torch.optim.AdamW, trainable=trainable, lr=lr, weight_decay=wd,
                            layer_decay=decay)
    assert isinstance(opt, torch.optim.AdamW) and type(opt) is torch.optim.AdamW
    owner = group_of(opt)
    assert len(owner) == len(ALL)
    for name, p in names.items():
        g = owner[id(p)]
        expected_lr = lr * decay ** DEPTH[name.split(".")[0]]
        assert g["lr"] == pytest.approx(expected_lr, rel=1e-15), name
        assert g["weight_decay"] == (0.0 if name in NO_DECAY else wd), name
    # order: bottom layer first, decayed before no-decay inside a layer; empty groups left out
    layout = [([n for n, p in names.items() if any(p is q for q in g["params"])], g["weight_decay"])
              for g in opt.param_groups]
    assert layout == [
        (["cls_token"], wd),
        (["embed.weight"], wd), (["embed.bias"], 0.0),
        (["block0.fc.weight"], wd), (["block0.fc.bias", "block0.norm.weight", "block0.norm.bias"], 0.0),
        (["block1.fc.weight"], wd), (["block1.fc.bias", "block1.bn.weight", "block1.bn.bias"], 0.0),
        (["head.weight"], wd), (["head.bias"], 0.0),
    ]


def test_frozen_layers_still_count_for_depth_and_stay_out():
    model = Net()
    opt = partial_optimizer(model, torch.optim.SGD, trainable=["block1.*", "head.*"], lr=0.1, layer_decay=0.5,
                            momentum=0.9)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        assert p.requires_grad == (top in ("block1", "head")), name
        assert (id(p) in held) == p.requires_grad, name
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.05, 0.1]
    assert len(model.block1.bn._forward_pre_hooks) == 0  # block1.bn trains: no eval guard


def test_previously_frozen_parameters_become_trainable():
    model = Net()
    for p in model.parameters():
        p.requires_grad_(False)
    partial_optimizer(model, torch.optim.SGD, trainable="head.*", lr=0.1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_custom_layers():
    model = Net()
    layers = ["cls_token", "embed.*", ["block0.*", "block1.*"], "head.*"]
    opt = partial_optimizer(model, torch.optim.SGD, trainable="*", lr=1.0, layer_decay=0.5, layers=layers,
                            no_decay=False)
    owner = group_of(opt)
    depth = {"cls_token": 3, "embed": 2, "block0": 1, "block1": 1, "head": 0}
    for name, p in model.named_parameters():
        assert owner[id(p)]["lr"] == 0.5 ** depth[name.split(".")[0]], name
    assert len(opt.param_groups) == 4  # one per layer, no no-decay split
    # first matching entry wins: "*" first puts everything at the bottom
    opt = partial_optimizer(model, torch.optim.SGD, trainable="*", lr=1.0, layer_decay=0.5,
                            layers=["*", "head.*"], no_decay=False)
    assert [g["lr"] for g in opt.param_groups] == [0.5]


def test_custom_layers_errors():
    model = Net()
    with pytest.raises(ValueError, match=r"5 trainable parameter\(s\) belong to no layer, e.g. \['cls_token'"):
        partial_optimizer(model, torch.optim.SGD, trainable="*", lr=1.0, layer_decay=0.5, layers=["block*"])
    with pytest.raises(ValueError, match=r"layers\[1\].*'nope\.\*'"):
        partial_optimizer(model, torch.optim.SGD, trainable="*", lr=1.0, layer_decay=0.5,
                          layers=["*", "nope.*"])
    with pytest.raises(ValueError, match="layer_decay"):
        partial_optimizer(model, torch.optim.SGD, trainable="*", lr=1.0, layers=["*"])
    with pytest.raises(TypeError, match="layers"):
        partial_optimizer(model, torch.optim.SGD, trainable="*", lr=1.0, layer_decay=0.5, layers="head.*")


def test_no_decay_matching_rules():
    model = Net()
    names = dict(model.named_parameters())

    def nodecay(**kw):
        opt = partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3, **kw)
        owner = group_of(opt)
        return {n for n, p in names.items() if owner[id(p)]["weight_decay"] == 0.0}

    assert nodecay() == NO_DECAY == nodecay(no_decay=True)
    # patterns are globs on the whole name (fnmatchcase), added to the ndim <= 1 rule
    assert nodecay(no_decay="block0.*") == NO_DECAY | {"block0.fc.weight"}
    assert nodecay(no_decay=["cls_token"]) == NO_DECAY | {"cls_token"}
    assert nodecay(no_decay=["*_token", "head.weight"]) == NO_DECAY | {"cls_token", "head.weight"}
    assert nodecay(no_decay=False) == set()
    with pytest.raises(ValueError, match=r"no_decay: pattern 'cls' matches no parameter name.*'\*cls\*'"):
        nodecay(no_decay=["cls"])  # not a substring
    with pytest.raises(ValueError, match=r"no_decay: pattern '\*Token' matches no parameter"):
        nodecay(no_decay="*Token")  # case-sensitive
    with pytest.raises(TypeError, match="no_decay must be True.*got None"):
        nodecay(no_decay=None)
    with pytest.raises(ValueError, match="no_decay must contain at least one pattern"):
        nodecay(no_decay=())


def test_no_decay_mha_in_proj_bias_and_rmsnorm():
    model = nn.Sequential(OrderedDict(attn=nn.MultiheadAttention(8, 2), norm=nn.RMSNorm(8)))
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="*", lr=0.1, weight_decay=0.3)
    owner = group_of(opt)
    got = {n for n, p in model.named_parameters() if owner[id(p)]["weight_decay"] == 0.0}
    assert got == {"attn.in_proj_bias", "attn.out_proj.bias", "norm.weight"}


def test_optimizer_without_weight_decay_is_not_split():
    model = Net()
    opt = partial_optimizer(model, torch.optim.Rprop, trainable="*", lr=0.01)
    assert len(opt.param_groups) == 1 and "weight_decay" not in opt.param_groups[0]


def test_default_lr_is_scaled_when_lr_not_given():
    model = Net()
    opt = partial_optimizer(model, torch.optim.Adam, trainable=["block1.*", "head.*"], layer_decay=0.5,
                            no_decay=False)
    assert [g["lr"] for g in opt.param_groups] == [0.0005, 0.001]  # Adam's default lr is 1e-3


def test_same_trajectory_as_hand_built_optimizer():
    """Nothing is added to step(): bit-identical parameters after 10 steps against the hand-written recipe."""
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    opt_a = partial_optimizer(a, torch.optim.AdamW, trainable=["block1.*", "head.*"], lr=0.01, weight_decay=0.1)
    for n, p in b.named_parameters():
        p.requires_grad_(n.startswith(("block1.", "head.")))
    decay = [p for n, p in b.named_parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for n, p in b.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt_b = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.01,
                              weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(6, 4, generator=g)
        for m, o in ((a, opt_a), (b, opt_b)):
            m.train()
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(ba, bb), n


@pytest.mark.parametrize("bad", [object, "AdamW", nn.Linear, 3, torch.optim.lr_scheduler.StepLR])
def test_unknown_optimizer_class(bad):
    with pytest.raises(TypeError, match="optimizer_cls must be a torch.optim.Optimizer subclass"):
        partial_optimizer(Net(), bad, trainable="*")


def test_optimizer_instance_is_refused():
    model = Net()
    with pytest.raises(TypeError, match="optimizer_cls"):
        partial_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), trainable="*")


def test_trainable_errors():
    model = Net()
    with pytest.raises(ValueError, match=r"trainable: pattern 'encoder\.\*' matches no parameter"):
        partial_optimizer(model, torch.optim.SGD, trainable="encoder.*", lr=0.1)
    with pytest.raises(ValueError, match=r"trainable: pattern 'nope'"):
        partial_optimizer(model, torch.optim.SGD, trainable=["head.*", "nope"], lr=0.1)
    with pytest.raises(ValueError, match="trainable must contain at least one pattern"):
        partial_optimizer(model, torch.optim.SGD, trainable=[], lr=0.1)
    with pytest.raises(TypeError, match="trainable"):
        partial_optimizer(model, torch.optim.SGD, trainable=3, lr=0.1)
    with pytest.raises(TypeError, match=r"trainable\[1\]"):
        partial_optimizer(model, torch.optim.SGD, trainable=["head.*", None], lr=0.1)
    with pytest.raises(TypeError, match="no_decay"):
        partial_optimizer(model, torch.optim.SGD, trainable="*", lr=0.1, no_decay=5)
    with pytest.raises(TypeError, match="model"):
        partial_optimizer([], torch.optim.SGD, trainable="*")
    assert all(p.requires_grad for p in model.parameters())  # no error left the model half-frozen


@pytest.mark.parametrize("bad,exc", [(0.0, ValueError), (1.5, ValueError), (-0.5, ValueError),
                                     (float("nan"), ValueError), ("0.5", TypeError)])
def test_layer_decay_errors(bad, exc):
    with pytest.raises(exc, match="layer_decay"):
        partial_optimizer(Net(), torch.optim.SGD, trainable="*", lr=0.1, layer_decay=bad)


def test_fully_frozen_batchnorm_is_guarded_trainable_one_is_not():
    model = Net()
    partial_optimizer(model, torch.optim.SGD, trainable="head.*", lr=0.1)
    model.train()
    rm = model.block1.bn.running_mean.clone()
    model(torch.randn(5, 4))
    assert torch.equal(model.block1.bn.running_mean, rm)
    partial_optimizer(model, torch.optim.SGD, trainable=["block1.*", "head.*"], lr=0.1)
    model.train()
    model(torch.randn(5, 4))
    assert not torch.equal(model.block1.bn.running_mean, rm)
