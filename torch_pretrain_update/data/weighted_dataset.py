"""A map-style dataset wrapper that returns each sample together with its weight."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sized
from typing import Any, Callable, Optional, Union, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from torch_pretrain_update._checks import check_vector

__all__ = ["WeightedDataset"]

Weights = Union[torch.Tensor, np.ndarray, "list[float]", Callable[[int], float]]

_F32_MAX = float(torch.finfo(torch.float32).max)


class WeightedDataset(Dataset):
    """Wrap a map-style dataset so that ``dataset[i]`` also carries the weight of sample ``i``.

    Returns ``(sample, weight)``, or, when ``key`` is given, the sample dict with ``sample[key] = weight``.
    The weight is a 0-d ``torch.float32`` tensor, so the default ``collate_fn`` of
    :class:`~torch.utils.data.DataLoader` batches the weights into a float32 tensor of shape ``(B,)``.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        weights: a 1-D tensor/array/sequence of ``len(dataset)`` finite, non-negative weights (e.g. from
            :func:`~torch_pretrain_update.sample_weights`, entropy scores or a sampler's
            ``importance_weights()``), or a callable ``index -> float``; a callable's value is checked at each
            ``__getitem__`` (finite, non-negative, a real number) and an error names the index. Weights are
            float32, so a weight above float32's maximum (~3.4e38) is refused rather than turned into inf.
        key: if given, each sample must be a dict and the weight is stored under this key (the dict is
            shallow-copied, the wrapped dataset's sample is not modified; a sample that already has ``key`` is
            an error rather than a silent overwrite).

    Example::

        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> ds = WeightedDataset(TensorDataset(torch.randn(4, 3), labels), sample_weights(labels))
        >>> (x, y), w = ds[0]
        >>> w
        tensor(2.)
        >>> next(iter(DataLoader(ds, batch_size=4)))[1]
        tensor([2.0000, 0.6667, 0.6667, 0.6667])
    """

    def __init__(self, dataset: Any, weights: Weights, *, key: Optional[str] = None) -> None:
        if not hasattr(dataset, "__getitem__") or not isinstance(dataset, Sized):
            raise TypeError(
                f"dataset must be a map-style dataset with __getitem__ and __len__; got {type(dataset).__name__}"
            )
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(f"key must be None or a non-empty str; got {key!r}")
        self.dataset: Any = dataset
        self.key = key
        n = len(dataset)
        self._fn: Optional[Callable[[int], Any]] = None
        self._weights: Optional[torch.Tensor] = None
        if callable(weights) and not isinstance(weights, (torch.Tensor, np.ndarray)):
            self._fn = weights
        else:
            w = check_vector(weights, "weights", allow_empty=True)
            if w.numel() != n:
                raise ValueError(
                    f"weights must have one entry per sample: len(weights)={w.numel()} but len(dataset)={n}"
                )
            big = w > _F32_MAX  # finite in float64 but inf as the float32 weight
            if bool(big.any()):
                i = int(torch.nonzero(big)[0, 0])
                raise ValueError(
                    f"weights must be <= {_F32_MAX:.6g} (the weights are float32); got {w[i].item()} at index {i}"
                )
            self._weights = w.to(torch.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def weights(self) -> Optional[torch.Tensor]:
        """The float32 weight vector (None when weights come from a callable)."""
        return self._weights

    def weight(self, index: int) -> torch.Tensor:
        """The weight of sample ``index`` as a 0-d float32 tensor (checked when it comes from a callable)."""
        if self._fn is None:  # the constructor set the weight vector instead
            return cast(torch.Tensor, self._weights)[index]
        value = self._fn(index)
        if isinstance(value, (torch.Tensor, np.ndarray)):
            size = value.numel() if isinstance(value, torch.Tensor) else value.size
            if size != 1:
                raise ValueError(
                    f"weights({index!r}) must return a single number; got shape {tuple(value.shape)}"
                )
            value = value.reshape(()).item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"weights({index!r}) must return a real number; got {value!r} of type {type(value).__name__}"
            )
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weights({index!r}) must be finite and >= 0; got {value}")
        if value > _F32_MAX:
            raise ValueError(f"weights({index!r}) must be <= {_F32_MAX:.6g} (the weights are float32); got {value}")
        return torch.tensor(value, dtype=torch.float32)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        w = self.weight(index)
        if self.key is None:
            return sample, w
        if not isinstance(sample, dict):
            raise TypeError(
                f"key={self.key!r} needs dict samples; dataset[{index!r}] is a {type(sample).__name__}"
            )
        if self.key in sample:
            raise ValueError(
                f"dataset[{index!r}] already has key {self.key!r}; pass another key= to WeightedDataset"
            )
        out = dict(sample)
        out[self.key] = w
        return out

    def __repr__(self) -> str:
        src = "callable" if self._fn is not None else f"tensor of {len(self)}"
        return f"WeightedDataset({type(self.dataset).__name__}, weights={src}, key={self.key!r})"
