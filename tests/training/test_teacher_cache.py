"""Cached teacher outputs: real shards written with webdataset.ShardWriter (through write_shards) to tmp_path,
read back strictly and without unpickling; round trips against the model's own logits."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from torch_pretrain_update import (
    KDLoss,
    SparseTeacher,
    UnsafeMemberError,
    read_teacher_outputs,
    teacher_targets,
    write_teacher_outputs,
)
from torch_pretrain_update.data.errors import DamagedShardError
from torch_pretrain_update.data.manifest import read_manifest
from torch_pretrain_update.data.tar_reader import iter_shard_samples
from torch_pretrain_update.data.write import write_shards
from torch_pretrain_update.training.teacher_cache import (
    TEACHER_LOGITS_KEY,
    TEACHER_TOPK_INDICES_KEY,
    TEACHER_TOPK_LOGPROBS_KEY,
)

D, C = 8, 10


class Teacher(nn.Module):
    """An MLP with dropout (so eval mode matters) that records whether it ran under inference_mode."""

    def __init__(self, out: int = C, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, out))
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append((torch.is_inference_mode_enabled(), self.training))
        return self.net(x) * 3.0


def reference_logits(model: Teacher, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.net.eval()(x) * 3.0


def make_samples(n: int, seed: int = 0) -> list[dict]:
    g = np.random.default_rng(seed)
    return [{"__key__": f"s{i:04d}", "input.npy": g.normal(size=D).astype(np.float32), "cls": i % 3}
            for i in range(n)]


def test_dense_logits_round_trip_from_samples(tmp_path):
    model = Teacher()
    model.train()
    samples = make_samples(53)
    manifest = write_teacher_outputs(model, samples, str(tmp_path / "t-%06d.tar"), batch_size=16, maxcount=20,
                                     label_key="cls", progress=False)
    # ran in eval mode under inference_mode, batched, and the training flag is restored
    assert model.modes == [(True, False)] * 4
    assert model.training
    man = read_manifest(manifest)
    assert [s.count for s in man.shards] == [20, 20, 13]
    assert man.class_counts == [18, 18, 17]
    back = list(read_teacher_outputs(manifest))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    for s, orig in zip(back, samples):
        assert np.array_equal(s["input.npy"], orig["input.npy"])
        assert s["cls"] == orig["cls"]
        assert s[TEACHER_LOGITS_KEY].dtype == np.float16
    x = torch.from_numpy(np.stack([s["input.npy"] for s in samples]))
    expected = reference_logits(model, x).numpy()
    got = np.stack([s[TEACHER_LOGITS_KEY] for s in back]).astype(np.float64)
    # float16 storage: within half a float16 ulp of the float32 logits (plus float32 noise across batchings)
    np.testing.assert_allclose(got, expected, rtol=2**-11, atol=1e-5)
    assert not np.array_equal(got, expected)  # it really is float16
    # teacher_targets on a list of samples and on a default_collate batch
    t_list = teacher_targets(back[:5])
    t_batch = teacher_targets(default_collate(back[:5]))
    assert t_list.dtype == torch.float16 and t_list.shape == (5, C)
    assert torch.equal(t_list, t_batch)
    assert torch.equal(teacher_targets(back[0]), t_list[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_topk_round_trip_from_a_dataloader(tmp_path, dtype):
    model = Teacher(seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(41, D, generator=g)
    y = torch.randint(0, C, (41,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)
    k = 4
    manifest = write_teacher_outputs(model, loader, str(tmp_path / "k-%06d.tar"), topk=k, dtype=dtype,
                                     maxcount=16, progress=False)
    back = list(read_teacher_outputs(manifest))
    assert [s["__key__"] for s in back] == [f"{i:09d}" for i in range(41)]
    assert np.array_equal(np.stack([s["input.npy"] for s in back]), x.numpy())
    assert [s["cls"] for s in back] == y.tolist()
    assert TEACHER_LOGITS_KEY not in back[0]
    assert back[0][TEACHER_TOPK_INDICES_KEY].dtype == np.int16
    lp = torch.log_softmax(reference_logits(model, x).double(), dim=-1)
    ref_v, ref_i = lp.topk(k, dim=-1)
    sparse = teacher_targets(back)
    assert isinstance(sparse, SparseTeacher) and sparse.indices.dtype == torch.int64
    assert torch.equal(sparse.indices, ref_i)
    tol = 2**-11 if dtype == torch.float16 else 1e-6
    np.testing.assert_allclose(sparse.log_probs.double().numpy(), ref_v.numpy(), rtol=tol, atol=1e-6)
    # the cached sparse targets give the KD loss of the model's own top-k targets
    student = torch.randn(41, C, generator=g)
    kd = KDLoss(temperature=2.0, alpha=0.5)
    cached = kd(student, sparse, y)
    direct = kd(student, SparseTeacher.from_logits(reference_logits(model, x), k), y)
    np.testing.assert_allclose(cached.item(), direct.item(), rtol=1e-3 if dtype == torch.float16 else 1e-5)


def test_cached_topk_with_k_equal_C_gives_the_dense_kd_loss(tmp_path):
    model = Teacher(seed=2)
    samples = make_samples(30, seed=2)
    manifest = write_teacher_outputs(model, samples, str(tmp_path / "c-%06d.tar"), topk=C, dtype=torch.float32,
                                     progress=False)
    back = list(read_teacher_outputs(manifest))
    x = torch.from_numpy(np.stack([s["input.npy"] for s in samples]))
    student = torch.randn(30, C, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = torch.tensor([s["cls"] for s in samples])
    kd = KDLoss(temperature=4.0, alpha=0.7)
    dense = kd(student, reference_logits(model, x), y)
    sparse = kd(student, teacher_targets(back), y)
    np.testing.assert_allclose(sparse.item(), dense.item(), rtol=1e-5)


def test_raw_shards_in_teacher_shards_out(tmp_path):
    """A dataset already in shards: raw (undecoded) samples go through; the .npy input is decoded safely."""
    samples = make_samples(25, seed=4)
    data_manifest = write_shards(samples, str(tmp_path / "data" / "d-%06d.tar"), maxcount=10)
    raw = (s for url in read_manifest(data_manifest).urls for s in iter_shard_samples(url))
    model = Teacher(seed=4)
    manifest = write_teacher_outputs(model, raw, str(tmp_path / "kd" / "t-%06d.tar"), maxcount=10, progress=False)
    originals = {s["__key__"]: s for url in read_manifest(data_manifest).urls for s in iter_shard_samples(url)}
    out = [s for url in read_manifest(manifest).urls for s in iter_shard_samples(url)]
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    for s in out:  # original members byte-identical
        assert s["input.npy"] == originals[s["__key__"]]["input.npy"]
        assert s["cls"] == originals[s["__key__"]]["cls"]
    back = list(read_teacher_outputs(manifest))
    x = torch.from_numpy(np.stack([s["input.npy"] for s in samples]))
    np.testing.assert_allclose(np.stack([s[TEACHER_LOGITS_KEY] for s in back]).astype(np.float64),
                               reference_logits(model, x).numpy(), rtol=2**-11, atol=1e-5)


def test_token_level_outputs_and_to_input(tmp_path):
    class TokenTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.proj = nn.Linear(D, C)

        def forward(self, x):  # (B, L, D) -> object with .logits (B, L, C), like Hugging Face outputs
            return type("Out", (), {"logits": self.proj(x)})()

    model = TokenTeacher()
    g = np.random.default_rng(5)
    # inputs stored as JSON lists: to_input turns them into tensors
    samples = [{"__key__": f"{i:03d}", "tokens.json": g.normal(size=(6, D)).tolist()} for i in range(9)]
    manifest = write_teacher_outputs(model, samples, str(tmp_path / "tok-%06d.tar"), topk=3, input_key="tokens.json",
                                     to_input=lambda v: torch.tensor(v, dtype=torch.float32), batch_size=4,
                                     progress=False)
    back = list(read_teacher_outputs(manifest))
    sparse = teacher_targets(back)
    assert sparse.log_probs.shape == (9, 6, 3)
    x = torch.tensor([s["tokens.json"] for s in samples], dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model.proj(x), dim=-1)
    assert torch.equal(sparse.indices, lp.topk(3, dim=-1).indices)
    mask = torch.ones(9, 6, dtype=torch.bool)
    loss = KDLoss(2.0, 1.0)(torch.zeros(9, 6, C), sparse, mask=mask)
    assert torch.isfinite(loss)


class _Marker:
    """Unpickling this creates a file: proof that something unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_reader_never_unpickles(tmp_path):
    marker = str(tmp_path / "PWNED")
    url = str(tmp_path / "evil-000000.tar")
    logits = io.BytesIO()
    np.save(logits, np.zeros(C, np.float16))
    with wds.TarWriter(url) as w:
        w.write({"__key__": "a", TEACHER_LOGITS_KEY: logits.getvalue(), "payload.pyd": pickle.dumps(_Marker(marker))})
    with pytest.raises(UnsafeMemberError, match="payload.pyd"):
        list(read_teacher_outputs(url))
    reader = read_teacher_outputs(url, handler=wds.ignore_and_continue)
    assert list(reader) == [] and reader.stats["unsafe"] == reader.stats["skipped"] == 1
    # an object .npy in place of the logits is refused too
    url2 = str(tmp_path / "evil2-000000.tar")
    obj = io.BytesIO()
    np.save(obj, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    with wds.TarWriter(url2) as w:
        w.write({"__key__": "b", TEACHER_LOGITS_KEY: obj.getvalue()})
    with pytest.raises(UnsafeMemberError, match="object dtype"):
        list(read_teacher_outputs(url2))
    # and the writer refuses pickle members (they could not be read back)
    with pytest.raises(ValueError, match="is a pickle"):
        write_teacher_outputs(Teacher(), [{"__key__": "c", "input.npy": np.zeros(D, np.float32),
                                           "payload.pyd": pickle.dumps(_Marker(marker))}],
                              str(tmp_path / "w-%06d.tar"), progress=False)
    assert not os.path.exists(marker)


def test_manifest_count_mismatch_is_detected(tmp_path):
    manifest = write_teacher_outputs(Teacher(), make_samples(12), str(tmp_path / "m-%06d.tar"), maxcount=5,
                                     progress=False)
    urls = read_manifest(manifest).urls
    # rewrite the second shard as a well-formed tar holding one sample fewer
    kept = list(iter_shard_samples(urls[1]))[:-1]
    with wds.TarWriter(urls[1]) as w:
        for s in kept:
            w.write({k: v for k, v in s.items() if k != "__url__"})
    with pytest.raises(DamagedShardError, match="4 samples read but the manifest says 5"):
        list(read_teacher_outputs(manifest))
    assert len(list(read_teacher_outputs(urls))) == 11  # without the manifest the loss is invisible


def test_progress_bar_can_be_disabled(tmp_path, capsys):
    write_teacher_outputs(Teacher(), make_samples(5), str(tmp_path / "p-%06d.tar"), progress=False)
    assert "teacher outputs" not in capsys.readouterr().err
    write_teacher_outputs(Teacher(), make_samples(5), str(tmp_path / "q-%06d.tar"), progress=True)
    assert "teacher outputs" in capsys.readouterr().err


def test_write_errors(tmp_path):
    pat = str(tmp_path / "e-%06d.tar")
    model = Teacher()
    with pytest.raises(ValueError, match="topk must be <= the number of classes 10"):
        write_teacher_outputs(model, make_samples(3), pat, topk=11, progress=False)
    with pytest.raises(ValueError, match="numpy has no bfloat16"):
        write_teacher_outputs(model, make_samples(3), pat, dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="empty"):
        write_teacher_outputs(model, [], pat, progress=False)
    with pytest.raises(ValueError, match=r"sample 's0000' has no input member input_key='x.npy'"):
        write_teacher_outputs(model, make_samples(3), pat, input_key="x.npy", batch_size=1, progress=False)
    bad = make_samples(3)
    bad[2]["input.npy"] = np.zeros(D + 1, np.float32)
    with pytest.raises(ValueError, match=r"sample 's0002': input shape \(9,\) differs"):
        write_teacher_outputs(model, bad, pat, progress=False)
    with pytest.raises(ValueError, match=r"sample 's0001': the logits cast to torch.float16 .* non-finite"):
        write_teacher_outputs(lambda x: x.sum(1, keepdim=True) * 0 + torch.tensor([[0.0], [1e6], [0.0]])
                              .expand(-1, 3), make_samples(3), pat, progress=False)
    with pytest.raises(ValueError, match="the model's logits contain a non-finite value"):
        write_teacher_outputs(lambda x: torch.full((x.shape[0], 3), float("nan")), make_samples(3), pat,
                              progress=False)
    loader = DataLoader(TensorDataset(torch.randn(4, D), torch.zeros(4), torch.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match="batch_keys names 2"):
        write_teacher_outputs(model, loader, pat, progress=False)
    with pytest.raises(ValueError, match="already has teacher member"):
        write_teacher_outputs(model, [{**make_samples(1)[0], TEACHER_LOGITS_KEY: b""}], pat, progress=False)
    with pytest.raises(ValueError, match="no teacher outputs"):
        teacher_targets(make_samples(2))


def test_member_name_arguments_are_checked_by_name(tmp_path):
    pat = str(tmp_path / "n-%06d.tar")
    model = Teacher()
    for bad in ("", None, 3):
        with pytest.raises(TypeError, match=rf"input_key must be a non-empty str; got {bad!r}$"):
            write_teacher_outputs(model, make_samples(2), pat, input_key=bad, progress=False)
    with pytest.raises(TypeError, match=r"batch_keys\[1\] must be a non-empty str; got ''$"):
        write_teacher_outputs(model, make_samples(2), pat, batch_keys=("input.npy", ""), progress=False)
    with pytest.raises(TypeError, match=r"batch_keys\[0\] must be a non-empty str; got 7$"):
        write_teacher_outputs(model, make_samples(2), pat, batch_keys=(7,), progress=False)
    for bad in ("input.npy", (), None):
        with pytest.raises(TypeError, match="batch_keys must be a non-empty sequence of member names"):
            write_teacher_outputs(model, make_samples(2), pat, batch_keys=bad, progress=False)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_topk_reader_keys_are_consistent(tmp_path):
    """Both top-k members are present and aligned per sample."""
    manifest = write_teacher_outputs(Teacher(seed=6), make_samples(6), str(tmp_path / "a-%06d.tar"), topk=2,
                                     progress=False)
    for s in read_teacher_outputs(manifest):
        assert s[TEACHER_TOPK_LOGPROBS_KEY].shape == s[TEACHER_TOPK_INDICES_KEY].shape == (2,)
        assert s[TEACHER_TOPK_LOGPROBS_KEY][0] >= s[TEACHER_TOPK_LOGPROBS_KEY][1]
        assert np.all(s[TEACHER_TOPK_LOGPROBS_KEY] <= 0)


def test_cached_shards_stream_through_weighted_webdataset_into_kd(tmp_path):
    """Teacher shards with labels -> WeightedWebDataset (manifest, class weights) -> DataLoader -> KDLoss."""
    from torch_pretrain_update import WeightedWebDataset

    model = Teacher(seed=7)
    samples = make_samples(24, seed=7)
    manifest = write_teacher_outputs(model, samples, str(tmp_path / "w-%06d.tar"), maxcount=8, label_key="cls",
                                     progress=False)
    ds = WeightedWebDataset(None, manifest=manifest, num_classes=3, shuffle=False, seed=0)
    loader = DataLoader(ds, batch_size=6, num_workers=0)
    kd = KDLoss(temperature=2.0, alpha=0.5)
    by_key = {s["__key__"]: s for s in samples}
    seen = []
    for batch in loader:
        teacher = teacher_targets(batch)
        x = batch["input.npy"]
        assert teacher.shape == (len(x), C) and teacher.dtype == torch.float16
        np.testing.assert_allclose(teacher.double().numpy(), reference_logits(model, x).numpy(), rtol=2**-11,
                                   atol=1e-5)
        student = torch.zeros(len(x), C, requires_grad=True)
        loss = kd(student, teacher, batch["cls"], weight=batch["weight"])
        loss.backward()
        assert torch.isfinite(student.grad).all()
        for k, xi in zip(batch["__key__"], x):
            assert np.array_equal(xi.numpy(), by_key[k]["input.npy"])
        seen += list(batch["__key__"])
    assert sorted(seen) == sorted(by_key)


def _rewrite_with_bad_logits(url: str, bad_key: str, value: np.ndarray) -> None:
    samples = list(iter_shard_samples(url))
    with wds.TarWriter(url) as w:
        for s in samples:
            s = {k: v for k, v in s.items() if k != "__url__"}
            if s["__key__"] == bad_key:
                buf = io.BytesIO()
                np.save(buf, value)
                s[TEACHER_LOGITS_KEY] = buf.getvalue()
            w.write(s)


def test_reader_rejects_non_finite_stored_logits_and_counts_skips(tmp_path):
    manifest = write_teacher_outputs(Teacher(), make_samples(12), str(tmp_path / "n-%06d.tar"), maxcount=6,
                                     progress=False)
    urls = read_manifest(manifest).urls
    _rewrite_with_bad_logits(urls[1], "s0008", np.array([0.5, np.nan] + [0.0] * (C - 2), np.float16))
    with pytest.raises(ValueError, match=r"'s0008'.*n-000001.tar.*non-finite value \(nan\)"):
        list(read_teacher_outputs(manifest))
    reader = read_teacher_outputs(manifest, handler=wds.ignore_and_continue)
    keys = [s["__key__"] for s in reader]
    assert keys == [f"s{i:04d}" for i in range(12) if i != 8]
    st = reader.stats
    assert (st["samples"], st["skipped"], st["bad_samples"], st["nonfinite"], st["unsafe"]) == (11, 1, 1, 1, 0)
    assert "s0008" in st["events"][0]


def test_reader_skips_and_counts_damaged_shards_with_a_skipping_handler(tmp_path):
    manifest = write_teacher_outputs(Teacher(), make_samples(12), str(tmp_path / "d-%06d.tar"), maxcount=4,
                                     progress=False)
    urls = read_manifest(manifest).urls
    with open(urls[1], "r+b") as f:  # cut the shard inside its second sample's data
        f.truncate(3000)
    with pytest.raises(DamagedShardError, match="d-000001.tar"):
        list(read_teacher_outputs(manifest))
    reader = read_teacher_outputs(manifest, handler=wds.ignore_and_continue)
    keys = [s["__key__"] for s in reader]
    assert keys[:4] == ["s0000", "s0001", "s0002", "s0003"] and keys[-4:] == ["s0008", "s0009", "s0010", "s0011"]
    st = reader.stats
    assert st["damaged_shards"] == 1
    assert st["lost_samples"] == 12 - len(keys) and st["skipped"] == st["lost_samples"] >= 1
