"""Shared pytest configuration."""

import os

import pytest
import torch
import torch.utils.data._utils as data_utils

# Two cores on CI: keep intra-op threads small so that spawned workers and ranks do not oversubscribe. Under
# pytest-xdist (``make test`` runs two pytest workers) each worker gets one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# How long a DataLoader iterator's shutdown waits for each worker to exit before terminating it (torch's default:
# 5 s, read at call time). A worker exits at once when told to, except after an error that torchdata raises while
# the iterator is still being built (e.g. a dataset state refused in a worker): that worker is never told and
# waits out the whole timeout. The tests that provoke such errors on purpose would idle 5 s per worker.
data_utils.MP_STATUS_CHECK_INTERVAL = 0.5


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: small matmuls with 2 OpenMP threads on a busy 2-core machine were measured
    50x slower (threads wait for descheduled peers). Under pytest-xdist the thread count is 1 already."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
