"""Multi-round selection with the model in the loop: score -> select -> train -> repeat (``SelectionRounds``).

A model pretrained on clean digits meets a drifted pool (noisy, shifted images). A budget of 150 labels is
spent in 5 rounds: each round the *current* model scores the pool (entropy), ``SelectionRounds.next_round``
picks this round's share (half the most uncertain, half at random: ``random_fraction=0.5``; never an index
picked before), and the model is updated on everything picked so far. Halfway through, the selection state
is saved and restored into a fresh object, which continues with the same picks (resume). For comparison the
same budget is spent in one shot with the old model's scores. Both are printed as measured. Runs in seconds.

    python examples/selection_rounds.py
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from torch_pretrain_update.sampling.rounds import SelectionRounds
from torch_pretrain_update.scoring.scores import entropy

torch.set_num_threads(1)
BUDGET, ROUNDS = 150, 5
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
old_idx, pool_idx, test_idx = perm[:500], perm[500:1400], perm[1400:]


def drift(images: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shifted = torch.roll(images, shifts=1, dims=2)  # one pixel to the right
    shifted[:, :, 0] = 0
    return (shifted + 0.2 * torch.randn(shifted.shape, generator=g)).clamp(0, 1).flatten(1)


x_old, y_old = x[old_idx].flatten(1), y[old_idx]
x_pool, y_pool = drift(x[pool_idx], 1), y[pool_idx]  # the labels are revealed only for what is selected
x_test, y_test = drift(x[test_idx], 2), y[test_idx]


def train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ys), generator=g)
        for b in order.split(32):
            loss = F.cross_entropy(model(xs[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def scores_of(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return entropy(model(x_pool), from_logits=True)


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


torch.manual_seed(0)
old = train(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), x_old, y_old, 30, 0)
print(f"old model on the drifted test set: {accuracy(old):.3f}")

# ---- the loop: score -> select -> train -> repeat, with a save/restore in the middle
rounds = SelectionRounds(len(y_pool), BUDGET, ROUNDS, random_fraction=0.5, seed=0)
model = old
picked_per_round = []
for r in range(ROUNDS):
    if r == 2:  # e.g. the labelling job was interrupted: restore from the saved state into a fresh object
        state = json.loads(json.dumps(rounds.state_dict()))
        rounds = SelectionRounds(len(y_pool), BUDGET, ROUNDS, random_fraction=0.5, seed=0)
        rounds.load_state_dict(state)
    scores = scores_of(model)  # score the pool with the current model
    new = torch.as_tensor(rounds.next_round(scores), dtype=torch.int64)  # select this round's share
    picked_per_round.append(new)
    chosen = torch.as_tensor(rounds.chosen, dtype=torch.int64)
    model = train(copy.deepcopy(old), x_pool[chosen], y_pool[chosen], 30, 1)  # train on all labelled so far
    print(f"round {r}: +{len(new)} samples (mean entropy {scores[new].mean():.3f} vs pool {scores.mean():.3f}), "
          f"{len(chosen)} labelled, test accuracy {accuracy(model):.3f}")

everything = torch.cat(picked_per_round)
assert len(everything) == BUDGET and len(set(everything.tolist())) == BUDGET  # disjoint rounds, exact budget
assert sorted(everything.tolist()) == sorted(torch.as_tensor(rounds.chosen).tolist())

# ---- for comparison: the whole budget at once, scored by the old model only
one_shot = SelectionRounds(len(y_pool), BUDGET, 1, random_fraction=0.5, seed=0)
chosen = torch.as_tensor(one_shot.next_round(scores_of(old)), dtype=torch.int64)
single = train(copy.deepcopy(old), x_pool[chosen], y_pool[chosen], 30, 1)
print(f"one shot, same budget and mix: test accuracy {accuracy(single):.3f}; "
      f"{ROUNDS} rounds: {accuracy(model):.3f}")
