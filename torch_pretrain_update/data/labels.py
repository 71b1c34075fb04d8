"""The one class-label parser of the data readers (stream, stages, shard dataset, ``write_shards``, inspection).

A label is accepted as

- a Python or numpy integer (``bool`` is refused: ``True`` is not a class);
- a 0-d or one-element 1-D integer tensor or array (``torch.tensor(3)``, ``np.array([3])``);
- the ASCII text webdataset writes for a ``.cls`` member: bytes or str holding an optional sign and the ASCII
  digits ``0-9``, with surrounding whitespace (``b" 6\\n"``); underscores (``"1_0"``) and other scripts' digits
  are refused.

and must be >= 0 (and below ``num_classes`` when that is given). Anything else raises ``ValueError`` with a
message that says what the value was; callers prefix where it was read (shard, ``__key__``, member).
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["parse_label"]

_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def parse_label(value: Any, num_classes: Optional[int] = None) -> int:
    """A class label as stored in a sample -> a Python int ``>= 0`` (and ``< num_classes`` when given).

    Args:
        value: an int, a numpy/torch integer scalar (0-d or shape ``(1,)``), or the ASCII bytes/str webdataset
            writes for ``.cls`` (see the module docstring for the exact rule).
        num_classes: when given, labels must be below it.

    Raises:
        ValueError: the value is not an integer label, is negative, or is not below ``num_classes``. The message
            says what the value was (callers add the shard and key).

    Example::

        >>> parse_label(b" 6\\n"), parse_label(np.int32(4)), parse_label(torch.tensor([5]))
        (6, 4, 5)
    """
    if type(value) is not int:  # the fast path: a decoded .cls is a plain int
        value = _as_int(value)
    if value < 0:
        if num_classes is None:
            raise ValueError(f"label {value} is negative")
        raise ValueError(f"label {value} out of range [0, num_classes={num_classes})")
    if num_classes is not None and value >= num_classes:
        raise ValueError(f"label {value} out of range [0, num_classes={num_classes})")
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        text = bytes(value).decode("ascii", "replace") if not isinstance(value, str) else value
        if not _INT_TEXT.fullmatch(text.strip(" \t\n\r\f\v")):
            shown = value[:20] if not isinstance(value, memoryview) else bytes(value[:20])
            raise ValueError(f"not an integer label: {shown!r}")
        return int(text)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0 and tuple(value.shape) != (1,):
            raise ValueError(f"a label must be a scalar; got shape {tuple(value.shape)}")
        if isinstance(value, torch.Tensor):
            is_int = not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        else:
            is_int = value.dtype.kind in "iu"
        if not is_int:
            raise ValueError(f"a label must have an integer dtype; got {value.dtype}")
        return int(value.reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"a label must be an integer; got {value!r} (of type {type(value).__name__}, not an "
                         "integer)")
    return int(value)
