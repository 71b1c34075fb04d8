"""From shards on disk to an updated model, for new data too big for memory, with exact resume.

An old model was trained on clean digits. New data has drifted (lower contrast, noise); here it is small, but it
goes the way data too big for memory must: written once into WebDataset tar shards, then read by index.

1. ``write_shards``: the new data as tar shards with a manifest (per-shard counts, class histogram, the index
   that random access needs).
2. ``ShardDataset``: a map-style dataset over the shards; ``ds[i]`` is one positioned read, and ``ds.labels``
   is there without reading a sample.
3. ``score_dataset``: the old model's uncertainty (entropy) for every sample. Under ``torchrun`` each rank scores
   its share of the batches and every rank gets all N scores, bit-exact with one process.
4. ``EntropySampler.from_scores``: the selection, the most uncertain half of the budget plus a random half.
5. ``ClassBalancedSampler`` over the selection (``torch.utils.data.Subset`` + the selection's labels, no data
   copied; or ``ClassBalancedSampler(ds.labels, indices=selected)`` on the whole dataset, the same plan):
   every class equally often in each epoch.
6. Partial update: ``freeze`` the head, ``partial_optimizer`` over the layers below it (the features that the drift
   moved), ``KDLoss`` against the old model so that what it knew is kept; ``FrozenCheck`` proves the head never
   moved. Accuracies on clean and drifted test digits are printed as measured (nothing tuned).
7. Checkpoint and resume: a run stopped mid-epoch saves the ``StatefulDataLoader`` state (plain JSON), the model
   and the optimizer; fresh objects load them and finish. The resumed run trains on exactly the batches of an
   unbroken run, so the final weights are bit-for-bit the same.

    python examples/shards_to_update.py
    torchrun --nproc_per_node=2 examples/shards_to_update.py   # gloo on CPU: scoring and training split by rank

Under ``torchrun`` rank 0 writes the shards, every rank reads them; the samplers take rank and world size from the
process group, the student trains inside ``DistributedDataParallel`` (wrapped after ``partial_optimizer``, so DDP
sees only the trainable parameters), and each rank checkpoints its own loader state. Each rank then takes half of
an epoch's batches, so the same number of epochs is half the optimizer steps (and a smaller gain).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Subset
from torchdata.stateful_dataloader import StatefulDataLoader

import torch_pretrain_update as tpu

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 calls it itself
torch.set_num_threads(1)
SEED, BUDGET, EPOCHS, STOP_EPOCH, STOP_AFTER = 0, 400, 2, 1, 4  # the crash: after 4 batches of the second epoch
TRAINABLE = ["body.*", "hidden.*"]


def load_data():
    """Clean digits (the old data) and the same digits drifted: lower contrast, brighter, noisy."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    rng = np.random.default_rng(SEED)
    drifted = np.clip(x * 0.6 + 0.25 + rng.normal(0.0, 0.2, x.shape), 0.0, 1.0).astype(np.float32)
    perm = rng.permutation(len(x))
    old, new, test = perm[:600], perm[600:1500], perm[1500:]
    return x, drifted, digits.target, old, new, test


def mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(
        flat=nn.Flatten(), body=nn.Sequential(nn.Linear(64, 48), nn.ReLU()),
        hidden=nn.Sequential(nn.Linear(48, 48), nn.ReLU()), head=nn.Linear(48, 10)))


def pretrain(x: np.ndarray, y: np.ndarray) -> nn.Module:
    """Stands in for 'load the pretrained checkpoint': full-batch Adam, deterministic on CPU."""
    torch.manual_seed(SEED)
    model, xt, yt = mlp(), torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


class Run(NamedTuple):
    sampler: tpu.ClassBalancedSampler
    loader: StatefulDataLoader
    student: nn.Module
    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer


def build(subset: Subset, labels: np.ndarray, old_model: nn.Module, ddp: bool) -> Run:
    """What a training process creates at start-up."""
    balanced = tpu.ClassBalancedSampler(labels, samples_per_class="max", seed=SEED)  # ranks from the process group
    loader = StatefulDataLoader(subset, sampler=balanced, batch_size=32, num_workers=2)
    student = copy.deepcopy(old_model).train()
    tpu.freeze(student, "head.*")  # partial_optimizer would freeze it too; DDP must not see it either
    opt = tpu.partial_optimizer(student, torch.optim.AdamW, trainable=TRAINABLE, lr=1e-2, weight_decay=0.01)
    model = nn.parallel.DistributedDataParallel(student) if ddp else student  # after freezing: DDP sees the rest
    return Run(balanced, loader, student, model, opt)


def train(run: Run, kd: tpu.KDLoss, old_model: nn.Module, start_epoch: int = 0,
          stop: tuple[int, int] | None = None) -> list[int]:
    """Train up to ``EPOCHS``; with ``stop=(epoch, batches)`` return after that many batches of that epoch."""
    seen = []
    for epoch in range(start_epoch, EPOCHS):
        run.sampler.set_epoch(epoch)
        for i, batch in enumerate(run.loader):
            x = batch["npy"]
            with torch.no_grad():
                teacher_logits = old_model(x)
            loss = kd(run.model(x), teacher_logits, batch["cls"])
            run.opt.zero_grad()
            loss.backward()
            run.opt.step()
            seen += batch["__index__"].tolist()  # the shard dataset's global indices
            if stop == (epoch, i + 1):
                return seen
    return seen


def main() -> None:
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank() if ddp else 0
    x, xd, y, old_idx, new_idx, test_idx = load_data()
    old_model = pretrain(x[old_idx], y[old_idx])
    tpu.freeze(old_model)

    tmp = tempfile.mkdtemp() if rank == 0 else None
    if ddp:
        shared = [tmp]
        dist.broadcast_object_list(shared)  # rank 0's folder: the shards are written once
        tmp = shared[0]
    assert tmp is not None
    manifest = os.path.join(tmp, "new-manifest.json")
    if rank == 0:  # 1. shards: in real life the new data arrives as files far bigger than memory
        samples = ({"__key__": f"new-{i:05d}", "npy": xd[i], "cls": int(y[i])} for i in new_idx)
        manifest = tpu.write_shards(samples, os.path.join(tmp, "new-%06d.tar"), maxcount=100)
    if ddp:
        dist.barrier()

    ds = tpu.ShardDataset(manifest)  # 2. random access; labels without reading a sample
    print(f"[rank {rank}] {len(ds)} new samples in {len(ds.urls)} shards; class counts "
          f"{np.bincount(ds.labels, minlength=10).tolist()}")

    # 3. one scoring pass over the shards (each rank its share of the batches under torchrun)
    scores = tpu.score_dataset(old_model, ds, score="entropy", batch_size=128, input_key="npy")
    # 4. selection: the same on every rank (same scores, seed); num_replicas=1 gives the whole selection
    picker = tpu.EntropySampler.from_scores(scores, BUDGET, random_fraction=0.5, seed=SEED, shuffle=False,
                                            num_replicas=1, rank=0)
    selected = np.array(list(picker))
    labels = ds.labels[selected]
    print(f"[rank {rank}] selected {len(selected)}: class counts {np.bincount(labels, minlength=10).tolist()}")

    # 5.-6. balance within the selection (sampler indices are positions in the Subset), partial update + KD
    subset = Subset(ds, selected.tolist())
    plan = list(tpu.ClassBalancedSampler(labels, samples_per_class="max", seed=SEED, num_replicas=1, rank=0))
    drawn = np.bincount(labels[plan], minlength=10)
    assert len(set(drawn.tolist())) == 1, drawn  # one epoch's plan (all ranks together): every class equally often
    # the same plan without a Subset: indices= balances those dataset indices and yields dataset indices
    direct = tpu.ClassBalancedSampler(ds.labels, indices=selected, samples_per_class="max", seed=SEED,
                                      num_replicas=1, rank=0)
    assert list(direct) == selected[plan].tolist()
    kd = tpu.KDLoss(temperature=2.0, alpha=0.5)
    unbroken = build(subset, labels, old_model, ddp)
    check = tpu.FrozenCheck(unbroken.student)
    seen_unbroken = train(unbroken, kd, old_model)
    check.verify()  # raises if a frozen parameter moved
    if not ddp:
        assert seen_unbroken[: len(plan)] == selected[plan].tolist()
    final = [p.detach().clone() for p in unbroken.student.parameters()]

    # 7. the same run stopped mid-epoch, checkpointed, resumed by fresh objects
    crashed = build(subset, labels, old_model, ddp)
    seen = train(crashed, kd, old_model, stop=(STOP_EPOCH, STOP_AFTER))
    ckpt = os.path.join(tmp, f"ckpt-rank{rank}.pt")
    torch.save({"loader": json.dumps(crashed.loader.state_dict()), "model": crashed.student.state_dict(),
                "opt": crashed.opt.state_dict(), "epoch": STOP_EPOCH}, ckpt)
    del crashed
    resumed = build(subset, labels, old_model, ddp)  # a new process would start here
    state = torch.load(ckpt, weights_only=True)
    resumed.loader.load_state_dict(json.loads(state["loader"]))
    resumed.student.load_state_dict(state["model"])
    resumed.opt.load_state_dict(state["opt"])
    seen += train(resumed, kd, old_model, start_epoch=state["epoch"])
    assert seen == seen_unbroken, "the resumed run trained on other samples than the unbroken one"
    assert all(torch.equal(a, b) for a, b in zip(resumed.student.parameters(), final)), "final weights differ"

    updated = resumed.student.eval()
    for name, data in (("clean", x), ("drifted", xd)):
        print(f"[rank {rank}] {name} test digits: old model {accuracy(old_model, data[test_idx], y[test_idx]):.3f}, "
              f"updated {accuracy(updated, data[test_idx], y[test_idx]):.3f}")
    print(f"[rank {rank}] resumed run == unbroken run ({len(seen)} samples), final weights identical")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(tmp)


if __name__ == "__main__":  # DataLoader workers re-import this file under the spawn start method
    main()
