"""The demo's small networks, the one training recipe every strategy gets, and the evaluation."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_pretrain_update import KDLoss, partial_optimizer
from torch_pretrain_update._rng import epoch_generator
from torch_pretrain_update.demo.config import DemoConfig
from torch_pretrain_update.demo.data import Scenario

__all__ = ["SmallCNN", "SmallMLP", "evaluate", "make_model", "predict_logits", "train"]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (the ``features`` part) and a two-layer head. For (H, W) grayscale inputs."""

    def __init__(self, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32 * (height // 2) * (width // 2), 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


class SmallMLP(nn.Module):
    """One hidden layer as ``features``, a two-layer head. For inputs of any other shape (flattened)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(dim, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A :class:`SmallCNN` for 2-D inputs (images), a :class:`SmallMLP` for anything else."""
    if len(sample_shape) == 2 and min(sample_shape) >= 2:
        return SmallCNN(sample_shape[0], sample_shape[1], num_classes)
    return SmallMLP(int(np.prod(sample_shape)), num_classes)


def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """The model's logits on ``x`` in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str,
    cfg: DemoConfig,
    epochs: int,
    seed: int,
    teacher: Optional[nn.Module] = None,
    on_epoch: Optional[Callable[[], None]] = None,
) -> None:
    """Train ``model`` in place on ``(x, y)``: Adam, ``cfg.lr``, ``cfg.batch_size``, a fresh shuffle per epoch.

    ``method``: ``"finetune"`` (every parameter), ``"partial"`` (``features`` frozen with
    :func:`~torch_pretrain_update.partial_optimizer`, only the head trains) or ``"kd"`` (every parameter,
    :class:`~torch_pretrain_update.KDLoss`: ``(1 - alpha) * CE + alpha * T^2 * KL`` with the old model as the
    teacher).
    """
    if method == "partial":
        opt = partial_optimizer(model, torch.optim.Adam, trainable="head.*", lr=cfg.lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    kd = None
    teacher_logits = torch.empty(0)
    if method == "kd":
        if teacher is None:
            raise ValueError("method='kd' needs a teacher")
        kd = KDLoss(temperature=cfg.kd_temperature, alpha=cfg.kd_alpha)
        teacher_logits = predict_logits(teacher, x)  # the teacher is fixed: one forward pass, not one per epoch
    n = len(x)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, 7))
        for start in range(0, n, cfg.batch_size):
            b = order[start : start + cfg.batch_size]
            logits = model(x[b])
            if kd is not None:
                loss = kd(logits, teacher_logits[b], y[b])
            else:
                loss = F.cross_entropy(logits, y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch()


def evaluate(model: nn.Module, data: Scenario, rare: np.ndarray) -> dict[str, float]:
    """Accuracy on the new and old test parts and mean recall of the (old-)rare classes on the new test part."""
    pred_new = predict_logits(model, data.x_new_test).argmax(1).numpy()
    pred_old = predict_logits(model, data.x_old_test).argmax(1).numpy()
    y_new = data.y_new_test.numpy()
    recalls = [float((pred_new[y_new == c] == c).mean()) for c in rare if (y_new == c).any()]
    return {
        "new_acc": float((pred_new == y_new).mean()),
        "old_acc": float((pred_old == data.y_old_test.numpy()).mean()),
        "minority_recall": float(np.mean(recalls)) if recalls else float("nan"),
    }
