"""The Hugging Face ``Trainer`` with the samplers and streams of this library.

``transformers`` is imported with this module (its ``Trainer`` needs ``accelerate`` too); without it the module
still imports, and :class:`PretrainUpdateTrainer` raises ``ImportError`` when created.

- **Samplers.** :class:`PretrainUpdateTrainer` takes ``train_sampler=``: a sampler, or a function of the train
  dataset returning one (it gets the dataset after the ``Trainer`` dropped the columns the model does not take),
  and returns it from ``_get_train_sampler``. Labels, weights and scores may come straight from a ``datasets``
  column (``train_dataset["label"]``): every input of this library takes what ``numpy.asarray`` takes.
- **Streams.** Pass a :class:`~torch_pretrain_update.WeightedWebDataset` as ``train_dataset`` (an
  ``IterableDataset``: give ``TrainingArguments(max_steps=...)``, as for any stream). The ``Trainer`` calls
  ``set_epoch`` on it every epoch (through ``accelerate``), so each epoch has its own order.
- **One process split.** ``accelerate`` always splits the data between processes itself (it shards the batches
  of a sampler, and reads an ``IterableDataset`` on the main process and dispatches its batches). So build ours
  for one process: ``num_replicas=1, rank=0`` for a sampler, a stream with one rank (``rank=0`` and one
  replica). Left to the defaults under ``torchrun``/``accelerate launch`` they would split by rank as well, and
  each process would see a share of its share; :class:`PretrainUpdateTrainer` raises a ``ValueError`` instead.
  The plan is still a function of ``(seed, epoch)`` only, so every process builds the same one and
  ``accelerate`` hands each its batches; a resumed run skips the batches already trained on (the ``Trainer``'s
  own resume), which is exact because the plan of an epoch does not change.

Example::

    import torch_pretrain_update as tpu
    from transformers import TrainingArguments
    from torch_pretrain_update.integrations.huggingface import PretrainUpdateTrainer

    trainer = PretrainUpdateTrainer(
        model=model, args=TrainingArguments("out", num_train_epochs=3, per_device_train_batch_size=32),
        train_dataset=hf_dataset,                    # a datasets.Dataset
        train_sampler=lambda ds: tpu.ClassBalancedSampler(ds["label"], seed=0, num_replicas=1, rank=0),
    )
    trainer.train()

    stream = tpu.WeightedWebDataset(None, manifest=manifest, num_classes=10, seed=0, rank=0, num_replicas=1)
    trainer = PretrainUpdateTrainer(model=model, args=TrainingArguments("out", max_steps=10_000),
                                    train_dataset=stream, data_collator=collate)
"""

from __future__ import annotations

from typing import Any, Callable, Union

from torch.utils.data import Sampler

from torch_pretrain_update.integrations._common import describe, rank_split

try:
    import transformers
except ImportError:  # the module still imports; the trainer says what to install
    transformers = None  # type: ignore[assignment]

_TrainerBase: Any = object if transformers is None else transformers.Trainer

__all__ = ["PretrainUpdateTrainer", "check_one_process"]

SamplerArg = Union[Sampler, Callable[[Any], Sampler], None]


def check_one_process(obj: Any, name: str) -> None:
    """Raise if ``obj`` (a sampler or a stream) splits its data over more than one rank: under the Hugging Face
    ``Trainer``, ``accelerate`` splits it, and a second split would give each process a share of its share.

    Raises:
        ValueError: naming ``name`` and the split found.
    """
    split = rank_split(obj)
    if split is not None and split != (1, 0):
        raise ValueError(
            f"{name}: {describe(obj)} splits its data by rank, but accelerate already splits what the Trainer "
            "loads between processes: each process would see a share of its share. Build it for one process "
            "(num_replicas=1, rank=0); every process then builds the same plan and accelerate hands each its "
            "batches"
        )


class PretrainUpdateTrainer(_TrainerBase):
    """A ``transformers.Trainer`` that trains on a sampler of this library (see the module docstring).

    Args:
        *args: as ``transformers.Trainer``.
        train_sampler: a sampler (e.g. :class:`~torch_pretrain_update.ClassBalancedSampler`), or a function
            ``train_dataset -> sampler``; ``None`` keeps the ``Trainer``'s own. Built for one process
            (``num_replicas=1, rank=0``).
        **kwargs: as ``transformers.Trainer``.

    Raises:
        ImportError: ``transformers`` is not installed.
        TypeError: ``train_sampler`` is neither a sampler nor callable.
        ValueError: (when the train loader is built) the sampler or the stream splits by rank itself.

    Example::

        >>> trainer = PretrainUpdateTrainer(model=model, args=args, train_dataset=ds,
        ...                                 train_sampler=lambda d: ClassBalancedSampler(d["label"], num_replicas=1,
        ...                                                                              rank=0))
        >>> trainer.train()
    """

    def __init__(self, *args: Any, train_sampler: SamplerArg = None, **kwargs: Any) -> None:
        if transformers is None:
            raise ImportError("PretrainUpdateTrainer needs transformers: pip install transformers accelerate")
        if train_sampler is not None and not (isinstance(train_sampler, Sampler) or callable(train_sampler)):
            raise TypeError(
                "train_sampler must be a torch.utils.data.Sampler, a function train_dataset -> Sampler, or None; "
                f"got {type(train_sampler).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler

    # transformers >= 4.51 passes the (column-pruned) train dataset; older versions call it without arguments
    def _get_train_sampler(self, train_dataset: Any = None, *args: Any, **kwargs: Any) -> Sampler | None:
        if self.train_sampler is None:
            extra = () if train_dataset is None else (train_dataset,)
            return super()._get_train_sampler(*extra, *args, **kwargs)
        if isinstance(self.train_sampler, Sampler):
            sampler = self.train_sampler
        else:
            sampler = self.train_sampler(self.train_dataset if train_dataset is None else train_dataset)
            if not isinstance(sampler, Sampler):
                raise TypeError(f"train_sampler(train_dataset) must return a Sampler; got {type(sampler).__name__}")
        check_one_process(sampler, "train_sampler")
        return sampler

    def get_train_dataloader(self) -> Any:
        check_one_process(self.train_dataset, "train_dataset")
        return super().get_train_dataloader()
