"""One rank of the 2-process Lightning DDP run of tests/integrations/test_integrations.py
(started by ``torchrun``, gloo on CPU).

Three fits in the same processes, each rank writing what it saw to ``<out>/rank<r>.json``:

- ``recipe``: the documented recipe (``use_distributed_sampler=False``, the sampler made in ``train_dataloader()``,
  freezing in ``setup()``, ``partial_optimizer`` in ``configure_optimizers``, KD from a frozen teacher,
  :class:`PretrainUpdateCallback`): the indices each rank trained on per epoch and the parameters at the end.
- ``wrapped``: Lightning's default ``use_distributed_sampler=True``: the error the callback raises.
- ``late_freeze`` (only with ``--late-freeze``): ``partial_optimizer`` alone in ``configure_optimizers``, i.e.
  freezing after DDP wrapped the module: the error DDP raises.

    python tests/_lightning_ddp.py OUT_DIR [--late-freeze]     # forks the 2 ranks itself
    torchrun --nproc_per_node=2 tests/_lightning_ddp.py OUT_DIR [--late-freeze]

Run as a plain script it imports Lightning once and forks both ranks with the environment ``torchrun`` gives its
ranks (Lightning then starts no processes of its own): on 2 busy cores that saves two of the three ~10 s imports
of Lightning that ``torchrun`` or Lightning's own launcher cost.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_pretrain_update as tpu
from torch_pretrain_update.integrations.lightning import PretrainUpdateCallback

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

N, EPOCHS, BATCH = 100, 2, 10
TRAINABLE = ["2.*"]  # the head of the student below
LABELS = torch.tensor([0] * 40 + [1] * 30 + [2] * 20 + [3] * 10)


def sampler_for_plan() -> tpu.ClassBalancedSampler:
    """25 of each class: a plan of 100 indices, 50 per rank on 2 ranks."""
    return tpu.ClassBalancedSampler(LABELS, samples_per_class=25, seed=7)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Update(pl.LightningModule):
    def __init__(self, late_freeze: bool = False) -> None:
        super().__init__()
        self.student, self.teacher = mlp(0), mlp(1)
        self.kd = tpu.KDLoss(temperature=2.0, alpha=0.5)
        self.late_freeze = late_freeze
        self.seen: dict[int, list[int]] = {}
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(N, 4, generator=g), LABELS, torch.arange(N))

    def setup(self, stage: str) -> None:
        tpu.freeze(self.teacher)
        if not self.late_freeze:  # the recipe: freeze before the strategy wraps the module in DDP
            tpu.freeze(self.student)
            tpu.unfreeze(self.student, TRAINABLE)

    def configure_optimizers(self):
        return tpu.partial_optimizer(self.student, torch.optim.SGD, trainable=TRAINABLE, lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=BATCH, sampler=sampler_for_plan())

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.kd(self.student(x), teacher_logits, y)


def fit(module: pl.LightningModule, **trainer_kw) -> None:
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=EPOCHS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[PretrainUpdateCallback()], **trainer_kw)
    trainer.fit(module)


def error_of(module: pl.LightningModule, **trainer_kw) -> str:
    try:
        fit(module, **trainer_kw)
    except Exception as exc:  # noqa: BLE001 - the point is to report it
        return f"{type(exc).__name__}: {exc}"
    return ""


def run_rank() -> None:
    out, late = sys.argv[1], "--late-freeze" in sys.argv[2:]
    rank = int(os.environ["RANK"])
    result: dict = {}
    module = Update()
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    fit(module, use_distributed_sampler=False)
    result["seen"] = {str(e): v for e, v in module.seen.items()}
    result["params"] = {k: v.tolist() for k, v in module.student.state_dict().items()}
    result["changed"] = sorted(k for k, v in module.student.state_dict().items() if not torch.equal(v, before[k]))
    result["wrapped"] = error_of(Update())  # Lightning's default use_distributed_sampler=True
    if late:
        result["late_freeze"] = error_of(Update(late_freeze=True), use_distributed_sampler=False)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def forked_rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GROUP_RANK="0", NODE_RANK="0")
    run_rank()


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        run_rank()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=forked_rank, args=(r, port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(p.exitcode or 0 for p in procs))


if __name__ == "__main__":
    main()
