"""Seeded generators: every random draw in the library comes from ``epoch_generator(seed, epoch, *stream)``, or,
per sample in a stream stage, from ``keyed_uniform(seed, epoch, ident, draw)``.

A fresh ``torch.Generator`` per (seed, epoch, stream...) keeps plans pure functions of their inputs: nothing
hidden survives between epochs, and any chunk of a plan can be regenerated on its own (resume without replay).
Every stream and draw id is a named constant below.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__: list[str] = []  # private module


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts, well mixed (numpy's SeedSequence hash), order-sensitive."""
    words = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def epoch_generator(seed: int, epoch: int, *stream: int) -> torch.Generator:
    """A fresh CPU generator seeded from ``(seed, epoch, *stream)``."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, *stream))


# Stream ids of the language-model demo (torch_pretrain_update/demo/lm): ``mix_seed(seed, ID)`` or
# ``epoch_generator(seed, epoch, ID)``, one per independent draw.
LM_DEMO_SPLIT = 201  # which files, topics and chunks go to which part of the data
LM_DEMO_PLANT = 202  # which pool chunks get planted copies, and the bytes a near copy changes
LM_DEMO_INIT = 203  # the old model's initial weights
LM_DEMO_PRETRAIN_ORDER = 204  # batch order of pretraining
LM_DEMO_UPDATE_ORDER = 205  # batch order of every update run
LM_DEMO_SELECT = 206  # seed of the samplers, k-means and MinHash

# Stream ids of the WebDataset stream (data/partition.py, data/reader.py): ``epoch_generator(seed, epoch, ID, ...)``.
STREAM_SHARD_ORDER = 0  # the epoch's shard order
STREAM_SHARD_SHUFFLE = 1  # one shard's buffer shuffle: epoch_generator(seed, epoch, STREAM_SHARD_SHUFFLE, shard)
# Draw ids of the per-sample keyed draws of the stages (data/stages): ``keyed_uniform(seed, epoch, ident, ID)``.
KEYED_ACCEPT = 0  # balance_classes' accept / extra-copy uniform; select_by_entropy's reservoir key
KEYED_POISSON = 1  # balance_classes(repeat="poisson"): the seed of the sample's Poisson draw


def keyed_seed(seed: int, epoch: int, ident: bytes, draw: int) -> int:
    """A 64-bit integer that is a pure function of ``(seed, epoch, ident, draw)`` (BLAKE2b keyed hash).

    Counter-based, per sample: a stage's draw for a sample depends only on the sample's position or ``__key__``
    (``ident``), so a stream resumes at any position with no generator state. torch and numpy have no cheap
    per-element counter-based API (a seeded generator per sample costs ~20 us; BLAKE2b ~1 us).
    """
    h = hashlib.blake2b(ident, digest_size=8, key=f"{seed}:{epoch}:{draw}".encode()).digest()
    return int.from_bytes(h, "little")


def keyed_uniform(seed: int, epoch: int, ident: bytes, draw: int) -> float:
    """A uniform in (0, 1) from :func:`keyed_seed` (its top 53 bits, centred in their interval)."""
    return ((keyed_seed(seed, epoch, ident, draw) >> 11) + 0.5) * (1.0 / 9007199254740992.0)

# Stream ids of the sampler plans (sampling/): ``epoch_generator(seed, epoch, ID, ...)``, one per independent
# kind of draw, so that e.g. the selected set does not depend on whether its order is shuffled. The values are
# part of the plans' definitions: changing one changes every stream that uses it.
STREAM_SELECT = 1  # which samples: random subset (without replacement) and stratified picks
STREAM_SELECTION_ORDER = 2  # order of a materialised random subset / stratified selection
STREAM_IID = 3  # i.i.d. uniform draws with replacement, one generator per block of plan positions
STREAM_BALANCED_TREE = 4  # class-balanced plan: binomial splits of the class counts over its positions
STREAM_BALANCED_LEAF = 5  # class-balanced plan: arrangement of the classes inside one leaf
STREAM_CLASS_PASSES = 6  # class-balanced plan: one class's passes (permutations) or i.i.d. draws
STREAM_WEIGHTED_DRAW = 101  # weighted draws with replacement, one generator per chunk
STREAM_KEYS = 102  # exponential keys of a weighted draw without replacement, one generator per block
STREAM_KEY_SAMPLE = 103  # the sampled keys that locate the cut-off of a draw without replacement
STREAM_DRAW_ORDER = 104  # order of a weighted selection (and of the entropy plan)
STREAM_RANDOM_PART = 105  # the uniformly drawn part of the entropy plan
STREAM_CLASS_DRAW = 106  # the entropy plan's draw inside one class (with stratify), keyed by its label value
