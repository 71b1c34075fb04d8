"""A tiny 'training' script for the crash-and-resume tests (run as a subprocess, not collected by pytest).

It iterates a ``StatefulDataLoader`` over one epoch, appends every consumed sample id to ``LOG`` (one line per
step, flushed and fsynced, as a real trainer's side effects would be), checkpoints ``loader.state_dict()``
atomically every ``--every`` steps, and SIGKILLs itself at step ``--kill-at`` (a real SIGKILL: no cleanup,
no atexit). Started again with the same arguments and no ``--kill-at``, it resumes from the last checkpoint.

Usage: python _crash_train.py {sampler,stream} WORKDIR --workers W --every K [--kill-at S] [--shards PATTERN]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from resume_harness import IndexDataset  # this script runs with tests/ on sys.path
from torchdata.stateful_dataloader import StatefulDataLoader


def build(args: argparse.Namespace):
    if args.kind == "sampler":
        from torch_pretrain_update.sampling.samplers import ClassBalancedSampler

        labels = torch.tensor([0] * 40 + [1] * 10 + [2] * 3)
        sampler = ClassBalancedSampler(labels, samples_per_class="max", seed=7)
        sampler.set_epoch(3)
        loader = StatefulDataLoader(IndexDataset(len(labels)), sampler=sampler, batch_size=4, num_workers=args.workers)
        return loader, lambda batch: [int(i) for i in batch]
    from torch_pretrain_update.data.stream import WeightedWebDataset

    ds = WeightedWebDataset(args.shards, num_classes=3, manifest=args.manifest, seed=7, shuffle=True)
    ds.set_epoch(3)
    loader = StatefulDataLoader(ds, batch_size=4, num_workers=args.workers)
    return loader, lambda batch: list(batch["__key__"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["sampler", "stream"])
    p.add_argument("workdir")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--shards", default=None)
    p.add_argument("--manifest", default=None)
    args = p.parse_args()
    work = Path(args.workdir)
    ckpt = work / "ckpt.json"
    loader, ids_of = build(args)
    step = 0
    if ckpt.exists():
        saved = json.loads(ckpt.read_text())
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
    with open(work / "log.txt", "a") as log:
        for batch in loader:
            step += 1
            log.write(json.dumps({"step": step, "ids": ids_of(batch)}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            if step % args.every == 0:
                tmp = work / "ckpt.json.tmp"
                tmp.write_text(json.dumps({"step": step, "loader": loader.state_dict()}))
                os.replace(tmp, ckpt)
            if args.kill_at is not None and step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    (work / "done").write_text(str(step))


if __name__ == "__main__":
    main()
