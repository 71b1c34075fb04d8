"""Replay: mix old and new data with ``torchdata.nodes.MultiNodeWeightedSampler`` while weighting the new data.

A model pretrained on old (clean) digits is updated on new data that has drifted (noisy images, and classes
5-9 now frequent while 0-4 are scarce). Updating on the new data alone tends to forget the old distribution;
replaying old samples in a fixed share of the stream (here 30%) is the usual remedy. Each source is one of this
library's samplers wrapped as a node (``SamplerWrapper``), mapped to samples; ``MultiNodeWeightedSampler``
draws the source of every sample with the given weights; the new samples carry class weights
(``sample_weights``, ``sqrt_inverse``) that the loss uses, so the scarce new classes count more. Both
updates are printed as measured. Runs in seconds on scikit-learn's digits.

    python examples/replay_mixing.py
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import default_collate
from torchdata.nodes import Batcher, Loader, Mapper, MultiNodeWeightedSampler, SamplerWrapper, StopCriteria

from torch_pretrain_update.sampling.samplers import RandomSubsetSampler
from torch_pretrain_update.scoring.weights import sample_weights

torch.set_num_threads(1)
rng = np.random.default_rng(0)
digits = load_digits()
x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y_all = torch.tensor(digits.target)
perm = torch.from_numpy(rng.permutation(len(y_all)))
old_idx, new_idx, old_test, new_test = perm[:700], perm[700:1300], perm[1300:1550], perm[1550:]


def drift(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1)


# new data: noisy, classes 0-4 kept at 1 in 6
keep = torch.tensor([i for i in new_idx.tolist() if y_all[i] >= 5 or rng.random() < 1 / 6])
x_old, y_old = x_all[old_idx], y_all[old_idx]
x_new, y_new = drift(x_all[keep], 1), y_all[keep]
w_new = sample_weights(y_new, num_classes=10, scheme="sqrt_inverse")
x_old_test, y_old_test = x_all[old_test], y_all[old_test]
x_new_test, y_new_test = drift(x_all[new_test], 2), y_all[new_test]
print(f"old data: {len(y_old)} samples; new data: {len(y_new)} samples, class counts "
      f"{torch.bincount(y_new, minlength=10).tolist()}")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_steps(model: nn.Module, batches, lr: float) -> Counter:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sources: Counter = Counter()
    model.train()
    for batch in batches:
        loss = (F.cross_entropy(model(batch["x"]), batch["y"], reduction="none") * batch["w"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sources.update(batch["source"])
    return sources


ONE = torch.tensor(1.0)


def source(sampler, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, name: str):
    """One of the library's samplers as a torchdata node of samples."""
    return Mapper(SamplerWrapper(sampler), lambda i: {"x": x[i], "y": y[i], "w": ONE if w is None else w[i],
                                                       "source": name})


def collate(items: list[dict]) -> dict:
    batch = default_collate([{k: v for k, v in s.items() if k != "source"} for s in items])
    batch["source"] = [s["source"] for s in items]
    return batch


def mixed_loader(replay: float, seed: int) -> Loader:
    nodes = {"new": source(RandomSubsetSampler(len(y_new), len(y_new), seed=seed), x_new, y_new, w_new, "new")}
    weights = {"new": 1.0}
    if replay > 0:
        nodes["old"] = source(RandomSubsetSampler(len(y_old), len(y_old), seed=seed + 1), x_old, y_old, None, "old")
        weights = {"new": 1.0 - replay, "old": replay}
    # an epoch ends when the new data has been seen once (old samples are drawn as the weights say)
    mixed = MultiNodeWeightedSampler(nodes, weights, stop_criteria=StopCriteria.FIRST_DATASET_EXHAUSTED, seed=seed,
                                     rank=0, world_size=1)
    return Loader(Mapper(Batcher(mixed, batch_size=32, drop_last=False), collate))


torch.manual_seed(0)
old_model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
pretrain = Loader(Mapper(Batcher(source(RandomSubsetSampler(len(y_old), len(y_old), seed=9), x_old, y_old, None,
                                        "old"), batch_size=32), collate))
for _ in range(20):
    train_steps(old_model, pretrain, 3e-3)
print(f"old model: old test {accuracy(old_model, x_old_test, y_old_test):.3f}, "
      f"new test {accuracy(old_model, x_new_test, y_new_test):.3f}")

for replay in (0.0, 0.3):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model.load_state_dict(old_model.state_dict())
    loader = mixed_loader(replay, seed=0)
    seen: Counter = Counter()
    for _ in range(15):  # each iteration of the Loader is a fresh epoch (new sampler epoch, new mix)
        seen += train_steps(model, loader, 1e-3)
    share = seen["old"] / sum(seen.values())
    print(f"update with {replay:.0%} replay: {sum(seen.values())} samples drawn ({share:.1%} old); "
          f"old test {accuracy(model, x_old_test, y_old_test):.3f}, new test "
          f"{accuracy(model, x_new_test, y_new_test):.3f}")
    assert abs(share - replay) < 0.05
