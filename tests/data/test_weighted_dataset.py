"""WeightedDataset: (sample, weight) pairs that a real DataLoader batches into float32 weight tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torch_pretrain_update.data.weighted_dataset import WeightedDataset
from torch_pretrain_update.scoring.weights import sample_weights


class DictDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((2,), float(i)), "y": i % 3}


def test_tuple_samples_and_default_collate_batch_weights_as_float32():
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 0, 1, 1, 1])
    x = torch.randn(10, 3)
    w = sample_weights(labels)
    ds = WeightedDataset(TensorDataset(x, labels), w)
    assert len(ds) == 10
    (xi, yi), wi = ds[4]
    assert torch.equal(xi, x[4]) and int(yi) == 2
    assert wi.dtype == torch.float32 and wi.shape == () and float(wi) == float(w[4])
    batches = list(DataLoader(ds, batch_size=4, shuffle=False))
    got_w = torch.cat([b[1] for b in batches])
    assert got_w.dtype == torch.float32 and got_w.shape == (10,)
    assert torch.equal(got_w, w)
    assert torch.equal(torch.cat([b[0][0] for b in batches]), x)
    assert torch.equal(torch.cat([b[0][1] for b in batches]), labels)


def test_dict_samples_with_key_and_workers():
    w = np.linspace(0.0, 2.0, 12)
    base = DictDataset(12)
    ds = WeightedDataset(base, w, key="weight")
    s = ds[5]
    assert set(s) == {"x", "y", "weight"} and float(s["weight"]) == pytest.approx(w[5])
    assert "weight" not in base[5]  # the wrapped dataset's samples are not modified
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, shuffle=False))
    got = torch.cat([b["weight"] for b in batches])
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(w).float())
    assert torch.cat([b["y"] for b in batches]).tolist() == [i % 3 for i in range(12)]


def test_callable_weights_are_checked_at_getitem():
    ds = WeightedDataset(DictDataset(6), lambda i: 1.0 / (i + 1), key="w")
    assert [float(ds[i]["w"]) for i in range(6)] == pytest.approx([1 / (i + 1) for i in range(6)])
    batch = next(iter(DataLoader(ds, batch_size=6)))
    assert batch["w"].dtype == torch.float32
    np.testing.assert_allclose(batch["w"].numpy(), [1 / (i + 1) for i in range(6)], rtol=1e-6)
    # numpy / 0-d tensor return values are accepted
    assert float(WeightedDataset(DictDataset(2), lambda i: np.float64(0.5))[1][1]) == 0.5
    assert float(WeightedDataset(DictDataset(2), lambda i: torch.tensor([0.25]))[1][1]) == 0.25

    bad = {3: float("nan"), 4: -1.0, 5: float("inf")}
    ds = WeightedDataset(DictDataset(6), lambda i: bad.get(i, 1.0))
    assert float(ds[2][1]) == 1.0
    with pytest.raises(ValueError, match=r"weights\(3\) must be finite and >= 0; got nan"):
        ds[3]
    with pytest.raises(ValueError, match=r"weights\(4\) must be finite and >= 0; got -1.0"):
        ds[4]
    with pytest.raises(ValueError, match=r"weights\(5\) must be finite and >= 0; got inf"):
        ds[5]
    with pytest.raises(TypeError, match=r"weights\(0\) must return a real number; got 'a' of type str"):
        WeightedDataset(DictDataset(1), lambda i: "a")[0]
    with pytest.raises(ValueError, match=r"weights\(0\) must return a single number; got shape \(2,\)"):
        WeightedDataset(DictDataset(1), lambda i: np.ones(2))[0]
    # an error inside a DataLoader worker surfaces with the index in the message
    with pytest.raises(ValueError, match=r"weights\(3\) must be finite"):  # batch [2, 3] fails first
        list(DataLoader(WeightedDataset(DictDataset(6), lambda i: bad.get(i, 1.0)), batch_size=2, num_workers=1))


@pytest.mark.parametrize(
    ("weights", "error", "pattern"),
    [
        (torch.ones(5), ValueError, r"len\(weights\)=5 but len\(dataset\)=6"),
        (np.ones(7), ValueError, r"len\(weights\)=7 but len\(dataset\)=6"),
        (torch.tensor([1.0, 1, 1, -0.5, 1, 1]), ValueError, r"weights must be non-negative; got -0.5 at index 3"),
        (np.array([1.0, np.nan, 1, 1, 1, 1]), ValueError, r"weights must be finite; got nan at index 1"),
        (torch.tensor([1.0, 1, 1, 1, 1, float("inf")]), ValueError, r"weights must be finite; got inf at index 5"),
        (torch.ones(6, 1), ValueError, r"weights must be 1-D; got shape \(6, 1\)"),
        ("abc", TypeError, r"weights must be a torch.Tensor, numpy.ndarray or sequence"),
        (torch.ones(6, dtype=torch.bool), TypeError, r"weights must be real numbers"),
    ],
)
def test_bad_weight_vectors_are_refused(weights, error, pattern):
    with pytest.raises(error, match=pattern):
        WeightedDataset(DictDataset(6), weights)


def test_bad_dataset_and_key():
    with pytest.raises(TypeError, match="dataset must be a map-style dataset"):
        WeightedDataset(iter([1, 2]), [1.0, 1.0])
    with pytest.raises(TypeError, match="key must be None or a non-empty str"):
        WeightedDataset(DictDataset(2), [1.0, 1.0], key=3)
    ds = WeightedDataset(TensorDataset(torch.zeros(2)), [1.0, 2.0], key="w")
    with pytest.raises(TypeError, match=r"key='w' needs dict samples; dataset\[1\] is a tuple"):
        ds[1]
    ds = WeightedDataset(DictDataset(2), [1.0, 2.0], key="y")
    with pytest.raises(ValueError, match=r"dataset\[0\] already has key 'y'"):
        ds[0]


def test_empty_dataset_and_sequence_weights():
    assert len(WeightedDataset(DictDataset(0), [])) == 0
    ds = WeightedDataset(DictDataset(3), [0, 1, 2])  # integer weights become float32
    assert ds.weights.dtype == torch.float32 and ds.weights.tolist() == [0.0, 1.0, 2.0]
    assert "WeightedDataset(DictDataset" in repr(ds)
