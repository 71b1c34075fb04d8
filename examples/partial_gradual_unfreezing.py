"""Fine-tune a small "pretrained" network top-down: ULMFiT-style gradual unfreezing with discriminative LRs.

Only the head trains in epoch 0; each later epoch unfreezes the next block down, with a learning rate 2.6 times
lower than the one above (``lr_factor=1/2.6``). Biases and normalisation weights get no weight decay, frozen
BatchNorm layers keep their running statistics, and a FrozenCheck proves that nothing frozen moved. At the end the
run is checkpointed and resumed into freshly built objects. Random data, CPU, a few seconds::

    python examples/partial_gradual_unfreezing.py
"""

from __future__ import annotations

import io
from collections import OrderedDict

import torch
from torch import nn

from torch_pretrain_update import FrozenCheck, GradualUnfreezing, partial_optimizer

STAGES = [["block2.*"], ["block1.*"], ["block0.*"]]  # unfreezing order: top to bottom
EPOCHS, STEPS = 4, 8


def block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1), bn=nn.BatchNorm2d(c_out),
                                     act=nn.ReLU()))


def build(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        block0=block(3, 8), block1=block(8, 16), block2=block(16, 16),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, 4)))
    opt = partial_optimizer(model, torch.optim.AdamW, trainable="head.*", lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.97 ** step)
    gu = GradualUnfreezing(model, opt, STAGES, schedulers=[sched], lr_factor=1 / 2.6)
    return model, opt, sched, gu


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def train_epoch(model, opt, sched, epoch: int) -> float:
    model.train()
    total = 0.0
    for i in range(STEPS):
        x, y = batch(epoch * STEPS + i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / STEPS


def main() -> int:
    model, opt, sched, gu = build(seed=0)
    for epoch in range(EPOCHS):
        if epoch > 0:
            names = gu.step()
            print(f"epoch {epoch}: unfroze {len(names)} tensors ({names[0].split('.')[0]})")
        check = FrozenCheck(model)  # everything frozen right now must stay bit-identical this epoch
        loss = train_epoch(model, opt, sched, epoch)
        check.verify()
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lrs = ", ".join(f"{g['lr']:.2e}" for g in opt.param_groups)
        print(f"epoch {epoch}: loss {loss:.3f}, {n_train} trainable params, {len(check.names)} frozen tensors "
              f"verified, group lrs [{lrs}]")

    # checkpoint, then resume into new objects: GradualUnfreezing loads before the optimizer
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gu": gu.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2, gu2 = build(seed=1)
    model2.load_state_dict(ckpt["model"])
    gu2.load_state_dict(ckpt["gu"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train_epoch(model, opt, sched, EPOCHS)
    train_epoch(model2, opt2, sched2, EPOCHS)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    print(f"resumed run equals the uninterrupted one bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
