"""A weighted WebDataset stream that survives a crash: ``WeightedWebDataset`` + ``StatefulDataLoader``.

scikit-learn's digits are written into WebDataset shards with a manifest (``write_shards``); the stream reads
them with per-sample class weights (``inverse`` frequency, from the manifest's histogram) and the training loss
is weighted by them. Mid-epoch, a checkpoint holds the loader's state (plain JSON), the model and the optimizer;
a fresh process-like restart (new dataset, loader, model, optimizer) loads it and continues. The resumed run
sees exactly the samples the unbroken run sees, so the final weights are bit-for-bit the same. Runs in seconds.

    python examples/stream_checkpoint_resume.py
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from torch_pretrain_update.data.stream import WeightedWebDataset
from torch_pretrain_update.data.write import write_shards

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 calls it itself
torch.set_num_threads(1)
EPOCHS, CRASH_EPOCH, CRASH_AFTER = 2, 1, 5  # crash after 5 batches of the second epoch
NUM_WORKERS = 2

digits = load_digits()
keep = np.concatenate([np.flatnonzero(digits.target == c)[: 150 if c < 5 else 30] for c in range(10)])  # imbalanced


def build(manifest: str):
    """Everything a training process creates at start-up."""
    torch.manual_seed(0)
    ds = WeightedWebDataset(None, manifest=manifest, num_classes=10, scheme="inverse", seed=0)
    loader = StatefulDataLoader(ds, batch_size=32, num_workers=NUM_WORKERS)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return ds, loader, model, opt


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> list[str]:
    loss = (F.cross_entropy(model(batch["npy"]), batch["cls"], reduction="none") * batch["weight"]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return list(batch["__key__"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        samples = ({"__key__": f"digit-{i:05d}", "npy": (digits.images[i] / 16).astype(np.float32),
                    "cls": int(digits.target[i])} for i in keep)
        manifest = write_shards(samples, os.path.join(tmp, "digits-%06d.tar"), maxcount=100)
        print(f"wrote {len(keep)} samples into shards; manifest {os.path.basename(manifest)}")

        # the unbroken run
        ds, loader, model, opt = build(manifest)
        seen_unbroken = []
        for epoch in range(EPOCHS):
            ds.set_epoch(epoch)
            for batch in loader:
                seen_unbroken += step(model, opt, batch)
        reference = [p.detach().clone() for p in model.parameters()]

        # the crashed run: stop after CRASH_AFTER batches of CRASH_EPOCH, checkpoint, restart from scratch
        ds, loader, model, opt = build(manifest)
        seen = []
        for epoch in range(CRASH_EPOCH + 1):
            ds.set_epoch(epoch)
            for i, batch in enumerate(loader):
                seen += step(model, opt, batch)
                if epoch == CRASH_EPOCH and i + 1 == CRASH_AFTER:
                    break
        ckpt = os.path.join(tmp, "ckpt.pt")
        torch.save({"loader": json.dumps(loader.state_dict()), "model": model.state_dict(),
                    "opt": opt.state_dict(), "epoch": CRASH_EPOCH}, ckpt)
        del ds, loader, model, opt
        print(f"crashed after {len(seen)} samples; checkpoint saved")

        ds, loader, model, opt = build(manifest)  # a new process would start here
        state = torch.load(ckpt, weights_only=True)
        loader.load_state_dict(json.loads(state["loader"]))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for epoch in range(state["epoch"], EPOCHS):
            ds.set_epoch(epoch)
            for batch in loader:
                seen += step(model, opt, batch)

    assert seen == seen_unbroken, "the resumed stream differs from the unbroken one"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference))
    per_epoch = len(seen) // EPOCHS
    print(f"resumed: {len(seen)} samples over {EPOCHS} epochs ({per_epoch} per epoch), same order as the "
          "unbroken run; final weights identical")


if __name__ == "__main__":  # DataLoader workers re-import this file under the spawn start method
    main()
