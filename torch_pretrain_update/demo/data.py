"""The demo's data: sklearn's digits written to shards (or the user's shards) read into arrays, and each seed's
scenario: which samples are old / new, which classes were rare, and the shift of the new distribution."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from torch_pretrain_update import expand_urls, iter_shard_samples, parse_label, read_manifest, safe_decode, write_shards
from torch_pretrain_update._rng import mix_seed
from torch_pretrain_update.data.manifest_find import find_manifest
from torch_pretrain_update.demo.config import DemoConfig

__all__ = ["Arrays", "Scenario", "Split", "build_scenario", "load_shard_arrays", "make_split", "shift_and_noise",
           "write_digits_shards"]

# Fractions of each class that go to each part. A class rare in the old data gets ~10x fewer old samples, and
# (being removed less) is the common one in the new pool.
_NEW_TEST_FRAC = 0.17
_OLD_TEST_FRAC = {False: 0.14, True: 0.03}
_OLD_TRAIN_FRAC = {False: 0.40, True: 0.04}
_INPUT_KEYS = ("npy", "input.npy", "x.npy", "png", "jpg", "jpeg", "pgm", "ppm", "tiff", "bmp")


@dataclass
class Arrays:
    """Inputs scaled to [0, 1] (float32, one row per sample), integer labels, and where they came from."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    source: str
    shards: list[str] = field(default_factory=list)
    manifest: Optional[str] = None
    skipped: int = 0


def _digits_samples() -> list[dict[str, Any]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    return [
        {"__key__": f"digit-{i:05d}", "npy": images[i], "cls": int(digits.target[i])} for i in range(len(images))
    ]


def write_digits_shards(out_dir: str | os.PathLike, *, maxcount: int = 200) -> str:
    """Write sklearn's digits into ``out_dir/shards/digits-%06d.tar`` with a manifest; return its path."""
    pattern = os.path.join(os.fspath(out_dir), "shards", "digits-%06d.tar")
    return write_shards(_digits_samples(), pattern, maxcount=maxcount, label_key="cls", num_classes=10)


def load_shard_arrays(
    urls_or_pattern: str | Sequence[str],
    *,
    label_key: str = "cls",
    input_key: Optional[str] = None,
    manifest: Optional[str] = None,
    progress: Optional[bool] = None,
) -> Arrays:
    """Read labelled samples from WebDataset shards into arrays.

    Every shard is read with the strict reader (a truncated or corrupt shard is an error, not a silent loss)
    and decoded with :func:`~torch_pretrain_update.data.decode.safe_decode` (nothing is unpickled; images are
    decoded as grayscale). When a manifest is found next to the shards (or given), the sample counts are checked
    against it. Inputs are scaled to ``[0, 1]`` by the largest absolute value.

    Args:
        urls_or_pattern: shard urls or a brace pattern (``"data/train-{000000..000009}.tar"``).
        label_key: the member holding the integer label.
        input_key: the member holding the input (an ``.npy`` array or an image); by default the first of
            ``npy``, ``input.npy``, ``x.npy``, ``png``, ``jpg``, ... present in the first sample.
        manifest: manifest path; by default the one ``write_shards`` writes next to the shards, if present.
        progress: a bar over the shards: ``None`` on a terminal only, ``True`` always, ``False`` never.

    Raises:
        ValueError: no shards, a missing label/input member, inputs of different shapes, a count that
            differs from the manifest, fewer than 2 classes.
    """
    urls = expand_urls(urls_or_pattern)
    if not urls:
        raise ValueError(f"data: no shards match {urls_or_pattern!r}")
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url):
            raise ValueError(f"data: shard {url!r} does not exist")
    if manifest is None:
        manifest = find_manifest(urls)
    expected = None
    if manifest is not None:
        man = read_manifest(manifest)
        expected = {os.path.abspath(s.url): s.count for s in man.shards}
    decode = safe_decode(image="l")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    key = input_key
    disable = None if progress is None else not progress
    for url in tqdm(urls, desc="read shards", unit="shard", disable=disable, leave=False):
        count = 0
        for raw in iter_shard_samples(url):
            sample = decode(raw)
            count += 1
            if key is None:
                key = next((k for k in _INPUT_KEYS if k in sample), None)
                if key is None:
                    members = sorted(k for k in sample if not k.startswith("__"))
                    raise ValueError(
                        f"data: no input member found in sample {sample.get('__key__')!r} of {url!r}; members "
                        f"{members}; pass --input-key"
                    )
            if key not in sample:
                raise ValueError(f"data: sample {sample.get('__key__')!r} of {url!r} has no member {key!r}")
            if label_key not in sample:
                raise ValueError(
                    f"data: sample {sample.get('__key__')!r} of {url!r} has no label member {label_key!r}; "
                    "pass --label-key"
                )
            x = np.asarray(sample[key], dtype=np.float32)
            if x.ndim == 3 and x.shape[-1] == 1:
                x = x[..., 0]
            xs.append(x)
            ys.append(parse_label(sample[label_key]))
        if expected is not None:
            want = expected.get(os.path.abspath(url))
            if want is not None and want != count:
                raise ValueError(f"data: shard {url!r} holds {count} samples but its manifest says {want}")
    if not xs:
        raise ValueError(f"data: the shards {urls_or_pattern!r} hold no samples")
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"data: inputs must all have one shape; found {sorted(shapes)[:4]}")
    x = np.stack(xs).astype(np.float32)
    scale = float(np.abs(x).max())
    if not math.isfinite(scale):
        raise ValueError("data: inputs contain NaN or infinity")
    if scale > 0:
        x /= scale
    y = np.asarray(ys, dtype=np.int64)
    num_classes = int(y.max()) + 1
    if len(np.unique(y)) < 2:
        raise ValueError(f"data: need at least 2 classes; found labels {sorted(set(ys))}")
    return Arrays(x=x, y=y, num_classes=num_classes, source=str(urls_or_pattern), shards=urls, manifest=manifest)


# ----------------------------------------------------------------------------------------------- the split
@dataclass
class Split:
    """Index sets of one seed's scenario (into the arrays) and the classes that are rare in the old data."""

    old_train: np.ndarray
    old_test: np.ndarray
    pool: np.ndarray
    new_test: np.ndarray
    rare: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {k: int(len(getattr(self, k))) for k in ("old_train", "old_test", "pool", "new_test")}


def make_split(y: np.ndarray, num_classes: int, seed: int, fraction: float = 1.0) -> Split:
    """Disjoint old-train / old-test / new-pool / new-test parts; half the classes rare in the old data.

    Per class ``c`` with ``n_c`` samples (shuffled with the seed; only the first ``fraction`` of them used):
    17% new test; old test 14% (3% if rare); old train 40% (4% if rare); the rest is the new pool, so the rare
    classes dominate it. Every part gets at least one sample of every class.
    """
    rng = np.random.default_rng(mix_seed(seed, 1))
    present = np.unique(y)
    rare = np.sort(rng.permutation(present)[: len(present) // 2])
    parts: dict[str, list[np.ndarray]] = {"old_train": [], "old_test": [], "pool": [], "new_test": []}
    for c in present:
        idx = rng.permutation(np.flatnonzero(y == c))
        idx = idx[: max(1, int(round(fraction * len(idx))))]
        n = len(idx)
        if n < 8:
            raise ValueError(f"data: class {int(c)} has {n} samples; the demo needs at least 8 per class")
        is_rare = bool(np.isin(c, rare))
        a = max(1, int(_NEW_TEST_FRAC * n))
        b = max(1, int(_OLD_TEST_FRAC[is_rare] * n))
        t = max(1, int(_OLD_TRAIN_FRAC[is_rare] * n))
        parts["new_test"].append(idx[:a])
        parts["old_test"].append(idx[a : a + b])
        parts["old_train"].append(idx[a + b : a + b + t])
        parts["pool"].append(idx[a + b + t :])
    out = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    return Split(rare=rare.astype(np.int64), **out)


def shift_and_noise(x: np.ndarray, seed: int, *, noise: float, max_shift: int) -> np.ndarray:
    """The "new distribution" transform: each image translated by up to ``max_shift`` pixels in each direction
    (zero fill; images only, i.e. inputs with 2 dimensions per sample) plus Gaussian noise of std ``noise``,
    clipped to [0, 1]."""
    rng = np.random.default_rng(mix_seed(seed, 2))
    out = x.copy()
    if x.ndim == 3 and max_shift > 0:
        h, w = x.shape[1:]
        shifts = rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))
        out = np.zeros_like(x)
        for i, (dy, dx) in enumerate(shifts):
            ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
            xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
            out[i, yd, xd] = x[i, ys, xs]
    out = out + rng.normal(0.0, noise, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class Scenario:
    """One seed's tensors: the old train/test parts (clean), the new pool and new test (transformed)."""

    x_old_train: torch.Tensor
    y_old_train: torch.Tensor
    x_old_test: torch.Tensor
    y_old_test: torch.Tensor
    x_pool: torch.Tensor
    y_pool: torch.Tensor
    x_new_test: torch.Tensor
    y_new_test: torch.Tensor
    split: Split
    num_classes: int


def build_scenario(arrays: Arrays, seed: int, cfg: DemoConfig) -> Scenario:
    """One seed's :class:`Scenario`: :func:`make_split` of the labels, the new parts through
    :func:`shift_and_noise`."""
    split = make_split(arrays.y, arrays.num_classes, seed, cfg.data_fraction)
    x, y = arrays.x, arrays.y

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    x_pool = shift_and_noise(x[split.pool], mix_seed(seed, 3), noise=cfg.noise, max_shift=cfg.max_shift)
    x_new = shift_and_noise(x[split.new_test], mix_seed(seed, 4), noise=cfg.noise, max_shift=cfg.max_shift)
    return Scenario(
        x_old_train=t(x[split.old_train]), y_old_train=t(y[split.old_train]),
        x_old_test=t(x[split.old_test]), y_old_test=t(y[split.old_test]),
        x_pool=t(x_pool), y_pool=t(y[split.pool]),
        x_new_test=t(x_new), y_new_test=t(y[split.new_test]),
        split=split, num_classes=arrays.num_classes,
    )
