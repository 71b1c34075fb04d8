"""sequence_scores / token_weights: per-sequence and per-token scores of token logits with a padding mask.

References are recomputed independently in float64 from the definitions (softmax by exp / sum, entropy over the
positive probabilities only, sorted probabilities for the margin).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torch_pretrain_update.scoring.sequence as seq_mod
from torch_pretrain_update import EntropySampler, KDLoss, sequence_scores, token_weights


def _data(n=6, length=9, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, length, v, generator=g) * 3
    mask = torch.rand(n, length, generator=g) < 0.7
    mask[:, 0] = True  # every row has a real token
    targets = torch.randint(0, v, (n, length), generator=g)
    return logits, mask, targets


def _ref_tokens(logits, targets, score):
    """(N, L) float64 per-token values from the definitions, one position at a time."""
    z = logits.double()
    n, length, v = z.shape
    out = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        for t in range(length):
            row = z[i, t]
            finite = row[torch.isfinite(row)]
            m = finite.max()
            e = torch.where(torch.isfinite(row), torch.exp(row - m), torch.zeros((), dtype=torch.float64))
            p = e / e.sum()
            if score == "entropy":
                pos = p[p > 0]
                out[i, t] = -(pos * pos.log()).sum()
            elif score == "nll":
                out[i, t] = -math.log(float(p[targets[i, t]]))
            else:
                s = torch.sort(p, descending=True).values
                out[i, t] = 1.0 - (s[0] - s[1])
    return out


def _ref_scores(logits, mask, targets, score, reduce):
    tok = _ref_tokens(logits, targets, score)
    m = torch.ones(tok.shape, dtype=torch.bool) if mask is None else mask
    total = (tok * m).sum(dim=1)
    return total / m.sum(dim=1) if reduce == "mean" else total


@pytest.mark.parametrize("score", ["entropy", "nll", "margin"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_matches_float64_reference(score, reduce):
    logits, mask, targets = _data()
    got = sequence_scores(logits, mask, score=score, reduce=reduce, targets=targets)
    assert got.dtype == torch.float32 and got.shape == (6,) and got.device.type == "cpu"
    ref = _ref_scores(logits, mask, targets, score, reduce)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_no_mask_means_every_position():
    logits, _, targets = _data()
    ref = _ref_scores(logits, None, targets, "nll", "mean")
    torch.testing.assert_close(sequence_scores(logits, score="nll", targets=targets).double(), ref, rtol=1e-5,
                               atol=1e-5)


def test_minus_inf_logits_give_finite_exact_scores():
    logits, mask, targets = _data()
    logits[:, :, 5:] = -math.inf  # a banned part of the vocabulary
    targets = targets % 5
    for score in ("entropy", "nll", "margin"):
        got = sequence_scores(logits, mask, score=score, targets=targets)
        assert bool(torch.isfinite(got).all()), score
        torch.testing.assert_close(got.double(), _ref_scores(logits, mask, targets, score, "mean"), rtol=1e-5,
                                   atol=1e-5)
    # one finite logit: probability 1, entropy 0, margin 0 (the second best has probability 0)
    one = torch.full((1, 2, 4), -math.inf)
    one[0, :, 2] = 7.0
    assert sequence_scores(one).tolist() == [0.0]
    assert sequence_scores(one, score="margin").tolist() == [0.0]


def test_padding_logits_are_never_read():
    logits, mask, targets = _data()
    garbage = logits.clone()
    garbage[~mask] = math.nan
    bad_targets = targets.clone()
    bad_targets[~mask] = -100
    for score in ("entropy", "nll", "margin"):
        clean = sequence_scores(logits, mask, score=score, targets=targets)
        assert torch.equal(sequence_scores(garbage, mask, score=score, targets=bad_targets), clean)


def test_chunking_does_not_change_the_result(monkeypatch):
    logits, mask, targets = _data(n=11, length=7, v=10)
    for score in ("entropy", "nll", "margin"):
        full = sequence_scores(logits, mask, score=score, targets=targets)
        for cs in (1, 2, 3, 11, 50):
            assert torch.equal(sequence_scores(logits, mask, score=score, targets=targets, chunk_size=cs), full)
        w = token_weights(logits, mask, score=score, targets=targets)
        assert torch.equal(token_weights(logits, mask, score=score, targets=targets, chunk_size=4), w)
    # one sequence above the per-sequence limit is split along its positions too: same values
    monkeypatch.setattr(seq_mod, "_MAX_SEQUENCE_ELEMENTS", 20)
    monkeypatch.setattr(seq_mod, "_CHUNK_ELEMENTS", 30)
    assert list(seq_mod._blocks((2, 7, 10), 1, True))[:2] == [(0, 1, 0, 3), (0, 1, 3, 6)]
    for score in ("entropy", "nll", "margin"):
        ref = _ref_scores(logits, mask, targets, score, "sum")
        got = sequence_scores(logits, mask, score=score, reduce="sum", targets=targets)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_low_precision_and_numpy_inputs(tmp_path):
    logits, mask, targets = _data()
    half = logits.to(torch.bfloat16)
    want = sequence_scores(half.float(), mask)
    assert torch.equal(sequence_scores(half, mask), want)
    assert torch.equal(sequence_scores(logits.numpy(), mask.numpy()), sequence_scores(logits, mask))
    path = tmp_path / "logits.npy"
    np.save(path, logits.numpy())
    mm = np.load(path, mmap_mode="r")
    got = sequence_scores(mm, mask, score="nll", targets=targets.numpy(), chunk_size=2)
    assert torch.equal(got, sequence_scores(logits, mask, score="nll", targets=targets))
    d = sequence_scores(logits.double(), mask)
    torch.testing.assert_close(d.double(), _ref_scores(logits, mask, targets, "entropy", "mean"), rtol=1e-6,
                               atol=1e-6)


def test_orientation_feeds_entropy_sampler():
    """Higher = less sure: the sampler's top-k picks the flat (uncertain) sequences."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, 20, generator=g)
    sharp = torch.tensor([0, 3, 4, 6, 7])
    logits[sharp] *= 25.0  # confident predictions
    for score in ("entropy", "margin"):
        s = sequence_scores(logits, score=score)
        assert sorted(EntropySampler.from_scores(s, 3, shuffle=False)) == [1, 2, 5], score
    # nll: the sequences whose targets the model finds unlikely
    targets = logits.argmax(dim=-1)
    targets[2] = logits[2].argmin(dim=-1)
    targets[5] = logits[5].argmin(dim=-1)
    s = sequence_scores(logits, score="nll", targets=targets)
    assert sorted(EntropySampler.from_scores(s, 2, shuffle=False)) == [2, 5]


def test_token_weights_values_and_kd_loss():
    logits, mask, targets = _data(n=4, length=6, v=9)
    raw = token_weights(logits, mask, normalize=False)
    ref = _ref_tokens(logits, targets, "entropy") * mask
    torch.testing.assert_close(raw.double(), ref, rtol=1e-5, atol=1e-5)
    assert bool((raw[~mask] == 0).all())
    w = token_weights(logits, mask)
    assert w.dtype == torch.float32 and w.shape == mask.shape
    assert abs(float(w[mask].mean()) - 1.0) < 1e-5 and bool((w[~mask] == 0).all())
    torch.testing.assert_close(w, raw * (mask.sum() / raw.sum()))
    # as KDLoss weights: sum_p w_p * KL_p / P over the masked positions (T**2 = 1 at temperature 1)
    student = torch.randn(4, 6, 9, generator=torch.Generator().manual_seed(3))
    loss = KDLoss(temperature=1.0, alpha=1.0)(student, logits, weight=w, mask=mask)
    lt, ls = torch.log_softmax(logits.double(), -1), torch.log_softmax(student.double(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    expect = (w.double() * kl)[mask].sum() / mask.sum()
    assert abs(float(loss) - float(expect)) < 1e-5
    nll_w = token_weights(logits, mask, score="nll", targets=targets, normalize=False)
    torch.testing.assert_close(nll_w.double(), _ref_tokens(logits, targets, "nll") * mask, rtol=1e-5, atol=1e-5)


def test_token_weights_all_zero_cannot_normalise():
    one_hot = torch.full((2, 3, 4), -math.inf)
    one_hot[..., 1] = 0.0
    assert bool((token_weights(one_hot, normalize=False) == 0).all())
    with pytest.raises(ValueError, match="normalize=False"):
        token_weights(one_hot)


@pytest.mark.parametrize("value,what", [(math.nan, "NaN"), (math.inf, r"\+inf")])
def test_non_finite_logit_at_real_position_names_row_and_position(value, what):
    logits, mask, targets = _data()
    mask[4, 3] = True
    logits[4, 3, 2] = value
    for score in ("entropy", "nll", "margin"):
        with pytest.raises(ValueError, match=rf"logits.*row 4, position 3 has a {what}"):
            sequence_scores(logits, mask, score=score, targets=targets)


def test_all_minus_inf_position_and_impossible_target():
    logits, mask, targets = _data()
    mask[2, 1] = True
    bad = logits.clone()
    bad[2, 1] = -math.inf
    with pytest.raises(ValueError, match="row 2, position 1 has all logits -inf"):
        sequence_scores(bad, mask)
    bad = logits.clone()
    bad[2, 1, targets[2, 1]] = -math.inf
    with pytest.raises(ValueError, match=r"targets: row 2, position 1 .*\(probability 0\)"):
        sequence_scores(bad, mask, score="nll", targets=targets)


def test_bad_arguments():
    logits, mask, targets = _data()
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 9\)"):
        sequence_scores(logits, mask[:, :-1])
    with pytest.raises(TypeError, match="mask must be a bool tensor.*attention_mask.bool"):
        sequence_scores(logits, mask.long())
    empty = mask.clone()
    empty[3] = False
    with pytest.raises(ValueError, match="mask row 3 has no real token"):
        sequence_scores(logits, empty, reduce="sum")
    with pytest.raises(ValueError, match="targets is required"):
        sequence_scores(logits, mask, score="nll")
    t = targets.clone()
    t[1, 0] = 13
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 13\).*13 at row 1, position 0"):
        sequence_scores(logits, mask, score="nll", targets=t)
    t[1, 0] = -1
    with pytest.raises(ValueError, match="got -1 at row 1, position 0"):
        sequence_scores(logits, mask, score="nll", targets=t)
    with pytest.raises(TypeError, match="targets must hold integer"):
        sequence_scores(logits, mask, score="nll", targets=targets.float())
    with pytest.raises(ValueError, match=r"targets must have shape \(6, 9\)"):
        sequence_scores(logits, mask, score="nll", targets=targets[:3])
    with pytest.raises(ValueError, match="logits must be 3-D"):
        sequence_scores(logits[0])
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        sequence_scores(targets.unsqueeze(-1).expand(6, 9, 3))
    with pytest.raises(TypeError, match="logits must be a"):
        sequence_scores([[[0.0, 1.0]]])
    with pytest.raises(ValueError, match="vocabulary of at least 2"):
        sequence_scores(logits[..., :1])
    with pytest.raises(ValueError, match="score must be one of"):
        sequence_scores(logits, score="perplexity")
    with pytest.raises(ValueError, match="reduce must be one of"):
        sequence_scores(logits, reduce="max")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        sequence_scores(logits, chunk_size=0)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        token_weights(logits, normalize=1)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(seq_mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
