"""One rank's part of :func:`~torch_pretrain_update.scoring.distributed.score_dataset`: feeding batches to the
model and scoring its outputs, for a range of a map-style dataset or for the samples an iterable yields here."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from torch_pretrain_update.scoring.scores import compute_scores

__all__: list[str] = []  # private module

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(batch)`` for a tensor batch, ``model(batch[0])`` for a tuple/list batch such as ``(x, y)``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        return model(batch[0])
    raise TypeError(
        "score_dataset: a sample must be a tensor or a (input, ...) tuple/list to be scored by default; got a "
        f"batch of type {type(batch).__name__}. Pass forward=lambda model, batch: model(...) for other layouts, "
        "or input_key= (e.g. input_key=\"npy\") for dict samples."
    )


class KeyForward:
    """The default forward for dict batches: ``model(batch[input_key])``."""

    def __init__(self, input_key: str) -> None:
        self.input_key = input_key

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping) or self.input_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else None
            raise TypeError(f"score_dataset: input_key={self.input_key!r} needs dict batches holding that key; got "
                            + (f"a dict with keys {keys}" if keys is not None else f"a {type(batch).__name__}"))
        return model(batch[self.input_key])


_ITERABLE_HINT = ("dataset must be a map-style dataset (with __len__ and __getitem__) or an iterable of dict samples "
                  "that carry their integer index under '__index__' (as ShardDataset samples do)")


class _IndexedCollate:
    """Collate a list of samples into ``(indices, batch)``: the ``"__index__"`` of each sample as an int64 tensor,
    and ``collate_fn(samples)``. Runs where the batch is made (inside a DataLoader worker when there are any)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> tuple[torch.Tensor, Any]:
        indices = []
        for sample in samples:
            if not isinstance(sample, Mapping) or "__index__" not in sample:
                what = (f"a dict without '__index__' (keys {sorted(sample)})" if isinstance(sample, Mapping)
                        else f"a sample of type {type(sample).__name__}")
                raise TypeError(f"{_ITERABLE_HINT}; got {what}")
            try:
                i = operator.index(sample["__index__"])
            except TypeError:
                raise TypeError(f"{_ITERABLE_HINT}; got '__index__'={sample['__index__']!r}") from None
            if i < 0:
                raise ValueError(f"score_dataset: a sample's '__index__' must be >= 0; got {i}")
            indices.append(i)
        return torch.tensor(indices, dtype=torch.int64), self.collate_fn(samples)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_dataset(dataset: Any) -> int:
    """``len(dataset)`` for a map-style dataset, -1 for an iterable of indexed samples (checked as they come)."""
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return len(dataset)
    if isinstance(dataset, Iterable):
        return -1
    raise TypeError(f"{_ITERABLE_HINT}; got {type(dataset).__name__}")


def _output_scores(output: Any, rows: int, score: str, from_logits: bool, where: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != rows:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model output must be a (batch, classes) tensor; got {shape} for a batch of {rows} samples "
                         f"({where})")
    try:
        return compute_scores(output, score, from_logits=from_logits, name="model output")
    except ValueError as exc:  # say which samples: the scores module only knows batch rows
        raise ValueError(f"{exc} ({where})") from exc


@dataclass(frozen=True)
class ScoreSettings:
    """How a rank scores its share (the checked arguments of ``score_dataset``)."""

    score: str
    batch_size: int
    num_workers: int
    device: torch.device
    from_logits: bool
    forward: ForwardFn
    collate_fn: Callable[[list[Any]], Any]
    progress: bool

    def _progress(self, batches: Any) -> Any:
        if not self.progress:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, desc="score_dataset", unit="batch")

    def _scores(self, model: nn.Module, batch: Any, rows: int, where: str) -> torch.Tensor:
        output = self.forward(model, _to_device(batch, self.device))
        return _output_scores(output, rows, self.score, self.from_logits, where)

    def score_range(self, model: nn.Module, dataset: Any, start: int, stop: int) -> torch.Tensor:
        """Scores of samples ``[start, stop)`` in batches of ``batch_size`` (``start`` is on a batch boundary)."""
        out = torch.empty(stop - start, dtype=torch.float32)
        if stop <= start:
            return out
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=self.collate_fn,
                            pin_memory=self.device.type == "cuda")
        pos = 0
        for batch in self._progress(loader):
            rows = min(self.batch_size, stop - start - pos)
            where = f"dataset indices {start + pos}..{start + pos + rows - 1}"
            out[pos : pos + rows] = self._scores(model, batch, rows, where)
            pos += rows
        return out

    def score_iterable(self, model: nn.Module, dataset: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, scores)`` of the samples ``dataset`` yields here, in batches of consecutive samples."""
        collate = _IndexedCollate(self.collate_fn)
        batches: Any
        if self.num_workers > 0:
            if not isinstance(dataset, IterableDataset):
                raise ValueError(f"num_workers={self.num_workers} needs a map-style dataset or a torch "
                                 "IterableDataset (which splits itself between the workers); a plain iterable is "
                                 "read here: pass num_workers=0")
            batches = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                 collate_fn=collate, pin_memory=self.device.type == "cuda")
        else:
            batches = (collate(chunk) for chunk in _batched(dataset, self.batch_size))
        indices, scores = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.float32)]
        for idx, batch in self._progress(batches):
            where = f"batch of samples with '__index__' {idx[0].item()}..." if idx.numel() else "an empty batch"
            scores.append(self._scores(model, batch, idx.numel(), where).float().cpu())
            indices.append(idx)
        return torch.cat(indices), torch.cat(scores)
