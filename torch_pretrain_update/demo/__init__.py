"""End-to-end demo: update a pretrained model on drifted data under a budget and compare the strategies.

What it does (``pretrain-update demo``; see :func:`run_demo`):

1. **Data.** scikit-learn's bundled digits (1,797 real 8x8 images, no download) are written into WebDataset
   shards with a manifest (:func:`~torch_pretrain_update.data.shards.write_shards`) and read back through the strict
   shard reader and the safe decoder; ``--data`` reads the user's own shards instead.
2. **Old and new distributions** (per seed). Half the classes, chosen at random, are *rare* in the old data
   (about 10x fewer samples than the common classes). The *new* data is a shifted mix: those rare classes are
   now the common ones, and every new image is translated by up to one pixel and gets Gaussian noise.
   Four disjoint parts: old train, old test (old class mix, clean), new pool (what the update may draw from) and
   new test (balanced, transformed).
3. **Pretraining** of a small CNN (an MLP for non-image inputs) on the old train part.
4. **Update** with a budget (default 10% of the new pool): every selection strategy (random subset,
   stratified, entropy top-k, entropy proportional, class-balanced, entropy with a random half, and multi-round
   selection that re-scores the pool with the updated model each round) combined with every update method (plain
   fine-tuning, a partial update with the convolutional feature extractor frozen, and knowledge distillation from
   the old model with :class:`~torch_pretrain_update.training.distill.KDLoss`). All runs of one seed start from the same
   pretrained model, and every strategy gets the same training recipe (no strategy is tuned).
5. **Report**: accuracy on the new and the old distribution (forgetting), recall of the classes that were rare
   in the old data, samples used and wall time, as mean and sample standard deviation over the seeds, plus the
   paired difference to random selection; ``report.md``, ``results.json`` and ``results.png`` in ``--out``.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from torch_pretrain_update._checks import check_float, check_int
from torch_pretrain_update._rng import epoch_generator, mix_seed
from torch_pretrain_update.scoring.scores import entropy

__all__: list[str] = []  # a command, not library API: see ``pretrain-update demo --help``

#: selection strategies compared by the demo: (key, label in the table)
STRATEGIES: tuple[tuple[str, str], ...] = (
    ("random", "random subset"),
    ("stratified", "stratified (by class)"),
    ("entropy_topk", "entropy top-k"),
    ("entropy_proportional", "entropy proportional"),
    ("class_balanced", "class-balanced"),
    ("entropy_mix", "entropy top-k + 50% random"),
    ("rounds_topk", "multi-round entropy top-k"),
    ("rounds_mix", "multi-round top-k + 50% random"),
)
#: update methods: (key, label)
UPDATES: tuple[tuple[str, str], ...] = (
    ("finetune", "fine-tune all"),
    ("partial", "partial (features frozen)"),
    ("kd", "KD from old model"),
)
#: reference rows (not selection strategies): the old model as it is, and an update on the whole new pool
REFERENCES: tuple[tuple[str, str], ...] = (
    ("pretrained", "no update (old model)"),
    ("all_new", "all new data (no budget)"),
)
METRICS: tuple[str, ...] = ("new_acc", "old_acc", "minority_recall", "samples_used", "rare_share", "time_s")

# Fractions of each class that go to each part. A class rare in the old data gets ~10x fewer old samples, and
# (being removed less) is the common one in the new pool.
_NEW_TEST_FRAC = 0.17
_OLD_TEST_FRAC = {False: 0.14, True: 0.03}
_OLD_TRAIN_FRAC = {False: 0.40, True: 0.04}


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI fills it; the defaults are the full run)."""

    out: str = "demo_out"
    seeds: int = 5
    seed: int = 0
    budget: float = 0.1
    quick: bool = False
    data: Optional[str] = None
    label_key: str = "cls"
    input_key: Optional[str] = None
    rounds: int = 4
    pretrain_epochs: int = 60
    update_epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    mix_fraction: float = 0.5
    noise: float = 0.1
    max_shift: int = 1
    progress: Optional[bool] = None  # None: tqdm decides (on when stderr is a terminal)
    threads: int = 1  # torch threads per process (tiny models: more threads only add synchronisation)
    workers: int = 0  # processes running seeds in parallel; 0: min(2, CPUs, seeds)
    data_fraction: float = 1.0  # share of every class used at all (--quick: 0.5)

    def __post_init__(self) -> None:
        self.seeds = check_int(self.seeds, "seeds", min_value=1)
        self.seed = check_int(self.seed, "seed", min_value=0)
        self.budget = check_float(self.budget, "budget", low=0.0, high=1.0, low_inclusive=False)
        self.rounds = check_int(self.rounds, "rounds", min_value=2)
        self.pretrain_epochs = check_int(self.pretrain_epochs, "pretrain_epochs", min_value=1)
        self.update_epochs = check_int(self.update_epochs, "update_epochs", min_value=1)
        self.batch_size = check_int(self.batch_size, "batch_size", min_value=1)
        self.threads = check_int(self.threads, "threads", min_value=1)
        self.workers = check_int(self.workers, "workers", min_value=0)
        self.mix_fraction = check_float(self.mix_fraction, "mix_fraction", low=0.0, high=1.0)
        self.data_fraction = check_float(self.data_fraction, "data_fraction", low=0.0, high=1.0,
                                         low_inclusive=False)

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """The reduced run used by the test suite: 2 seeds, half the data, few epochs, 2 rounds (every strategy
        and update method still runs)."""
        base: dict[str, Any] = dict(quick=True, seeds=2, rounds=2, pretrain_epochs=15, update_epochs=8,
                                    data_fraction=0.5)
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------------------------------------------ data
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
    from torch_pretrain_update.data.shards import write_shards

    pattern = os.path.join(os.fspath(out_dir), "shards", "digits-%06d.tar")
    return write_shards(_digits_samples(), pattern, maxcount=maxcount, label_key="cls", num_classes=10)


def find_manifest(urls: Sequence[str]) -> Optional[str]:
    """The manifest ``write_shards`` would have written next to ``urls`` (``train-000001.tar`` ->
    ``train-manifest.json`` in the same folder), if it exists."""
    if not urls:
        return None
    first = urls[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    folder, name = os.path.split(first)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    prefix = stem.rstrip("0123456789")
    candidate = os.path.join(folder, prefix + "manifest.json")
    return candidate if os.path.isfile(candidate) else None


_INPUT_KEYS = ("npy", "input.npy", "x.npy", "png", "jpg", "jpeg", "pgm", "ppm", "tiff", "bmp")


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
    and decoded with :func:`~torch_pretrain_update.data.decode.safe_decode` (nothing is unpickled; images are decoded
    as grayscale). When a manifest is found next to the shards (or given), the sample counts are checked against
    it. Inputs are scaled to ``[0, 1]`` by the largest absolute value.

    Args:
        urls_or_pattern: shard urls or a brace pattern (``"data/train-{000000..000009}.tar"``).
        label_key: the member holding the integer label.
        input_key: the member holding the input (an ``.npy`` array or an image); by default the first of
            ``npy``, ``input.npy``, ``x.npy``, ``png``, ``jpg``, ... present in the first sample.
        manifest: manifest path; by default the one ``write_shards`` writes next to the shards, if present.

    Raises:
        ValueError: no shards, a missing label/input member, inputs of different shapes, a count that
            differs from the manifest, fewer than 2 classes.
    """
    from torch_pretrain_update.data.decode import safe_decode
    from torch_pretrain_update.data.shards import expand_urls, iter_shard_samples, parse_label, read_manifest

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
    for url in tqdm(urls, desc="read shards", unit="shard", disable=_disable(progress), leave=False):
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


# ---------------------------------------------------------------------------------------------------- model
class SmallCNN(nn.Module):
    """Two 3x3 convolutions (the ``features`` part) and a two-layer head. For (H, W) grayscale inputs."""

    def __init__(self, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32 * (height // 2) * (width // 2), 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


class SmallMLP(nn.Module):
    """One hidden layer as ``features``, a two-layer head. For inputs of any other shape (flattened)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(dim, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(sample_shape) == 2 and min(sample_shape) >= 2:
        return SmallCNN(sample_shape[0], sample_shape[1], num_classes)
    return SmallMLP(int(np.prod(sample_shape)), num_classes)


# ------------------------------------------------------------------------------------------ train and score
def _disable(progress: Optional[bool]) -> Optional[bool]:
    return None if progress is None else not progress


def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str,
    cfg: DemoConfig,
    epochs: int,
    seed: int,
    teacher: Optional[nn.Module] = None,
    on_epoch: Optional[Callable[[], None]] = None,
) -> None:
    """Train ``model`` in place on ``(x, y)``: Adam, ``cfg.lr``, ``cfg.batch_size``, a fresh shuffle per epoch.

    ``method``: ``"finetune"`` (every parameter), ``"partial"`` (``features`` frozen with
    :func:`~torch_pretrain_update.partial_optimizer`, only the head trains) or ``"kd"`` (every parameter,
    :class:`~torch_pretrain_update.training.distill.KDLoss`: ``(1 - alpha) * CE + alpha * T^2 * KL`` with the old model
    as the teacher).
    """
    from torch_pretrain_update.training.partial import partial_optimizer

    if method == "partial":
        opt = partial_optimizer(model, torch.optim.Adam, trainable="head.*", lr=cfg.lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    kd = None
    teacher_logits = torch.empty(0)
    if method == "kd":
        from torch_pretrain_update.training.distill import KDLoss

        if teacher is None:
            raise ValueError("method='kd' needs a teacher")
        kd = KDLoss(temperature=cfg.kd_temperature, alpha=cfg.kd_alpha)
        teacher_logits = predict_logits(teacher, x)  # the teacher is fixed: one forward pass, not one per epoch
    n = len(x)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, 7))
        for start in range(0, n, cfg.batch_size):
            b = order[start : start + cfg.batch_size]
            logits = model(x[b])
            if kd is not None:
                loss = kd(logits, teacher_logits[b], y[b])
            else:
                loss = F.cross_entropy(logits, y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch()


def evaluate(model: nn.Module, data: Scenario, rare: np.ndarray) -> dict[str, float]:
    """Accuracy on the new and old test parts and mean recall of the (old-)rare classes on the new test part."""
    pred_new = predict_logits(model, data.x_new_test).argmax(1).numpy()
    pred_old = predict_logits(model, data.x_old_test).argmax(1).numpy()
    y_new = data.y_new_test.numpy()
    recalls = [float((pred_new[y_new == c] == c).mean()) for c in rare if (y_new == c).any()]
    return {
        "new_acc": float((pred_new == y_new).mean()),
        "old_acc": float((pred_old == data.y_old_test.numpy()).mean()),
        "minority_recall": float(np.mean(recalls)) if recalls else float("nan"),
    }


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


# ------------------------------------------------------------------------------------------------- selection
def budget_count(cfg: DemoConfig, pool_size: int) -> int:
    return max(1, int(round(cfg.budget * pool_size)))


def pool_logits(model: nn.Module, x_pool: torch.Tensor) -> torch.Tensor:
    """The model's logits on the pool (the samplers score them: entropy, higher = less sure)."""
    return predict_logits(model, x_pool)


def select_one_shot(
    strategy: str, scen: Scenario, logits: torch.Tensor, budget: int, seed: int, cfg: DemoConfig
) -> torch.Tensor:
    """The pool indices a one-shot strategy gives the update: epoch 0 of the library sampler, i.e. exactly what
    a training loop would draw first. The update then trains on that fixed selection (a labelling budget);
    only class-balanced resampling can repeat an index (a class with fewer samples than its share)."""
    from torch_pretrain_update.sampling.entropy_sampler import EntropySampler
    from torch_pretrain_update.sampling.samplers import ClassBalancedSampler, RandomSubsetSampler, StratifiedSampler

    n = len(scen.y_pool)
    sampler: Any
    if strategy == "random":
        sampler = RandomSubsetSampler(n, budget, seed=seed)
    elif strategy == "stratified":
        sampler = StratifiedSampler(scen.y_pool, budget, seed=seed)
    elif strategy == "class_balanced":
        present = int(torch.unique(scen.y_pool).numel())
        sampler = ClassBalancedSampler(scen.y_pool, samples_per_class=max(1, budget // present), seed=seed)
    elif strategy == "entropy_topk":
        sampler = EntropySampler(logits, budget, from_logits=True, mode="topk", seed=seed)
    elif strategy == "entropy_proportional":
        sampler = EntropySampler(logits, budget, from_logits=True, mode="proportional", seed=seed)
    elif strategy == "entropy_mix":
        sampler = EntropySampler(logits, budget, from_logits=True, mode="topk", random_fraction=cfg.mix_fraction,
                                 seed=seed)
    else:
        raise ValueError(f"strategy must be one of the one-shot strategies; got {strategy!r}")
    sampler.set_epoch(0)
    return torch.tensor(list(sampler), dtype=torch.int64)


def select_rounds(
    strategy: str,
    scen: Scenario,
    old: nn.Module,
    budget: int,
    seed: int,
    cfg: DemoConfig,
    fit: Callable[[torch.Tensor], nn.Module],
) -> tuple[torch.Tensor, nn.Module]:
    """Multi-round selection with :class:`~torch_pretrain_update.sampling.rounds.SelectionRounds`: score the
    pool with the current model (entropy), take this round's share (never an index picked before), update the
    *old* model on everything picked so far with ``fit``, repeat. Returns the final picks and the final model,
    which is therefore trained exactly like a one-shot strategy's model, on a selection of the same size."""
    from torch_pretrain_update.sampling.rounds import SelectionRounds

    fraction = cfg.mix_fraction if strategy == "rounds_mix" else 0.0
    if strategy not in ("rounds_topk", "rounds_mix"):
        raise ValueError(f"strategy must be 'rounds_topk' or 'rounds_mix'; got {strategy!r}")
    rounds = SelectionRounds(len(scen.y_pool), budget, cfg.rounds, strategy="topk", random_fraction=fraction,
                             seed=seed)
    model = old
    for _ in range(cfg.rounds):
        scores = entropy(pool_logits(model, scen.x_pool), from_logits=True)
        rounds.next_round(scores)
        model = fit(torch.as_tensor(rounds.chosen, dtype=torch.int64))
    return torch.as_tensor(rounds.chosen, dtype=torch.int64), model


# -------------------------------------------------------------------------------------------------- the run
def _stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (ddof=1), min, max and the values; all None when a value is undefined (NaN)."""
    a = np.asarray(values, dtype=np.float64)
    if np.isnan(a).any():
        return {"mean": None, "std": None, "min": None, "max": None, "per_seed": [None] * len(a)}
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "per_seed": [float(v) for v in a],
    }


def _env() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole comparison and write ``report.md``, ``results.json`` and ``results.png`` into ``cfg.out``.

    Returns a dict with ``"results"`` (what ``results.json`` holds), ``"table"`` (the printed table),
    ``"files"`` and ``"wall_s"``.
    """
    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        if cfg.data is None:
            manifest = write_digits_shards(out)
            from torch_pretrain_update.data.shards import read_manifest

            arrays = load_shard_arrays(read_manifest(manifest).urls, label_key="cls", manifest=manifest,
                                       progress=cfg.progress)
            arrays.source = "scikit-learn digits (1,797 8x8 images), written to WebDataset shards"
        else:
            arrays = load_shard_arrays(cfg.data, label_key=cfg.label_key, input_key=cfg.input_key,
                                       progress=cfg.progress)
        per_seed = _run_seeds(arrays, cfg)
    finally:
        torch.set_num_threads(threads)
    results = _aggregate(per_seed, arrays, cfg)
    results["wall_s"] = time.perf_counter() - t_start
    results["cpu_s"] = _cpu_seconds() - cpu_start  # this process and its (finished) worker processes
    results["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = format_table(results)
    files = write_outputs(results, table, out)
    return {"results": results, "table": table, "files": files, "wall_s": results["wall_s"]}


_RUNS_PER_SEED = len(UPDATES) * (len(STRATEGIES) + 1)


def num_workers(cfg: DemoConfig) -> int:
    """Processes the seeds run in: ``cfg.workers``, or by default ``min(2, CPUs)``; never more than seeds."""
    return min(cfg.workers or min(2, os.cpu_count() or 1), cfg.seeds)
_worker_queue: Any = None  # set in each worker process by _init_worker


def _init_worker(queue: Any, threads: int) -> None:
    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(threads)


def _seed_in_worker(arrays: Arrays, seed: int, cfg: DemoConfig) -> dict[str, Any]:
    return _run_seed(arrays, seed, cfg, tick=_worker_queue.put)


def _run_seeds(arrays: Arrays, cfg: DemoConfig) -> list[dict[str, Any]]:
    """Every seed's runs, in seed order; in ``cfg.workers`` processes (spawned: nothing inherited but the
    arguments) when more than one. Each seed is a pure function of its inputs, so the numbers do not depend on
    the number of processes (only the wall times do)."""
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    workers = num_workers(cfg)
    disable = _disable(cfg.progress)
    totals = {"pretrain": len(seeds) * cfg.pretrain_epochs, "score": len(seeds), "update": len(seeds) * _RUNS_PER_SEED}
    units = {"pretrain": "epoch", "score": "seed", "update": "run"}
    bars = {k: tqdm(total=totals[k], desc=f"{k:<8}", unit=units[k], disable=disable, position=i, leave=False)
            for i, k in enumerate(totals)}
    try:
        if workers <= 1:
            return [_run_seed(arrays, seed, cfg, tick=lambda kind: bars[kind].update(1)) for seed in seeds]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads is not safe
        queue = ctx.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, cfg.threads)) as pool:
            futures = [pool.submit(_seed_in_worker, arrays, seed, cfg) for seed in seeds]
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.2)
                while not queue.empty():
                    bars[queue.get()].update(1)
            while not queue.empty():
                bars[queue.get()].update(1)
            return [f.result() for f in futures]
    finally:
        for bar in bars.values():
            bar.close()


def _run_seed(arrays: Arrays, seed: int, cfg: DemoConfig, tick: Callable[[str], None]) -> dict[str, Any]:
    """One seed: scenario, pretraining, then every (strategy, update) run. ``tick(phase)`` reports progress
    (``"pretrain"`` per epoch, ``"score"`` once, ``"update"`` per run)."""
    scen = build_scenario(arrays, seed, cfg)
    rare = scen.split.rare
    rare_mask = torch.from_numpy(np.isin(scen.y_pool.numpy(), rare))
    budget = budget_count(cfg, len(scen.y_pool))

    torch.manual_seed(mix_seed(seed, 5))
    old = make_model(tuple(scen.x_old_train.shape[1:]), scen.num_classes)
    t0 = time.perf_counter()
    train(old, scen.x_old_train, scen.y_old_train, method="finetune", cfg=cfg, epochs=cfg.pretrain_epochs,
          seed=mix_seed(seed, 6), on_epoch=lambda: tick("pretrain"))
    pretrain_s = time.perf_counter() - t0
    runs: dict[tuple[str, str], dict[str, float]] = {}
    base = evaluate(old, scen, rare)
    runs[("pretrained", "-")] = {**base, "samples_used": 0.0, "rare_share": float("nan"), "time_s": 0.0}

    t0 = time.perf_counter()
    logits = pool_logits(old, scen.x_pool)
    score_s = time.perf_counter() - t0
    tick("score")

    one_shot = [k for k, _ in STRATEGIES if not k.startswith("rounds_")]
    multi = [k for k, _ in STRATEGIES if k.startswith("rounds_")]

    def fit(indices: torch.Tensor, method: str, run_seed: int) -> tuple[nn.Module, float]:
        model = copy.deepcopy(old)
        t = time.perf_counter()
        train(model, scen.x_pool[indices], scen.y_pool[indices], method=method, cfg=cfg,
              epochs=cfg.update_epochs, seed=run_seed, teacher=old)
        return model, time.perf_counter() - t

    def record(key: tuple[str, str], model: nn.Module, indices: torch.Tensor, took: float) -> None:
        uniq = torch.unique(indices)
        runs[key] = {**evaluate(model, scen, rare), "samples_used": float(uniq.numel()),
                     "rare_share": float(rare_mask[indices].float().mean()), "time_s": took}
        tick("update")

    for strategy in one_shot:
        t = time.perf_counter()
        chosen = select_one_shot(strategy, scen, logits, budget, seed, cfg)
        select_s = time.perf_counter() - t + (score_s if strategy.startswith("entropy") else 0.0)
        for method, _ in UPDATES:
            model, took = fit(chosen, method, mix_seed(seed, 8))
            record((strategy, method), model, chosen, select_s + took)
    for strategy in multi:
        for method, _ in UPDATES:
            t = time.perf_counter()
            chosen, model = select_rounds(
                strategy, scen, old, budget, seed, cfg,
                lambda idx, method=method: fit(idx, method, mix_seed(seed, 8))[0],
            )
            record((strategy, method), model, chosen, time.perf_counter() - t)
    everything = torch.arange(len(scen.y_pool))
    for method, _ in UPDATES:
        model, took = fit(everything, method, mix_seed(seed, 8))
        record(("all_new", method), model, everything, took)
    return {
        "seed": seed,
        "budget": budget,
        "split": scen.split.sizes(),
        "rare_classes": [int(c) for c in rare],
        "pool_rare_share": float(rare_mask.float().mean()),
        "pretrain_s": pretrain_s,
        "runs": runs,
    }


def _aggregate(per_seed: list[dict[str, Any]], arrays: Arrays, cfg: DemoConfig) -> dict[str, Any]:
    labels = dict(STRATEGIES) | dict(REFERENCES)
    update_labels = dict(UPDATES) | {"-": "-"}
    keys = [("pretrained", "-")]
    for method, _ in UPDATES:
        keys += [(s, method) for s, _ in STRATEGIES] + [("all_new", method)]
    rows = []
    for strategy, method in keys:
        metrics = {m: _stats([r["runs"][(strategy, method)][m] for r in per_seed]) for m in METRICS}
        row: dict[str, Any] = {
            "strategy": strategy,
            "strategy_label": labels[strategy],
            "update": method,
            "update_label": update_labels[method],
            "kind": "reference" if strategy in dict(REFERENCES) else "strategy",
            "metrics": metrics,
        }
        if row["kind"] == "strategy" and strategy != "random":
            diffs = [r["runs"][(strategy, method)]["new_acc"] - r["runs"][("random", method)]["new_acc"]
                     for r in per_seed]
            row["new_acc_minus_random"] = _stats(diffs)
        else:
            row["new_acc_minus_random"] = None
        rows.append(row)
    cfg_dict = asdict(cfg)
    return {
        "config": cfg_dict,
        "environment": _env() | {"torch_threads": cfg.threads, "processes": num_workers(cfg)},
        "data": {
            "source": arrays.source,
            "samples": int(len(arrays.y)),
            "num_classes": arrays.num_classes,
            "input_shape": list(arrays.x.shape[1:]),
            "shards": [os.path.basename(u) for u in arrays.shards],
            "manifest": arrays.manifest,
        },
        "strategies": [k for k, _ in STRATEGIES],
        "updates": [k for k, _ in UPDATES],
        "references": [k for k, _ in REFERENCES],
        "metrics": list(METRICS),
        "seeds": [
            {k: r[k] for k in ("seed", "budget", "split", "rare_classes", "pool_rare_share", "pretrain_s")}
            for r in per_seed
        ],
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------- output
def _pm(stat: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (printed as is): one row per (update method, strategy)."""
    head = ("| update | strategy | new acc % | Δ new vs random (pts) | old acc % | minority recall % | "
            "samples | time s |")
    lines = [head, "|" + "---|" * 8]
    for row in results["rows"]:
        m = row["metrics"]
        diff = row["new_acc_minus_random"]
        samples = m["samples_used"]
        sample_text = f"{samples['mean']:.0f}" if samples["std"] == 0 else f"{samples['mean']:.1f}"
        lines.append(
            f"| {row['update_label']} | {row['strategy_label']} | {_pm(m['new_acc'])} | "
            f"{'-' if diff is None else _pm(diff)} | {_pm(m['old_acc'])} | {_pm(m['minority_recall'])} | "
            f"{sample_text} | {_pm(m['time_s'], 1.0, 2)} |"
        )
    return "\n".join(lines)


def _row(results: dict[str, Any], strategy: str, update: str) -> dict[str, Any]:
    return next(r for r in results["rows"] if r["strategy"] == strategy and r["update"] == update)


def _paired(results: dict[str, Any], a: str, b: str, update: str, metric: str = "new_acc") -> dict[str, Any]:
    """Per-seed ``a - b`` of ``metric`` for one update method (same seeds, same order)."""
    va = _row(results, a, update)["metrics"][metric]["per_seed"]
    vb = _row(results, b, update)["metrics"][metric]["per_seed"]
    return _stats([x - y for x, y in zip(va, vb)])


_ABOVE, _WITHIN, _BELOW, _EQUAL = ("more than one std above", "within one std of", "more than one std below",
                                   "equal to")


def _verdict(stat: dict[str, Any]) -> str:
    """Where the mean paired difference lies relative to its own standard deviation over the seeds (a plain
    description, not a significance test)."""
    if stat["std"] == 0.0 and stat["mean"] == 0.0:
        return _EQUAL
    if stat["mean"] > stat["std"]:
        return _ABOVE
    if stat["mean"] < -stat["std"]:
        return _BELOW
    return _WITHIN


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers of this run (nothing here is fixed in advance)."""
    labels = dict(STRATEGIES)
    lines = []
    n = len(results["seeds"])
    base = _row(results, "pretrained", "-")["metrics"]
    lines.append(
        f"The old model reaches {_pm(base['old_acc'])} % on the old distribution but {_pm(base['new_acc'])} % on "
        f"the new one (recall of the old-rare classes {_pm(base['minority_recall'])} %)."
    )
    for method, mlabel in UPDATES:
        strat_rows = [_row(results, s, method) for s, _ in STRATEGIES]
        best = max(strat_rows, key=lambda r: r["metrics"]["new_acc"]["mean"])
        worst = min(strat_rows, key=lambda r: r["metrics"]["new_acc"]["mean"])
        rnd = _row(results, "random", method)["metrics"]["new_acc"]
        allnew = _row(results, "all_new", method)["metrics"]["new_acc"]
        groups: dict[str, list[str]] = {_ABOVE: [], _WITHIN: [], _BELOW: [], _EQUAL: []}
        for r in strat_rows:
            if r["strategy"] == "random":
                continue
            d = r["new_acc_minus_random"]
            groups[_verdict(d)].append(f"{labels[r['strategy']]} ({d['mean'] * 100:+.1f} ± {d['std'] * 100:.1f})")
        text = (
            f"**{mlabel}**: highest new-distribution accuracy with {best['strategy_label']} "
            f"({_pm(best['metrics']['new_acc'])} %), lowest with {worst['strategy_label']} "
            f"({_pm(worst['metrics']['new_acc'])} %); random subset {_pm(rnd)} %, all new data (no budget) "
            f"{_pm(allnew)} %. Paired difference to random (points, mean ± std over {n} seeds): "
        )
        parts = []
        for verdict in (_ABOVE, _WITHIN, _BELOW, _EQUAL):
            if groups[verdict]:
                parts.append(f"{verdict} random: {', '.join(groups[verdict])}")
        lines.append(text + "; ".join(parts) + ".")
        for one, many in (("entropy_topk", "rounds_topk"), ("entropy_mix", "rounds_mix")):
            d = _paired(results, many, one, method)
            lines.append(
                f"{mlabel}: {labels[many]} vs one-shot {labels[one]}: {d['mean'] * 100:+.1f} ± "
                f"{d['std'] * 100:.1f} points of new accuracy ({_verdict(d)} 0)."
            )
    forget = []
    for method, mlabel in UPDATES:
        drops = [(_row(results, s, method)["metrics"]["old_acc"]["mean"] - base["old_acc"]["mean"]) * 100
                 for s, _ in STRATEGIES]
        forget.append(f"{mlabel} {np.mean(drops):+.1f}")
    lines.append(
        "Old-distribution accuracy after the budgeted update, change from the old model averaged over the "
        f"strategies (points): {', '.join(forget)}."
    )
    if n < 5:
        lines.append(
            f"With {n} seeds the spread is itself uncertain: a difference within one standard deviation is no "
            "measured difference, and one just outside it is weak evidence (run `--seeds 5` or more to firm it up)."
        )
    return lines


def _describe(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    seeds = results["seeds"]
    split = seeds[0]["split"]
    d = results["data"]
    pool = split["pool"]
    model = "a small CNN (two 3x3 convolutions + a two-layer head)" if len(d["input_shape"]) == 2 else (
        "a small MLP (one hidden layer + a two-layer head)")
    return [
        f"- **Data**: {d['source']}; {d['samples']} samples, {d['num_classes']} classes, input shape "
        f"{tuple(d['input_shape'])}" + (f", read back from {len(d['shards'])} shards checked against their manifest"
                                         if d["manifest"] else "") + ".",
        "- **Old distribution**: half of the classes (drawn per seed) are rare: 4% of each rare class vs 40% of "
        f"each common class goes to old training ({split['old_train']} samples for seed {seeds[0]['seed']}); "
        f"old test: clean images with the old class mix ({split['old_test']} samples).",
        "- **New distribution**: the rest of each class goes to the new pool, where the old-rare classes are now "
        f"the majority ({seeds[0]['pool_rare_share'] * 100:.0f}% of {pool} samples for seed {seeds[0]['seed']}); "
        f"every new image is shifted by up to {cfg['max_shift']} pixel and gets Gaussian noise (std "
        f"{cfg['noise']}). New test: 17% of every class, transformed ({split['new_test']} samples).",
        f"- **Budget**: {cfg['budget'] * 100:g}% of the new pool = {_span([x['budget'] for x in seeds])} samples "
        "for the update (the pool size varies a little with the seed's rare classes).",
        f"- **Model**: {model}; pretrained {cfg['pretrain_epochs']} epochs on the old training part (Adam, lr "
        f"{cfg['lr']}, batch {cfg['batch_size']}).",
        f"- **Update** (same recipe for every strategy, nothing tuned per strategy): {cfg['update_epochs']} epochs, "
        f"Adam lr {cfg['lr']}, batch {cfg['batch_size']}, starting from the old model. *fine-tune all*: every "
        "parameter; *partial*: the convolutional feature extractor frozen and left out of the optimizer "
        "(`partial_optimizer(model, Adam, trainable='head.*')`); *KD*: every parameter, "
        f"`KDLoss(temperature={cfg['kd_temperature']}, alpha={cfg['kd_alpha']})` with the old model as teacher.",
        "- **Strategies** (library samplers, epoch 0 of each): *random subset* `RandomSubsetSampler`; "
        "*stratified* `StratifiedSampler` on the pool's labels; *entropy top-k* / *proportional* `EntropySampler` "
        "on the old model's predictive entropy; *class-balanced* `ClassBalancedSampler` (budget / classes per "
        f"class); *entropy top-k + {cfg['mix_fraction'] * 100:g}% random* `EntropySampler(random_fraction="
        f"{cfg['mix_fraction']})`; *multi-round* `SelectionRounds` over {cfg['rounds']} rounds: each round the pool "
        "is re-scored by the model updated on everything picked so far (the same recipe, from the old model), "
        "so its final model is trained exactly like the one-shot ones; its time includes every round.",
        "- **Metrics**: *new acc* and *old acc*: accuracy on the new and old test parts (old acc shows "
        "forgetting); *minority recall*: mean recall on the new test part of the classes that were rare in the "
        "old data; *samples*: distinct pool samples used; *time*: wall time of scoring, selection and update. "
        "Values are mean ± sample standard deviation over the seeds; *Δ new vs random* is the paired difference "
        "to random selection on the same seed and update method.",
    ]


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def format_report(results: dict[str, Any], table: str) -> str:
    cfg = results["config"]
    seeds = [s["seed"] for s in results["seeds"]]
    env = results["environment"]
    when = results.get("date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        "# pretrain-update demo: updating a pretrained model on drifted data under a budget",
        "",
        f"Generated by `pretrain-update demo{' --quick' if cfg['quick'] else ''}` on {when}: {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), total wall time {results['wall_s']:.1f} s, CPU time "
        f"{results['cpu_s']:.1f} s ({env['processes']} process(es) with {env['torch_threads']} torch thread "
        f"each, {env['cpu_count']} CPUs visible), torch {env['torch']}.",
        "",
        "## Setup",
        "",
        *_describe(results),
        "",
        "## Results",
        "",
        table,
        "",
        "![new vs old accuracy per strategy](results.png)",
        "",
        "## What this run shows",
        "",
        "Generated from the numbers above; whatever they show is reported, no strategy was tuned.",
        "",
        *[f"- {line}" for line in observations(results)],
        "",
    ]
    return "\n".join(lines)


_MARKERS = "osD^v<>Xph*"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """``results.png``: accuracy on the new vs the old distribution, one panel per update method."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(UPDATES), figsize=(5.2 * len(UPDATES), 5.0), sharex=True, sharey=True)
    base = _row(results, "pretrained", "-")["metrics"]
    tab10 = plt.get_cmap("tab10")
    colors = [tab10(i) for i in range(10) if i != 7]  # tab10's grey (7) is left to the reference points
    for ax, (method, mlabel) in zip(np.atleast_1d(axes), UPDATES):
        for i, (strategy, slabel) in enumerate(STRATEGIES):
            m = _row(results, strategy, method)["metrics"]
            ax.errorbar(m["new_acc"]["mean"] * 100, m["old_acc"]["mean"] * 100, xerr=m["new_acc"]["std"] * 100,
                        yerr=m["old_acc"]["std"] * 100, fmt=_MARKERS[i % len(_MARKERS)],
                        color=colors[i % len(colors)],
                        label=slabel, capsize=3, markersize=7)
        m = _row(results, "all_new", method)["metrics"]
        ax.errorbar(m["new_acc"]["mean"] * 100, m["old_acc"]["mean"] * 100, xerr=m["new_acc"]["std"] * 100,
                    yerr=m["old_acc"]["std"] * 100, fmt="*", color="black", markersize=11, capsize=3,
                    label="all new data (no budget)")
        ax.errorbar(base["new_acc"]["mean"] * 100, base["old_acc"]["mean"] * 100, xerr=base["new_acc"]["std"] * 100,
                    yerr=base["old_acc"]["std"] * 100, fmt="P", color="gray", markersize=9, capsize=3,
                    label="no update (old model)")
        ax.set_title(mlabel)
        ax.set_xlabel("accuracy on the new distribution (%)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy on the old distribution (%)")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, frameon=False)
    n = len(results["seeds"])
    fig.suptitle(f"Budget {results['config']['budget'] * 100:g}% of the new pool; mean ± std over {n} seeds")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], table: str, out: Path) -> list[str]:
    """Write ``results.json``, ``report.md`` and ``results.png``; return their paths."""
    paths = [out / "report.md", out / "results.json", out / "results.png"]
    paths[1].write_text(json.dumps(results, indent=1, allow_nan=False, default=_json_default) + "\n")
    paths[0].write_text(format_report(results, table))
    plot_results(results, paths[2])
    return [str(p) for p in paths]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
