"""Cached teacher outputs: run the teacher once, store its logits next to each sample in WebDataset shards.

Running the teacher on every epoch of a large stream is the main cost of distillation. :func:`write_teacher_outputs`
runs it once (batched, under ``torch.inference_mode``, with a progress bar) and writes shards (through
:func:`~torch_pretrain_update.data.write.write_shards`, so with a JSON manifest of per-shard counts and checksums)
in which every sample carries its original members plus the teacher's output:

=====================================  ===========================================================================
member                                 content
=====================================  ===========================================================================
``teacher_logits.npy``                 dense logits, shape (C,) (or (L, C) for token outputs), ``dtype``
                                       (float16 by default)
``teacher_topk_logprobs.npy``          with ``topk=k``: the k largest ``log_softmax`` values (computed in float32,
                                       stored as ``dtype``), shape (k,) or (L, k), in decreasing order
``teacher_topk_indices.npy``           with ``topk=k``: their class indices (int16 when C <= 32768, else int32)
=====================================  ===========================================================================

Top-k members store *log-probabilities*, not logits: they keep the total mass of the top k classes, which the
sparse KD approximation needs (see :class:`~torch_pretrain_update.SparseTeacher`). float16 keeps about 3
significant digits: logits are stored to within a relative 2**-11 (and must stay below 65504 in magnitude; an
overflow is an error, not a silent inf).

The shards are read back strictly and without unpickling by
:func:`~torch_pretrain_update.training.teacher_reader.read_teacher_outputs`, whose samples
:func:`~torch_pretrain_update.training.teacher_reader.teacher_targets` turns into what :class:`KDLoss` takes. They work
with any WebDataset reader as well; written with a label member (``label_key="cls"``),
:class:`~torch_pretrain_update.data.stream.WeightedWebDataset` streams them from the manifest with class weights,
shuffling, rank splitting and resumption.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from torch_pretrain_update._checks import check_bool, check_int, check_str, short_repr
from torch_pretrain_update._dist import model_device
from torch_pretrain_update.data.decode import SafeDecoder
from torch_pretrain_update.data.member_decoder import UNSAFE_EXTENSIONS, member_extension
from torch_pretrain_update.data.write import write_shards

__all__ = ["write_teacher_outputs"]

TEACHER_LOGITS_KEY = "teacher_logits.npy"
TEACHER_TOPK_LOGPROBS_KEY = "teacher_topk_logprobs.npy"
TEACHER_TOPK_INDICES_KEY = "teacher_topk_indices.npy"
_TEACHER_KEYS = (TEACHER_LOGITS_KEY, TEACHER_TOPK_LOGPROBS_KEY, TEACHER_TOPK_INDICES_KEY)

_STORE_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_INT_EXTS = ("cls", "cls2", "class", "count", "index", "inx", "id")


def _npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes written without pickle (object arrays are refused by numpy)."""
    stream = io.BytesIO()
    np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model must return a logits tensor (or an object with a .logits tensor, as Hugging Face models do); "
            f"got {type(out).__name__}"
        )
    return logits


def _to_tensor(value: Any, key: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"sample {key!r}: member {name!r} is an object array; the model needs numbers")
        return torch.from_numpy(np.array(value)) if not value.flags.writeable else torch.from_numpy(value)
    if isinstance(value, (int, float, list, tuple)):
        return torch.as_tensor(value)
    raise TypeError(
        f"sample {key!r}: member {name!r} is a {type(value).__name__}, not a tensor or array; pass to_input= to "
        "turn it into the model's input (e.g. decode and normalise an image)"
    )


def _encode_member(name: str, value: Any, key: str) -> Any:
    """Values handed to ShardWriter: tensors/arrays under .npy are encoded here without pickle."""
    ext = member_extension(name)
    if ext in UNSAFE_EXTENSIONS:
        raise ValueError(
            f"sample {key!r}: member {name!r} is a pickle (.{ext}); the cached shards are read without unpickling, "
            "so drop or convert this member before caching teacher outputs"
        )
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if ext == "npy":
            if value.dtype == torch.bfloat16:
                raise TypeError(f"sample {key!r}: member {name!r} is bfloat16, which .npy cannot hold; cast it first")
            return _npy_bytes(value.numpy())
        if ext in _INT_EXTS and value.numel() == 1 and not value.is_floating_point():
            return int(value.item())
        if ext in ("json", "jsn"):
            return value.tolist()
        raise TypeError(
            f"sample {key!r}: cannot store a tensor under member {name!r}; name it '*.npy' (arrays), '*.cls' "
            "(integer labels) or '*.json'"
        )
    if isinstance(value, np.ndarray) and ext == "npy":
        if value.dtype == object:
            raise TypeError(f"sample {key!r}: member {name!r} is an object array (it would need pickle)")
        return _npy_bytes(value)
    if isinstance(value, np.integer) and ext in _INT_EXTS:
        return int(value)
    return value


class _TeacherRunner:
    """Runs the teacher on one batch and turns its output into per-sample members."""

    def __init__(self, model: Callable[[torch.Tensor], Any], topk: int | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.topk, self.dtype, self.device = model, topk, dtype, device
        self.num_classes: int | None = None

    def __call__(self, x: torch.Tensor, keys: Sequence[str]) -> list[dict[str, bytes]]:
        with torch.inference_mode():
            logits = _logits_of(self.model(x.to(self.device)))
            if logits.ndim < 2 or logits.shape[0] != len(keys):
                raise ValueError(
                    f"model output must be (B, C) or (B, ..., C) with B={len(keys)} (the batch); got shape "
                    f"{tuple(logits.shape)}"
                )
            if not logits.is_floating_point():
                raise TypeError(f"model output must be floating-point logits; got {short_repr(logits)}")
            c = logits.shape[-1]
            if self.num_classes is None:
                self.num_classes = c
            elif c != self.num_classes:
                raise ValueError(f"model output has {c} classes in this batch but {self.num_classes} before")
            self._check_finite(logits, keys, "the model's logits")
            if self.topk is None:
                stored = logits.to(self.dtype)
                self._check_finite(stored, keys, f"the logits cast to {self.dtype} (pass dtype=torch.float32)")
                arrays = stored.cpu().numpy()
                return [{TEACHER_LOGITS_KEY: _npy_bytes(arrays[j])} for j in range(len(keys))]
            if self.topk > c:
                raise ValueError(f"topk must be <= the number of classes {c}; got {self.topk}")
            lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            values, indices = torch.topk(lp, self.topk, dim=-1)
            stored = values.to(self.dtype)
            self._check_finite(stored, keys, f"the top-k log-probabilities cast to {self.dtype}")
            idx_dtype = torch.int16 if c <= 1 << 15 else torch.int32
            v = stored.cpu().numpy()
            i = indices.to(idx_dtype).cpu().numpy()
            return [{TEACHER_TOPK_LOGPROBS_KEY: _npy_bytes(v[j]), TEACHER_TOPK_INDICES_KEY: _npy_bytes(i[j])}
                    for j in range(len(keys))]

    @staticmethod
    def _check_finite(t: torch.Tensor, keys: Sequence[str], what: str) -> None:
        ok = torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
        if not bool(ok.all()):
            j = int(torch.nonzero(~ok)[0, 0])
            row = t[j].reshape(-1)
            bad = row[~torch.isfinite(row)][0]
            raise ValueError(f"sample {keys[j]!r}: {what} contain a non-finite value ({float(bad)})")


def _sample_batches(
    first: Mapping[str, Any],
    it: Iterator[Any],
    input_key: str,
    to_input: Callable[[Any], torch.Tensor] | None,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
    """Webdataset-style samples -> (stacked inputs, the samples' members to write)."""
    decoder = SafeDecoder(image=None, only=[input_key])
    buf_x: list[torch.Tensor] = []
    buf_s: list[dict[str, Any]] = []
    n = 0

    def all_samples() -> Iterator[Any]:
        yield first
        yield from it

    for sample in all_samples():
        if not isinstance(sample, Mapping):
            raise TypeError(f"samples_or_loader[{n}] must be a dict like the first one; got {type(sample).__name__}")
        key = sample.get("__key__")
        if isinstance(key, bytes):
            key = key.decode("utf-8")
        if not isinstance(key, str) or not key:  # a ValueError (a bad sample), not the TypeError of check_str
            raise ValueError(f"samples_or_loader[{n}] must have a non-empty string '__key__'; got {key!r}")
        if input_key not in sample:
            have = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"sample {key!r} has no input member input_key={input_key!r}; it has {have}")
        present = [k for k in _TEACHER_KEYS if k in sample]
        if present:
            raise ValueError(f"sample {key!r} already has teacher member(s) {present}")
        value = sample[input_key]
        if to_input is not None:
            x = to_input(value)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"to_input must return a torch.Tensor; got {type(x).__name__} for sample {key!r}")
        else:
            if isinstance(value, (bytes, bytearray, memoryview)):  # raw member: decode it safely by extension
                value = decoder.decode_sample({"__key__": key, input_key: bytes(value)})[input_key]
            x = _to_tensor(value, key, input_key)
        if buf_x and x.shape != buf_x[0].shape:
            raise ValueError(
                f"sample {key!r}: input shape {tuple(x.shape)} differs from {tuple(buf_x[0].shape)} of sample "
                f"{buf_s[0]['__key__']!r} in the same batch; use to_input= to resize, or batch_size=1"
            )
        members: dict[str, Any] = {"__key__": key}
        for name, v in sample.items():
            if not name.startswith("__"):
                members[name] = _encode_member(name, v, key)
        buf_x.append(x)
        buf_s.append(members)
        n += 1
        if len(buf_x) == batch_size:
            yield torch.stack(buf_x), buf_s
            buf_x, buf_s = [], []
    if buf_x:
        yield torch.stack(buf_x), buf_s


def _loader_batches(
    first: Any, it: Iterator[Any], batch_keys: Sequence[str]
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
    """DataLoader batches ``inputs`` or ``(inputs, *rest)`` -> (inputs, per-sample members named by batch_keys)."""
    index = 0

    def all_batches() -> Iterator[Any]:
        yield first
        yield from it

    for b, batch in enumerate(all_batches()):
        parts = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch) if isinstance(batch, (tuple, list)) \
            else None
        if parts is None or not parts or not isinstance(parts[0], torch.Tensor):
            raise TypeError(
                f"batch {b} must be an inputs tensor or a tuple/list (inputs, ...) with a tensor first; got "
                f"{short_repr(batch) if parts is None else type(parts[0]).__name__ + ' first'}"
            )
        if len(parts) > len(batch_keys):
            raise ValueError(
                f"batch {b} has {len(parts)} elements but batch_keys names {len(batch_keys)} ({list(batch_keys)}); "
                "pass one member name per element, e.g. batch_keys=('input.npy', 'cls', 'aux.npy')"
            )
        x = parts[0]
        n = x.shape[0] if x.ndim else 0
        if n == 0:
            raise ValueError(f"batch {b}: the inputs tensor must be (B, ...) with B >= 1; got shape {tuple(x.shape)}")
        for name, part in zip(batch_keys[1:], parts[1:]):
            if len(part) != n:
                raise ValueError(f"batch {b}: element {name!r} has {len(part)} entries for {n} inputs")
        samples = []
        keys_given = "__key__" in batch_keys[: len(parts)]
        for j in range(n):
            members: dict[str, Any] = {}
            for name, part in zip(batch_keys, parts):
                value = part[j]
                if name == "__key__":
                    members["__key__"] = str(value)
                else:
                    members[name] = value
            if not keys_given:
                members["__key__"] = f"{index:09d}"
            key = members["__key__"]
            for name in list(members):
                if name != "__key__":
                    members[name] = _encode_member(name, members[name], key)
            samples.append(members)
            index += 1
        yield x, samples


def write_teacher_outputs(
    model: Callable[[torch.Tensor], Any],
    samples_or_loader: Iterable[Any],
    pattern: str,
    *,
    topk: int | None = None,
    dtype: torch.dtype = torch.float16,
    input_key: str = "input.npy",
    to_input: Callable[[Any], torch.Tensor] | None = None,
    batch_keys: Sequence[str] = ("input.npy", "cls"),
    batch_size: int = 64,
    device: torch.device | str | None = None,
    maxcount: int = 1000,
    label_key: str | None = None,
    manifest_path: str | None = None,
    progress: bool = True,
    **writer_kwargs: Any,
) -> str:
    """Run ``model`` once over ``samples_or_loader`` and write shards whose samples carry its outputs.

    Two kinds of input, told apart by the first item:

    * **Samples** (dicts in webdataset's convention, e.g. a ``wds.WebDataset`` without decoding, or
      ``iter_shard_samples``): ``"__key__"`` plus members. The model's input is ``sample[input_key]``:
      a tensor or array, or raw ``bytes`` that are decoded safely by extension (``.npy`` without pickle), or
      whatever ``to_input(sample[input_key])`` returns (e.g. for images). Samples are batched ``batch_size`` at
      a time (inputs must have one shape per batch). Every member of the sample is written back unchanged
      (bytes as they were; tensors/arrays under ``*.npy`` re-encoded without pickle), metadata other than
      ``__key__`` (``__url__``, ...) is dropped, and the teacher members are added.
    * **Batches** (e.g. a ``DataLoader``): a tensor of inputs, or a tuple/list ``(inputs, *rest)``. Members are
      named by ``batch_keys`` (one per element, default ``("input.npy", "cls")``: inputs as ``.npy`` arrays,
      labels as ``.cls`` integers); an element named ``"__key__"`` supplies the keys, otherwise samples get the
      keys ``"000000000"``, ``"000000001"``, ... in order. The batches are used as they come (``batch_size``
      is ignored).

    The model runs under ``torch.inference_mode``; an ``nn.Module`` is put in ``eval()`` mode for the run and
    restored afterwards. It must return logits (B, C) or (B, ..., C) (or an object with ``.logits``).

    Args:
        model: the teacher (an ``nn.Module`` or any callable on a batch of inputs).
        samples_or_loader: samples or batches, see above.
        pattern: shard pattern with one ``%d`` field, e.g. ``"/data/teacher-%06d.tar"``.
        topk: None (default) stores dense logits; k stores the top-k log-probabilities and their indices.
        dtype: storage dtype of the logits / log-probabilities: ``torch.float16`` (default), ``float32`` or
            ``float64``.
        input_key: member holding the model input (samples only). Default ``"input.npy"``.
        to_input: optional ``value -> tensor`` applied to ``sample[input_key]`` (samples only).
        batch_keys: member names for the elements of each batch (batches only).
        batch_size: samples per teacher call (samples only). Default 64.
        device: where to run the model; defaults to the device of its first parameter (else CPU).
        maxcount: samples per shard (``write_shards``).
        label_key: label member to histogram in the manifest (e.g. ``"cls"``), or None (default).
        manifest_path: manifest location; default from the pattern (``teacher-%06d.tar`` ->
            ``teacher-manifest.json``).
        progress: show a tqdm progress bar (default True).
        **writer_kwargs: passed to ``webdataset.ShardWriter`` (e.g. ``mtime=0``).

    Returns:
        the manifest's path (for :func:`read_teacher_outputs`, ``inspect_shards``, ``WeightedWebDataset``).

    Raises:
        ValueError / TypeError: bad arguments, a sample without a key or input, inputs of different shapes in
        one batch, a pickle member (``.pyd``/``.pickle``/``.pkl``: it could not be read back safely), a model
        output that is not (B, ..., C) or not finite, or logits that overflow the storage dtype.

    Example::

        >>> loader = DataLoader(TensorDataset(x, y), batch_size=256)
        >>> manifest = write_teacher_outputs(teacher, loader, "/data/kd/teacher-%06d.tar", topk=64)
        >>> for sample in read_teacher_outputs(manifest): ...
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or a function); got {type(model).__name__}")
    if topk is not None:
        topk = check_int(topk, "topk", min_value=1)
    if dtype not in _STORE_DTYPES:
        allowed = ", ".join(str(d) for d in _STORE_DTYPES)
        raise ValueError(f"dtype must be one of {allowed} (numpy has no bfloat16); got {dtype!r}")
    input_key = check_str(input_key, "input_key")
    if to_input is not None and not callable(to_input):
        raise TypeError(f"to_input must be callable or None; got {type(to_input).__name__}")
    if isinstance(batch_keys, str) or not isinstance(batch_keys, Sequence) or not batch_keys:
        raise TypeError(f"batch_keys must be a non-empty sequence of member names; got {short_repr(batch_keys)}")
    batch_keys = [check_str(k, f"batch_keys[{i}]") for i, k in enumerate(batch_keys)]
    if len(set(batch_keys)) != len(batch_keys):
        raise ValueError(f"batch_keys must be distinct; got {list(batch_keys)}")
    batch_size = check_int(batch_size, "batch_size", min_value=1)
    progress = check_bool(progress, "progress")
    dev = torch.device(device) if device is not None else model_device(model)

    it = iter(samples_or_loader)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("samples_or_loader is empty: nothing to run the teacher on") from None
    if isinstance(first, Mapping):
        batches = _sample_batches(first, it, input_key, to_input, batch_size)
        unit_total = len(samples_or_loader) if isinstance(samples_or_loader, Sized) else None
    else:
        batches = _loader_batches(first, it, tuple(batch_keys))
        dataset = getattr(samples_or_loader, "dataset", None)
        unit_total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None

    runner = _TeacherRunner(model, topk, dtype, dev)
    from tqdm.auto import tqdm

    bar = tqdm(total=unit_total, desc="teacher outputs", unit="sample", disable=not progress)

    def outputs() -> Iterator[dict[str, Any]]:
        for x, samples in batches:
            extra = runner(x, [s["__key__"] for s in samples])
            for s, e in zip(samples, extra):
                s.update(e)
                yield s
            bar.update(len(samples))

    module = model if isinstance(model, nn.Module) and model.training else None  # put back in training mode after
    try:
        if module is not None:
            module.eval()
        return write_shards(outputs(), pattern, maxcount=maxcount, label_key=label_key,
                            manifest_path=manifest_path, progress=False, **writer_kwargs)
    finally:
        bar.close()
        if module is not None:
            module.train(True)
