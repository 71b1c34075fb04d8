# test_examples: skip  (needs torchrun; tests/test_distributed.py launches it with 2 processes)
"""A complete DDP update on 2 processes: score -> EntropySampler -> partial_optimizer -> KDLoss.

A student was pretrained on digits 0-6 only; new, unlabelled-by-the-student data holds all ten digits and a
teacher trained on all of them is available. The update, run by every rank:

1. ``score_dataset``: each rank scores half of the new pool with the student; every rank gets all the scores.
2. ``EntropySampler.from_scores``: the same plan on every rank (same scores, same seed); each rank iterates its
   share (rank and world size come from the process group), half the most uncertain samples, half at random.
3. ``partial_optimizer``: only the top of the student trains; ``FrozenCheck`` proves the rest never moved.
4. ``KDLoss`` distils the teacher into the student inside ``DistributedDataParallel`` (gloo, CPU).

At the end the ranks compare their parameters (they must be identical) and rank 0 prints the accuracies
measured before and after. Runs in seconds on scikit-learn's digits:

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from torch_pretrain_update import EntropySampler, FrozenCheck, KDLoss, partial_optimizer, score_dataset

SEED = 0  # the same on every rank (see broadcast_seed for seeds that are not constants)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """Full-batch training, deterministic on CPU: stands in for 'load the pretrained checkpoint'."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def same_on_all_ranks(model: nn.Module) -> bool:
    flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    old_idx, pool_idx, test_idx = perm[:600], perm[600:1400], perm[1400:]
    old_idx = old_idx[y[old_idx] < 7]  # the student's pretraining data: digits 0-6 only

    torch.manual_seed(SEED)  # identical initial weights on every rank
    teacher = fit(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), x[perm[:600]], y[perm[:600]], 150)
    student = nn.Sequential(
        OrderedDict(
            backbone=nn.Sequential(nn.Linear(64, 32), nn.ReLU()),
            hidden=nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
            head=nn.Linear(32, 10),
        )
    )
    fit(student, x[old_idx], y[old_idx], 150)
    before = accuracy(student, x[test_idx], y[test_idx])
    before_new = accuracy(student, x[test_idx][y[test_idx] >= 7], y[test_idx][y[test_idx] >= 7])

    pool = TensorDataset(x[pool_idx], y[pool_idx])
    # 1. every rank scores its share of the pool; all get the full, identical vector
    scores = score_dataset(student, pool, score="entropy", batch_size=100)
    # 2. the same plan everywhere; this rank's share of it (rank and world size from the process group)
    sampler = EntropySampler.from_scores(scores, 320, random_fraction=0.5, seed=SEED)
    # 3. train the top two layers only (before wrapping in DDP: DDP then syncs only the trainable ones)
    optimizer = partial_optimizer(student, torch.optim.AdamW, trainable=["hidden.*", "head.*"], lr=3e-2)
    frozen = FrozenCheck(student)
    model = DistributedDataParallel(student)
    kd = KDLoss(temperature=4.0, alpha=0.7)

    steps = 0
    for epoch in range(8):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in DataLoader(pool, batch_size=32, sampler=sampler):
            with torch.no_grad():
                t = teacher(xb)
            loss = kd(model(xb), t, yb)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
            steps += 1

    frozen.verify()  # raises naming any frozen tensor that moved
    if not same_on_all_ranks(student):
        raise SystemExit(f"rank {rank}: parameters differ across ranks")
    student.eval()
    after = accuracy(student, x[test_idx], y[test_idx])
    after_new = accuracy(student, x[test_idx][y[test_idx] >= 7], y[test_idx][y[test_idx] >= 7])
    if rank == 0:
        print(f"world size {world}: {len(sampler)} samples and {steps} steps per rank, {len(frozen.names)} frozen")
        print(f"test accuracy before {before:.3f} (digits 7-9: {before_new:.3f})")
        print(f"test accuracy after  {after:.3f} (digits 7-9: {after_new:.3f}); parameters identical on all ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
