"""freeze / unfreeze / FrozenCheck: frozen really means frozen (parameters, BatchNorm statistics), by identity."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from torch_pretrain_update import FrozenCheck, freeze, partial_optimizer, unfreeze

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
SHAPE = {1: (8, 3, 10), 2: (8, 3, 6, 6), 3: (4, 3, 4, 4, 4)}


def conv_net(dim: int, sync: bool = False) -> nn.Module:
    model = nn.Sequential(OrderedDict(
        stem_conv=CONV[dim](3, 4, 3, padding=1),
        stem_bn=BN[dim](4),
        act=nn.ReLU(),
        conv=CONV[dim](4, 4, 3, padding=1),
        bn=BN[dim](4),
        act2=nn.ReLU(),
        pool=POOL[dim](1),
        flat=nn.Flatten(),
        head=nn.Linear(4, 3),
    ))
    with torch.no_grad():  # non-trivial running stats, so "uses running stats" differs from "uses batch stats"
        for m in (model.stem_bn, model.bn):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def batches(n: int, shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(shape, generator=g) * 2 + 0.5, torch.randint(0, 3, (shape[0],), generator=g)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw_wd": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dim,sync", [(1, False), (2, False), (3, False), (2, True)])
def test_frozen_params_and_bn_stats_bit_identical_after_20_train_steps(dim, sync, opt_name):
    torch.manual_seed(dim)
    model = conv_net(dim, sync)
    frozen = freeze(model, ["stem_conv.*", "stem_bn.*"])
    assert frozen == ["stem_conv.weight", "stem_conv.bias", "stem_bn.weight", "stem_bn.bias"]
    bn_cls = nn.SyncBatchNorm if sync else BN[dim]
    assert type(model.stem_bn) is bn_cls
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[opt_name](trainable)
    check = FrozenCheck(model)
    assert set(check.names) == {
        "stem_conv.weight", "stem_conv.bias", "stem_bn.weight", "stem_bn.bias",
        "stem_bn.running_mean", "stem_bn.running_var", "stem_bn.num_batches_tracked",
    }
    before = snapshot(model)
    seen_modes: list[bool] = []
    model.stem_bn.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    for x, y in batches(20, SHAPE[dim]):
        model.train()  # every step, as a training loop does
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = snapshot(model)
    assert seen_modes == [False] * 20
    for k in ("stem_conv.weight", "stem_conv.bias", "stem_bn.weight", "stem_bn.bias",
              "stem_bn.running_mean", "stem_bn.running_var", "stem_bn.num_batches_tracked"):
        assert torch.equal(before[k], after[k]), k
    for k in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
              "head.weight", "head.bias"):
        assert not torch.equal(before[k], after[k]), k
    assert int(after["bn.num_batches_tracked"]) == 20
    check.verify()
    assert check.changed() == []


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_frozen_bn_normalises_with_running_stats_in_train_mode(dim):
    torch.manual_seed(10 + dim)
    model = conv_net(dim)
    freeze(model, "stem_*")
    model.train()
    captured = {}
    model.stem_bn.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach(), y=o.detach()))
    x, _ = next(batches(1, SHAPE[dim], seed=3))
    model(x)
    bn = model.stem_bn
    shape = (1, -1) + (1,) * dim
    xin = captured["x"].double().numpy()
    rm = bn.running_mean.double().numpy().reshape(shape)
    rv = bn.running_var.double().numpy().reshape(shape)
    w = bn.weight.detach().double().numpy().reshape(shape)
    b = bn.bias.detach().double().numpy().reshape(shape)
    expected = (xin - rm) / np.sqrt(rv + bn.eps) * w + b  # eval-mode formula, recomputed in float64
    np.testing.assert_allclose(captured["y"].double().numpy(), expected, rtol=1e-5, atol=1e-5)
    batch_mean = xin.mean(axis=tuple(i for i in range(xin.ndim) if i != 1), keepdims=True)
    assert not np.allclose(rm, batch_mean, atol=1e-2)  # so the check above tells the two apart


def test_naive_requires_grad_false_moves_and_frozencheck_names_it():
    """The mistake the module exists for: requires_grad=False alone, with zero grads left in the optimizer."""
    for make in OPTIMIZERS.values():
        torch.manual_seed(0)
        model = conv_net(2)
        opt = make(list(model.parameters()))
        x, y = next(batches(1, SHAPE[2]))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for p in list(model.stem_conv.parameters()) + list(model.stem_bn.parameters()):
            p.requires_grad_(False)  # naive freezing
        opt.zero_grad(set_to_none=False)  # grads stay as zero tensors
        check = FrozenCheck(model)
        model.train()
        for x, y in batches(3, SHAPE[2], seed=1):
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        changed = set(check.changed())
        assert {"stem_conv.weight", "stem_bn.running_mean", "stem_bn.running_var"} <= changed
        with pytest.raises(RuntimeError, match="stem_conv.weight"):
            check.verify()


def test_freeze_stops_parameters_that_stay_in_an_existing_optimizer():
    for make in OPTIMIZERS.values():
        torch.manual_seed(0)
        model = conv_net(2)
        opt = make(list(model.parameters()))  # holds the frozen parameters too
        x, y = next(batches(1, SHAPE[2]))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        freeze(model, ["stem_conv.*", "stem_bn.*"])  # drops .grad, so the optimizer skips them
        assert all(p.grad is None for p in model.stem_conv.parameters())
        check = FrozenCheck(model)
        for x, y in batches(5, SHAPE[2], seed=1):
            model.train()
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        check.verify()


def test_equal_valued_parameters_right_one_trains():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(3, 3), b=nn.Linear(3, 3)))
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)
        model.a.bias.zero_()
        model.b.bias.zero_()
    assert torch.equal(model.a.bias, model.b.bias) and torch.equal(model.a.weight, model.b.weight)
    opt = partial_optimizer(model, torch.optim.SGD, trainable="b.*", lr=0.1, momentum=0.9, weight_decay=0.1)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == 2 and held[0] is model.b.weight and held[1] is model.b.bias
    assert not any(p is model.a.bias or p is model.a.weight for p in held)
    for x, _ in batches(5, (4, 3)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert torch.equal(model.a.bias, torch.zeros(3))
    assert not torch.equal(model.b.bias, torch.zeros(3))
    assert not torch.equal(model.a.weight, model.b.weight)


def test_freeze_returns_names_and_sets_flags():
    model = conv_net(1)
    assert freeze(model, "head.*") == ["head.weight", "head.bias"]
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["head.weight", "head.bias"]
    names = freeze(model)
    assert names == [n for n, _ in model.named_parameters()]
    assert not any(p.requires_grad for p in model.parameters())
    assert unfreeze(model, ["conv.weight", "bn.*"]) == ["conv.weight", "bn.weight", "bn.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["conv.weight", "bn.weight", "bn.bias"]


def test_shared_parameter_matched_by_any_alias_reported_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5)
            self.head.weight = self.embed.weight

    model = Tied()
    assert freeze(model, "head.*") == ["embed.weight", "head.bias"]
    assert not model.embed.weight.requires_grad


@pytest.mark.parametrize("bad", [5, b"head.*", {"head.*"}, ["head.*", 3], None])
def test_pattern_type_errors(bad):
    model = conv_net(1)
    if bad is None:  # None means "all" for freeze, but not for trainable
        with pytest.raises(TypeError, match="trainable"):
            partial_optimizer(model, torch.optim.SGD, trainable=bad, lr=0.1)
        return
    with pytest.raises(TypeError, match="patterns"):
        freeze(model, bad)
    with pytest.raises(TypeError, match="patterns"):
        unfreeze(model, bad)


def test_pattern_value_errors_name_the_pattern():
    model = conv_net(1)
    with pytest.raises(ValueError, match=r"'nothing\.\*'.*names look like 'stem_conv.weight'"):
        freeze(model, ["head.*", "nothing.*"])
    assert all(p.requires_grad for p in model.parameters())  # nothing changed on error
    with pytest.raises(ValueError, match=r"'head'.*did you mean 'head\.\*'"):
        unfreeze(model, "head")
    with pytest.raises(ValueError, match="at least one pattern"):
        freeze(model, [])
    with pytest.raises(TypeError, match="model"):
        freeze("model")
    with pytest.raises(TypeError, match="bn_stats"):
        freeze(model, bn_stats=1)


def test_glob_matches_across_dots_and_is_case_sensitive():
    model = conv_net(1)
    assert freeze(model, "*bn.b?as") == ["stem_bn.bias", "bn.bias"]
    with pytest.raises(ValueError, match="HEAD"):
        freeze(model, "HEAD.*")


def test_guard_survives_train_state_dict_roundtrip_deepcopy_and_pickle():
    torch.manual_seed(0)
    model = conv_net(2)
    freeze(model, "stem_bn.*")
    model.load_state_dict(snapshot(model))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    model.load_state_dict(torch.load(buf, weights_only=True))
    copies = [model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for m in copies:
        m.train()
        rm = m.stem_bn.running_mean.clone()
        x, _ = next(batches(1, SHAPE[2]))
        m(x)
        assert torch.equal(m.stem_bn.running_mean, rm)
        assert int(m.stem_bn.num_batches_tracked) == 0
        assert m.stem_bn.training is False and m.bn.training is True
        assert int(m.bn.num_batches_tracked) == 1


def test_unfreeze_lifts_the_guard_and_stats_update_again():
    torch.manual_seed(0)
    model = conv_net(2)
    freeze(model, "stem_bn.*")
    freeze(model, "stem_bn.*")  # idempotent: one hook
    assert len(model.stem_bn._forward_pre_hooks) == 1
    model.train()
    unfreeze(model, "stem_bn.weight")  # one trainable parameter is enough to train the layer
    assert len(model.stem_bn._forward_pre_hooks) == 0
    assert model.stem_bn.training is True
    rm = model.stem_bn.running_mean.clone()
    model(next(batches(1, SHAPE[2]))[0])
    assert not torch.equal(model.stem_bn.running_mean, rm)
    model.eval()
    freeze(model, "stem_bn.*")
    unfreeze(model, "stem_bn.*")
    assert model.stem_bn.training is False  # follows the model's mode (eval here)


def test_bn_guard_only_when_all_params_frozen_and_bn_stats_flag():
    torch.manual_seed(0)
    model = conv_net(1)
    freeze(model, "stem_bn.weight")  # bias still trainable: stats keep training
    model.train()
    rm = model.stem_bn.running_mean.clone()
    model(next(batches(1, SHAPE[1]))[0])
    assert not torch.equal(model.stem_bn.running_mean, rm)
    freeze(model, "stem_bn.*", bn_stats=False)
    rm = model.stem_bn.running_mean.clone()
    model(next(batches(1, SHAPE[1]))[0])
    assert not torch.equal(model.stem_bn.running_mean, rm)
    freeze(model, "stem_bn.bias")  # now every parameter of stem_bn is frozen and this call touched it
    rm = model.stem_bn.running_mean.clone()
    model(next(batches(1, SHAPE[1]))[0])
    assert torch.equal(model.stem_bn.running_mean, rm)


def test_affine_false_batchnorm_selected_by_buffer_names_or_all():
    def make():
        return nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), bn=nn.BatchNorm1d(4, affine=False),
                                         head=nn.Linear(4, 2)))

    x = torch.randn(8, 4)
    for patterns in (None, "bn.*", ["fc.*", "bn.running_mean"]):
        model = make().train()
        assert freeze(model, patterns) == ([n for n, _ in model.named_parameters()] if patterns is None
                                           else [] if patterns == "bn.*" else ["fc.weight", "fc.bias"])
        check = FrozenCheck(model)
        assert "bn.running_var" in check.names
        model(x)
        check.verify()
        unfreeze(model, "bn.*")
        model.train()(x)
        assert check.changed() == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    model = make().train()
    freeze(model, "fc.*")  # the parameter-less BN is not selected: it keeps tracking
    model(x)
    assert int(model.bn.num_batches_tracked) == 1


@pytest.mark.timeout(120)
def test_frozen_syncbatchnorm_in_a_gloo_group(tmp_path):
    """In an initialised process group a training-mode SyncBatchNorm insists on GPU input; a frozen one runs in
    eval mode (no sync, running statistics) whatever model.train() says."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = conv_net(2, sync=True).train()
        x, y = next(batches(1, SHAPE[2]))
        with pytest.raises(ValueError, match="GPU"):
            model(x)
        freeze(model, ["stem_bn.*", "bn.*"])
        check = FrozenCheck(model)
        model.train()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        check.verify()
        assert model.stem_bn.training is False and model.bn.training is False
    finally:
        dist.destroy_process_group()


def test_frozencheck_bitwise_semantics():
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
        model.weight.zero_()
    freeze(model)
    check = FrozenCheck(model)
    check.verify()  # NaN compared bitwise: unchanged
    with torch.no_grad():
        model.weight.neg_()  # 0.0 -> -0.0: equal by value, not by bits
    assert check.changed() == ["weight"]
    with pytest.raises(RuntimeError, match=r"1 frozen tensor\(s\) changed.*weight"):
        check.verify()


def test_frozencheck_covers_buffers_of_fully_frozen_modules_only():
    model = conv_net(1)
    freeze(model, ["stem_conv.*", "stem_bn.*", "conv.*"])
    names = FrozenCheck(model).names
    assert "stem_bn.running_mean" in names and "bn.running_mean" not in names
    assert "conv.weight" in names and "head.weight" not in names
    with pytest.raises(TypeError, match="model"):
        FrozenCheck(object())
