"""A reusable resume harness in the style of torchdata's StatefulDataLoader tests.

Run an unbroken reference over several epochs; then, for many break points ``k`` in a chosen epoch, iterate
``k`` batches, take ``loader.state_dict()``, pass it through ``json.dumps``/``json.loads``, build a *fresh*
loader (fresh sampler / dataset objects), load the state, and drain: the resumed stream must equal the rest of
the unbroken one, and the later epochs must be the same too.

``make`` is a zero-argument factory returning ``(loader, set_epoch)`` where ``set_epoch(e)`` is what a training
loop calls at the start of epoch ``e`` (e.g. ``sampler.set_epoch``). A resumed loop calls ``set_epoch`` with the
epoch it resumes in, *after* ``load_state_dict``, exactly like a user's loop would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
import torch

Factory = Callable[[], "tuple[Any, Callable[[int], None]]"]


class IndexDataset(torch.utils.data.Dataset):
    """A map-style dataset whose item ``i`` is ``i``: batches show exactly which indices a sampler produced."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def to_py(batch: Any) -> Any:
    """Tensors/arrays/tuples/dicts to plain Python so that batches compare with ``==``."""
    if isinstance(batch, torch.Tensor):
        return batch.tolist()
    if isinstance(batch, np.ndarray):
        return batch.tolist()
    if isinstance(batch, dict):
        return {k: to_py(v) for k, v in sorted(batch.items())}
    if isinstance(batch, (list, tuple)):
        return [to_py(b) for b in batch]
    return batch


def run_unbroken(make: Factory, epochs: int) -> list[list[Any]]:
    loader, set_epoch = make()
    out = []
    for e in range(epochs):
        set_epoch(e)
        out.append([to_py(b) for b in loader])
    return out


def run_broken(make: Factory, epochs: int, break_epoch: int, k: int) -> tuple[list[Any], list[list[Any]]]:
    """Consume ``k`` batches of ``break_epoch``, checkpoint through JSON, resume in fresh objects.

    Returns ``(batches of break_epoch before + after the break, later epochs)``.
    """
    loader, set_epoch = make()
    for e in range(break_epoch):
        set_epoch(e)
        for _ in loader:
            pass
    set_epoch(break_epoch)
    before = []
    it = iter(loader)
    for _ in range(k):
        before.append(to_py(next(it)))
    state = json.loads(json.dumps(loader.state_dict()))
    del it, loader

    loader2, set_epoch2 = make()
    loader2.load_state_dict(state)
    set_epoch2(break_epoch)
    after = [to_py(b) for b in loader2]
    later = []
    for e in range(break_epoch + 1, epochs):
        set_epoch2(e)
        later.append([to_py(b) for b in loader2])
    return before + after, later


def check_resume(
    make: Factory,
    *,
    epochs: int = 2,
    break_points: Iterable[int] | None = None,
    break_epochs: Iterable[int] | None = None,
) -> int:
    """Assert that every broken-and-resumed run equals the unbroken one. Returns the number of runs checked.

    ``break_points`` defaults to every k in ``[0, n]`` when the epoch has at most 12 batches, else a spread
    including 0, 1, n-1 and n.
    """
    full = run_unbroken(make, epochs)
    checked = 0
    for be in break_epochs if break_epochs is not None else range(epochs):
        n = len(full[be])
        assert n > 0, "the reference epoch is empty: the harness would check nothing"
        if break_points is None:
            ks = sorted(set(range(n + 1)) if n <= 12 else {0, 1, 2, n // 3, n // 2, n - 2, n - 1, n})
        else:
            ks = [k for k in break_points if k <= n]
        for k in ks:
            stream, later = run_broken(make, epochs, be, k)
            assert stream == full[be], f"epoch {be}: resumed after {k} batches, stream differs"
            assert later == full[be + 1 :], f"epoch {be}: resumed after {k} batches, later epochs differ"
            checked += 1
    return checked
