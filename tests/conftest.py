"""Shared pytest configuration."""

import torch

# Two cores on CI: keep intra-op threads small so that spawned workers and ranks do not oversubscribe.
torch.set_num_threads(2)
