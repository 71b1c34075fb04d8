"""A plain training loop whose sampler is re-scored by the current model every epoch (EntropySampler).

Each epoch the model scores the whole training pool, ``sampler.update(logits)`` replaces the scores, and the
epoch trains on ``num_samples`` indices: half the highest-entropy ones, half drawn uniformly from the rest
(``random_fraction=0.5``; pure top-k of a model's uncertainty can lose to random selection under shift, see the
demo's report). Runs in seconds on scikit-learn's digits.

    python examples/entropy_sampler_loop.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_pretrain_update.sampling.entropy_sampler import EntropySampler

torch.manual_seed(0)
torch.set_num_threads(1)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train_idx, test_idx = perm[:1400], perm[1400:]
train = TensorDataset(x[train_idx], y[train_idx])

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)


def logits_of(inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs)


# The untrained model's scores to start with; 300 of the 1400 training samples per epoch.
sampler = EntropySampler(logits_of(train.tensors[0]), 300, from_logits=True, random_fraction=0.5, seed=0)
loader = DataLoader(train, batch_size=50, sampler=sampler)

for epoch in range(10):
    if epoch > 0:
        sampler.update(logits_of(train.tensors[0]))  # re-score the pool with the current model
    sampler.set_epoch(epoch)
    picked = sampler.plan(epoch)
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (logits_of(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    mean_h = sampler.scores[picked].mean().item()
    print(f"epoch {epoch}: trained on {len(picked)} samples (mean entropy {mean_h:.3f} nats, pool mean "
          f"{sampler.scores.mean().item():.3f}); test accuracy {acc:.3f}")

assert len(set(picked.tolist())) == 300  # distinct indices every epoch
assert acc > 0.7, acc  # a sanity check, far below what it reaches
