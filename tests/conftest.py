"""Shared pytest configuration."""

import os

import torch

# Two cores on CI: keep intra-op threads small so that spawned workers and ranks do not oversubscribe. Under
# pytest-xdist (``make test`` runs two pytest workers) each worker gets one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
