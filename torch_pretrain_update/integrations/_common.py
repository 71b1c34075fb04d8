"""What every integration needs, framework-free: the objects of a loader that take ``set_epoch``, and how an
object splits its data by rank."""

from __future__ import annotations

from typing import Any

__all__: list[str] = []  # private module


def loader_parts(loader: Any) -> list[Any]:
    """The objects of a ``DataLoader``-like ``loader`` that may take ``set_epoch``, each once: its sampler, its
    batch sampler and that one's sampler, its dataset (``None`` entries and repeats left out)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    parts = [getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None),
             getattr(loader, "dataset", None)]
    seen: dict[int, Any] = {}
    for p in parts:
        if p is not None:
            seen.setdefault(id(p), p)
    return list(seen.values())


def set_loader_epoch(loader: Any, epoch: int) -> list[Any]:
    """Call ``set_epoch(epoch)`` on every part of ``loader`` (:func:`loader_parts`) that has it; returns them."""
    done = []
    for part in loader_parts(loader):
        set_epoch = getattr(part, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            done.append(part)
    return done


def rank_split(obj: Any) -> tuple[int, int] | None:
    """``(num_replicas, rank)`` of a sampler or stream that splits its data by rank itself (the samplers and
    streams of this library, ``DistributedSampler``), else None."""
    n = getattr(obj, "num_replicas", None)
    if n is None:
        n = getattr(obj, "world_size", None)  # the streams' older spelling
    r = getattr(obj, "rank", None)
    if isinstance(n, int) and isinstance(r, int) and not isinstance(n, bool):
        return n, r
    return None


def describe(obj: Any) -> str:
    split = rank_split(obj)
    name = type(obj).__name__
    return name if split is None else f"{name}(num_replicas={split[0]}, rank={split[1]})"
