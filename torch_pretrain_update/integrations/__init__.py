"""Recipes for training frameworks, tested against them: :mod:`~torch_pretrain_update.integrations.lightning`
(Lightning) and :mod:`~torch_pretrain_update.integrations.huggingface` (the Hugging Face ``Trainer``).

``import torch_pretrain_update`` never imports ``lightning`` or ``transformers``; each module here imports its
framework when it is imported, if installed (the ``dev`` extra installs them), and its class raises
``ImportError`` naming the package when the framework is missing.

What the frameworks do that matters here (measured on lightning 2.6 / transformers 5.24 / accelerate 1.15):

- Both split the training data between processes themselves. The samplers and streams of this library split by
  rank on their own (like ``DistributedSampler``), so exactly one of the two may split: with Lightning, turn
  Lightning's off (``Trainer(use_distributed_sampler=False)``); with the Hugging Face ``Trainer`` (whose
  ``accelerate`` always splits), build ours for one process (``num_replicas=1``).
- Lightning calls ``set_epoch`` on the train loader's sampler but never on its dataset; ``accelerate`` calls it on
  both. A stream left at epoch 0 repeats the same order every epoch.
"""

__all__: list[str] = []
