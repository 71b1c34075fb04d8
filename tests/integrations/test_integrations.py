"""Integrations, run for real: array-likes from other libraries (a Hugging Face ``datasets`` column) as inputs,
Lightning (set_epoch on the train loader's samplers and datasets, no double rank split, freezing before DDP wraps
the model, a real 2-process DDP run on CPU) and the Hugging Face ``Trainer`` (our sampler through
``_get_train_sampler``, a stream as an ``IterableDataset``). Tiny models built here, no downloads.

``lightning``, ``transformers`` and ``datasets`` are optional (the ``dev`` extra): their tests skip without them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pytest
import torch

import torch_pretrain_update as tpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; fail instead of reaching for the hub

LABELS = [0, 1, 1, 2, 0, 1, 1, 1, 2, 0, 3, 1]
WEIGHTS = [0.5, 1.0, 2.0, 1.0, 0.1, 0.3, 0.0, 4.0, 1.5, 0.2, 0.7, 1.1]
COUNTS = [30, 5, 0, 12]


class ArrayLike:
    """Not a tensor, ndarray or list, but what ``numpy.asarray`` takes (as a pandas Series or a pyarrow array)."""

    def __init__(self, values: list) -> None:
        self._values = values

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._values, dtype=dtype)

    def __len__(self) -> int:
        return len(self._values)


class SlicedColumn(Sequence):
    """A read-only ``Sequence`` that is not a list (as a Hugging Face ``datasets`` column)."""

    def __init__(self, values: list) -> None:
        self._values = values
        self.element_reads = 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._values[i]
        self.element_reads += 1
        return self._values[i]

    def __len__(self) -> int:
        return len(self._values)


def _plans(labels, weights, counts) -> dict[str, list]:
    """One epoch of every sampler, and what the weight functions and ``WeightedDataset`` give, from these inputs."""
    out = {
        "balanced": list(tpu.ClassBalancedSampler(labels, seed=3)),
        "stratified": list(tpu.StratifiedSampler(labels, 6, seed=3)),
        "weighted": list(tpu.WeightedSampler(weights, 20, seed=3)),
        "weighted_norepl": list(tpu.WeightedSampler(weights, 5, replacement=False, seed=3)),
        "entropy": list(tpu.EntropySampler.from_scores(weights, 4, seed=3)),
        "entropy_strat": list(tpu.EntropySampler.from_scores(weights, 6, stratify=labels, seed=3)),
        "subset_exclude": list(tpu.RandomSubsetSampler(12, 4, exclude=labels, seed=3)),
        "class_weights": tpu.class_weights(labels).tolist(),
        "sample_weights": tpu.sample_weights(labels, scheme="sqrt_inverse").tolist(),
        "from_counts": tpu.class_weights_from_counts(counts).tolist(),
        "weighted_dataset": [float(tpu.WeightedDataset(list(range(12)), weights)[i][1]) for i in range(12)],
    }
    return out


@pytest.mark.parametrize("wrap", [ArrayLike, SlicedColumn], ids=["__array__", "Sequence"])
def test_array_likes_are_inputs_like_ndarrays(wrap):
    want = _plans(np.asarray(LABELS), np.asarray(WEIGHTS), np.asarray(COUNTS))
    got = _plans(wrap(LABELS), wrap(WEIGHTS), wrap(COUNTS))
    assert got == want


def test_sequence_read_by_one_slice_not_element_by_element():
    col = SlicedColumn(LABELS)
    assert list(tpu.ClassBalancedSampler(col, shuffle=False)) == list(tpu.ClassBalancedSampler(LABELS, shuffle=False))
    assert col.element_reads == 0


@pytest.mark.parametrize("bad, match", [(ArrayLike(["a", "b"]), "weights must be a numeric"),
                                        (SlicedColumn([1.0, None]), "weights must be a sequence of numbers"),
                                        (SlicedColumn([[1.0], [2.0, 3.0]]), "weights must be")])
def test_array_like_that_is_not_numbers_names_the_argument(bad, match):
    with pytest.raises(TypeError, match=match):
        tpu.WeightedSampler(bad, 2)


def test_strings_and_dicts_still_refused():
    for bad in ("0112", b"0112", {0: 1}):
        with pytest.raises(TypeError, match="labels must be"):
            tpu.ClassBalancedSampler(bad)


def test_hf_datasets_column_accepted_everywhere():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"label": LABELS, "w": WEIGHTS})
    assert not isinstance(ds["label"], (list, tuple, np.ndarray, torch.Tensor))  # a Column object
    counts = datasets.Dataset.from_dict({"n": COUNTS})["n"]
    want = _plans(np.asarray(LABELS), np.asarray(WEIGHTS), np.asarray(COUNTS))
    assert _plans(ds["label"], ds["w"], counts) == want
    dn = ds.with_format("numpy")  # its columns slice to ndarrays
    assert _plans(dn["label"], dn["w"], counts) == want


# ----- shared by the framework tests ---------------------------------------------------------------------------
N, BATCH = 100, 10
BAL_LABELS = torch.tensor([0] * 40 + [1] * 30 + [2] * 20 + [3] * 10)


def _balanced_plan(epoch: int, **kw) -> list[int]:
    """The single-process plan of the sampler the Lightning DDP script and the HF test use (25 of each class)."""
    s = tpu.ClassBalancedSampler(BAL_LABELS, samples_per_class=25, seed=7, num_replicas=1, rank=0, **kw)
    s.set_epoch(epoch)
    return list(s)


def _stream_shards(tmp_path) -> str:
    from tests._support import shard_fixtures as fx

    return fx.write(tmp_path, fx.make_samples(24, vary=False), maxcount=6)  # 4 shards of 6


def _stream(manifest: str) -> tpu.WeightedWebDataset:
    return tpu.WeightedWebDataset(None, manifest=manifest, num_classes=3, seed=0)


def _stream_epoch_keys(manifest: str, epoch: int) -> list[str]:
    ref = _stream(manifest)
    ref.set_epoch(epoch)
    return [s["__key__"] for s in ref]


# ----- Lightning -----------------------------------------------------------------------------------------------
def _quiet_trainer(pl, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_lightning_callback_sets_the_stream_epoch(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch_pretrain_update.integrations.lightning import PretrainUpdateCallback

    manifest = _stream_shards(tmp_path)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.seen: dict[int, list[str]] = {}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_stream(manifest), batch_size=5)

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(batch["__key__"])
            return torch.nn.functional.cross_entropy(self.lin(batch["npy"]), batch["cls"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    _quiet_trainer(pl, max_epochs=3, callbacks=[PretrainUpdateCallback()]).fit(module)
    want = [_stream_epoch_keys(manifest, e) for e in range(3)]
    assert want[0] != want[1] != want[2]  # each epoch its own order
    assert [module.seen[e] for e in range(3)] == want


def test_lightning_split_check_with_a_fake_second_rank():
    pytest.importorskip("lightning.pytorch")
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from torch_pretrain_update.integrations.lightning import check_train_loader

    data = torch.utils.data.TensorDataset(torch.arange(N))
    ours = tpu.ClassBalancedSampler(BAL_LABELS, samples_per_class=25, seed=7, num_replicas=2, rank=0)
    assert len(ours) == 50
    check_train_loader(torch.utils.data.DataLoader(data, sampler=ours), 2, 0)  # the recipe: no error

    # what use_distributed_sampler=True does to it: a quarter of the plan on each rank, silently
    wrapped = DistributedSamplerWrapper(ours, num_replicas=2, rank=0, shuffle=False)
    assert len(list(wrapped)) == 25
    with pytest.raises(ValueError, match=r"Lightning wrapped ClassBalancedSampler\(num_replicas=2, rank=0\).*"
                                         r"use_distributed_sampler=False"):
        check_train_loader(torch.utils.data.DataLoader(data, sampler=wrapped), 2, 0)
    # the same for a sampler built before the process group existed (num_replicas=1)
    early = tpu.ClassBalancedSampler(BAL_LABELS, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="Lightning wrapped"):
        check_train_loader(torch.utils.data.DataLoader(
            data, sampler=DistributedSamplerWrapper(early, num_replicas=2, rank=1)), 2, 1)
    # unwrapped but for one rank under two: every rank would train on the whole plan
    with pytest.raises(ValueError, match=r"rank 0 of 1, but this process is rank 1 of world_size=2"):
        check_train_loader(torch.utils.data.DataLoader(data, sampler=early), 2, 1)
    # a torch sampler that Lightning is meant to wrap passes
    plain = DistributedSamplerWrapper(torch.utils.data.SubsetRandomSampler(range(10)), num_replicas=2, rank=0)
    check_train_loader(torch.utils.data.DataLoader(data, sampler=plain), 2, 0)


def test_lightning_split_check_refuses_a_stream_for_another_rank(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from torch_pretrain_update.integrations.lightning import check_train_loader

    loader = torch.utils.data.DataLoader(_stream(_stream_shards(tmp_path)), batch_size=4)
    check_train_loader(loader, 1, 0)
    with pytest.raises(ValueError, match=r"WeightedWebDataset\(num_replicas=1, rank=0\) splits its data for rank 0 "
                                         r"of 1, but this process is rank 0 of world_size=2"):
        check_train_loader(loader, 2, 0)


@pytest.mark.timeout(240)
def test_lightning_ddp_two_processes(tmp_path, monkeypatch, capfd):
    """The recipe under a real 2-process ``strategy="ddp"`` run (gloo, CPU): each rank trains on exactly its
    DistributedSampler-style share of the plan (50 of 100, not 25), frozen parameters never move, the ranks end
    identical; Lightning's default ``use_distributed_sampler=True`` is refused by the callback; freezing in
    ``configure_optimizers`` alone (after DDP wrapped the module) fails as DDP says it does."""
    pytest.importorskip("lightning.pytorch")
    import json
    import runpy
    import sys
    from pathlib import Path

    # The script forks its two ranks from the process that runs it: run here, it forks them from this test process,
    # which has imported Lightning already (a fresh interpreter spends ~10 s importing it).
    script = Path(__file__).resolve().parents[2] / "tests" / "_support" / "_lightning_ddp.py"
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path), "--late-freeze"])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    assert done.value.code == 0, out[-2000:] + err[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        plan = _balanced_plan(epoch)
        for r in range(2):
            assert ranks[r]["seen"][str(epoch)] == plan[r::2]  # 50 each, every index of the plan once
    assert _balanced_plan(0) != _balanced_plan(1)
    for r in range(2):
        assert ranks[r]["changed"] == ["2.bias", "2.weight"]  # the head trained, the body frozen
        assert ranks[r]["wrapped"].startswith("ValueError: Lightning wrapped ClassBalancedSampler(num_replicas=2")
        assert ranks[r]["late_freeze"].startswith("RuntimeError: ")
        assert "not used in producing the loss" in ranks[r]["late_freeze"]
    assert ranks[0]["params"] == ranks[1]["params"]


# ----- Hugging Face Trainer ------------------------------------------------------------------------------------
class _Recorder(torch.nn.Module):
    """A 1-layer classifier in the Trainer's convention (keyword inputs, ``{"loss": ...}`` out) that records the
    ids of the samples it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen: list[int] = []

    def forward(self, x, labels, ids):
        self.seen.extend(ids.tolist())
        return {"loss": torch.nn.functional.cross_entropy(self.lin(x), labels)}


def _hf_args(transformers, tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, learning_rate=0.1, seed=0, **kw)


def test_hf_trainer_trains_on_our_sampler_over_a_datasets_column(tmp_path):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from torch_pretrain_update.integrations.huggingface import PretrainUpdateTrainer

    g = torch.Generator().manual_seed(0)
    ds = datasets.Dataset.from_dict({"x": torch.randn(N, 4, generator=g).tolist(), "labels": BAL_LABELS.tolist(),
                                     "ids": list(range(N)), "unused": ["t"] * N})
    model = _Recorder()
    trainer = PretrainUpdateTrainer(
        model=model, args=_hf_args(transformers, tmp_path, per_device_train_batch_size=BATCH, num_train_epochs=2),
        train_dataset=ds,
        # the labels straight from the datasets column (a Column object, not a list)
        train_sampler=lambda d: tpu.ClassBalancedSampler(d["labels"], samples_per_class=25, seed=7, num_replicas=1,
                                                         rank=0))
    trainer.train()
    assert model.seen == _balanced_plan(0) + _balanced_plan(1)


def test_hf_trainer_streams_a_new_order_every_epoch(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch_pretrain_update.integrations.huggingface import PretrainUpdateTrainer

    manifest = _stream_shards(tmp_path)

    def collate(samples):
        return {"x": torch.stack([torch.as_tensor(s["npy"]) for s in samples]),
                "labels": torch.tensor([s["cls"] for s in samples]),
                "ids": torch.tensor([int(s["__key__"][1:]) for s in samples])}

    model = _Recorder()
    args = _hf_args(transformers, tmp_path, per_device_train_batch_size=6, max_steps=12, remove_unused_columns=False)
    PretrainUpdateTrainer(model=model, args=args, train_dataset=_stream(manifest), data_collator=collate).train()
    want = [[int(k[1:]) for k in _stream_epoch_keys(manifest, e)] for e in range(3)]
    assert want[0] != want[1]
    assert model.seen == want[0] + want[1] + want[2]


def test_hf_trainer_refuses_a_second_split(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch_pretrain_update.integrations.huggingface import PretrainUpdateTrainer

    data = torch.utils.data.TensorDataset(torch.arange(N))
    two = tpu.ClassBalancedSampler(BAL_LABELS, num_replicas=2, rank=1)
    trainer = PretrainUpdateTrainer(model=_Recorder(), args=_hf_args(transformers, tmp_path), train_dataset=data,
                                    train_sampler=two)
    with pytest.raises(ValueError, match=r"train_sampler: ClassBalancedSampler\(num_replicas=2, rank=1\) splits"):
        trainer.get_train_dataloader()
    with pytest.raises(TypeError, match="train_sampler must be"):
        PretrainUpdateTrainer(model=_Recorder(), args=_hf_args(transformers, tmp_path), train_sampler=[1, 2])
