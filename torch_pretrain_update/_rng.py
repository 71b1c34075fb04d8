"""Seeded generators: every random draw in the library comes from ``epoch_generator(seed, epoch, *stream)``.

A fresh ``torch.Generator`` per (seed, epoch, stream...) keeps plans pure functions of their inputs: nothing
hidden survives between epochs, and any chunk of a plan can be regenerated on its own (resume without replay).
"""

from __future__ import annotations

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
