"""WebDataset stages: weights, one-pass balancing and selection over streams of dict samples.

Each stage is curried like webdataset's own filters (``webdataset.filters.pipelinefilter``): called with its
options it returns a stage, a callable from an iterator of samples to an iterator of samples, so all of these
work::

    ds = wds.WebDataset(urls, shardshuffle=False).map(safe_decode()).compose(with_class_weights(num_classes=10))
    ds = wds.DataPipeline(wds.SimpleShardList(urls), strict_tarfile_to_samples(), safe_decode(), wds.shuffle(1000),
                          balance_classes(num_classes=10, seed=0), wds.batched(64))
    for sample in with_class_weights(num_classes=10)(iter(samples)): ...

One public form each: the lowercase name (:func:`with_class_weights`, :func:`with_entropy_weights`,
:func:`balance_classes`, :func:`select_by_entropy`) is the class itself, and the class name
(``ClassWeightStage``, ...) is the same object, kept for ``isinstance`` checks and type hints.

:func:`~torch_pretrain_update.data.strict_samples.strict_tarfile_to_samples` is the library's drop-in for
``wds.tarfile_to_samples`` (which ``wds.WebDataset`` uses): webdataset's reader silently loses the rest of a shard
at a corrupt header or a truncation at a header boundary; the strict one raises naming the shard, or counts it.

Unlike ``pipelinefilter``'s ``FilterFunction``, a stage is a small object that also carries its running state
with ``state_dict()`` / ``load_state_dict()``, ``set_epoch(epoch)`` and a ``stats`` dict; the resume protocol and
bad-sample handling are described in :mod:`torch_pretrain_update.data.stages.base`.

Modules: ``weights`` (class and entropy weights), ``balance`` (one-pass balancing), ``select`` (one-pass
selection), ``text`` (target-matching weights of text, :func:`with_target_weights`), ``base`` (what they share).
"""

from torch_pretrain_update.data.stages.balance import BalanceStage, balance_classes
from torch_pretrain_update.data.stages.base import BadSampleError
from torch_pretrain_update.data.stages.select import SelectStage, select_by_entropy
from torch_pretrain_update.data.stages.text import TargetWeightStage, with_target_weights
from torch_pretrain_update.data.stages.weights import (
    ClassWeightStage,
    EntropyWeightStage,
    with_class_weights,
    with_entropy_weights,
)

__all__ = [
    "with_class_weights",
    "with_entropy_weights",
    "balance_classes",
    "select_by_entropy",
    "ClassWeightStage",
    "EntropyWeightStage",
    "BalanceStage",
    "SelectStage",
    "BadSampleError",
    "with_target_weights",
    "TargetWeightStage",
]
