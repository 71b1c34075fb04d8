"""Lightning: the samplers and streams of this library in a ``Trainer``, split once, a new order every epoch,
frozen parameters kept out of DDP.

Lightning is imported with this module (``lightning.pytorch``, else the standalone ``pytorch_lightning``); without
it the module still imports, and :class:`PretrainUpdateCallback` raises ``ImportError`` when created.

Three things go wrong with Lightning's defaults, and the recipe below avoids each:

1. **Double rank split.** Lightning's ``use_distributed_sampler=True`` (the default) wraps any sampler that is not a
   ``DistributedSampler`` in its ``DistributedSamplerWrapper``, which splits the sampler's indices over the ranks.
   Our samplers already hand each rank its share (like ``DistributedSampler``), so each rank would get a share of
   its share: 25 samples instead of 50 on 2 ranks, silently. Build the ``Trainer`` with
   ``use_distributed_sampler=False`` and create the sampler in ``train_dataloader()`` (the process group exists
   by then, so ``num_replicas``/``rank`` come from it). :class:`PretrainUpdateCallback` raises at
   ``on_train_start`` if a sampler of ours was wrapped anyway, or splits over another number of ranks than the
   ``Trainer`` runs.
2. **The dataset's epoch.** Lightning calls ``set_epoch`` on the loader's sampler but not on its dataset, so a
   :class:`~torch_pretrain_update.WeightedWebDataset` would stay at epoch 0. :class:`PretrainUpdateCallback`
   calls ``set_epoch(trainer.current_epoch)`` on the sampler, the batch sampler's sampler and the dataset of every
   train loader at each epoch start. Lightning builds the first epoch's iterator before any epoch hook runs (also
   when it resumes from a checkpoint), so set the dataset's epoch in ``train_dataloader()`` too.
3. **Freezing after DDP wrapping.** Under ``strategy="ddp"`` Lightning wraps the module in
   ``DistributedDataParallel`` *before* it calls ``configure_optimizers``, and DDP registers every parameter
   that requires a gradient at that moment. Freezing there (``partial_optimizer`` freezes everything but
   ``trainable``) leaves DDP waiting for gradients that never come: "Expected to have finished reduction in the
   prior iteration ... parameters that were not used in producing loss". Freeze in ``__init__`` or ``setup()``
   (before the wrapping) and build the optimizer with :func:`~torch_pretrain_update.partial_optimizer` in
   ``configure_optimizers`` with the same ``trainable`` patterns: it then freezes nothing new.

Example::

    import lightning.pytorch as pl
    import torch_pretrain_update as tpu
    from torch_pretrain_update.integrations.lightning import PretrainUpdateCallback

    TRAINABLE = ["head.*"]

    class Update(pl.LightningModule):
        def __init__(self, student, teacher, labels, dataset):
            super().__init__()
            self.student, self.teacher = student, teacher.eval()
            self.labels, self.dataset = labels, dataset
            self.kd = tpu.KDLoss(temperature=4.0, alpha=0.5)

        def setup(self, stage):                      # before DDP wraps the module
            tpu.freeze(self.teacher)
            tpu.freeze(self.student)
            tpu.unfreeze(self.student, TRAINABLE)

        def configure_optimizers(self):              # after the wrapping: freezes nothing new
            return tpu.partial_optimizer(self.student, torch.optim.AdamW, trainable=TRAINABLE, lr=1e-3)

        def train_dataloader(self):                  # the process group exists here
            sampler = tpu.ClassBalancedSampler(self.labels, seed=0)   # rank split from the process group
            return torch.utils.data.DataLoader(self.dataset, batch_size=64, sampler=sampler)

        def training_step(self, batch, batch_idx):
            x, y = batch
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            return self.kd(self.student(x), teacher_logits, y)

    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=3,
                         use_distributed_sampler=False, callbacks=[PretrainUpdateCallback()])
    trainer.fit(Update(student, teacher, labels, dataset))

For a stream, return ``DataLoader(stream, batch_size=...)`` from ``train_dataloader()`` after
``stream.set_epoch(self.trainer.current_epoch)``; Lightning never wraps an ``IterableDataset``'s loader, and the
stream splits over ranks x workers itself with the same number of samples on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch_pretrain_update.integrations._common import describe, loader_parts, rank_split, set_loader_epoch

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
except ImportError:  # the standalone package
    try:
        # the same classes under the standalone names (mypy sees two unrelated modules)
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from lightning_fabric.utilities.distributed import DistributedSamplerWrapper  # type: ignore[assignment]
    except ImportError:  # no Lightning: the module still imports; the callback says what to install
        pl = None  # type: ignore[assignment]
        DistributedSamplerWrapper = None  # type: ignore[assignment,misc]

_CallbackBase: Any = object if pl is None else pl.Callback

__all__ = ["PretrainUpdateCallback", "check_train_loader", "train_loaders"]


def train_loaders(trainer: Any) -> list[Any]:
    """The train loaders of a fitting ``trainer``, as Lightning uses them (after it wrapped any sampler):
    ``trainer.train_dataloader`` flattened through dicts, lists and tuples."""
    stack = [trainer.train_dataloader]
    out = []
    while stack:
        item = stack.pop()
        if item is None:
            continue
        if isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif hasattr(item, "flattened"):  # a CombinedLoader
            stack.extend(reversed(item.flattened))
        else:
            out.append(item)
    return out


def check_train_loader(loader: Any, world_size: int, rank: int) -> None:
    """Raise if ``loader`` would not give this rank exactly its share once.

    Refused: a sampler that splits by rank itself (ours, or any with ``num_replicas``/``rank``) inside Lightning's
    ``DistributedSamplerWrapper`` (split twice), and a sampler or stream that splits over another number of ranks,
    or for another rank, than the ``Trainer`` runs (e.g. built before the process group existed: every rank would
    train on the whole plan).

    Args:
        loader: a train ``DataLoader`` as Lightning uses it.
        world_size: ``trainer.world_size``.
        rank: ``trainer.global_rank``.

    Raises:
        ValueError: naming the sampler or dataset and what to change.
    """
    for part in loader_parts(loader):
        if DistributedSamplerWrapper is not None and isinstance(part, DistributedSamplerWrapper):
            inner = getattr(part.dataset, "_sampler", None)
            if rank_split(inner) is not None:
                raise ValueError(
                    f"Lightning wrapped {describe(inner)} in its DistributedSamplerWrapper, which splits the "
                    f"indices over {part.num_replicas} ranks again: each rank would see a share of its share. "
                    "Build the Trainer with use_distributed_sampler=False (our samplers split by rank "
                    "themselves) and create the sampler in train_dataloader(), after the process group exists"
                )
            continue
        split = rank_split(part)
        if split is not None and split != (world_size, rank):
            raise ValueError(
                f"{describe(part)} splits its data for rank {split[1]} of {split[0]}, but this process is rank "
                f"{rank} of world_size={world_size}: create it in train_dataloader() (the process group exists "
                "then) or pass num_replicas=trainer.world_size, rank=trainer.global_rank"
            )


class PretrainUpdateCallback(_CallbackBase):
    """Keeps the samplers and streams of this library right under a Lightning ``Trainer``.

    - ``on_train_start``: :func:`check_train_loader` on every train loader (a ``ValueError`` before the first
      step instead of silently training on a quarter of the data, or on all of it on every rank).
    - ``on_train_epoch_start``: ``set_epoch(trainer.current_epoch)`` on the sampler, the batch sampler's sampler
      and the dataset of every train loader (Lightning itself skips the dataset, so a stream would repeat its
      first epoch's order).

    See the module docstring for the whole recipe (``use_distributed_sampler=False``, freezing before DDP).

    Args:
        set_epoch: set the epoch at each epoch start.
        check_split: check the rank split at the start of training.

    Raises:
        ImportError: Lightning is not installed.

    Example::

        >>> trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", use_distributed_sampler=False,
        ...                      callbacks=[PretrainUpdateCallback()])
    """

    def __init__(self, *, set_epoch: bool = True, check_split: bool = True) -> None:
        if pl is None:
            raise ImportError("PretrainUpdateCallback needs Lightning: pip install lightning")
        super().__init__()
        self.set_epoch = bool(set_epoch)
        self.check_split = bool(check_split)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.check_split:
            for loader in train_loaders(trainer):
                check_train_loader(loader, trainer.world_size, trainer.global_rank)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.set_epoch:
            for loader in train_loaders(trainer):
                set_loader_epoch(loader, trainer.current_epoch)
