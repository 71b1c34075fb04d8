"""Log density ratio of embeddings by a logistic domain classifier, for importance resampling.

:func:`domain_log_ratio` is the counterpart of :func:`target_log_ratio` for embeddings (images, speech, text
encoders): a logistic classifier tells target from raw, and Bayes' rule with the class prior removed turns its
logit into ``log p_target(x) - log p_raw(x)``. Select with :func:`importance_resample` or
:func:`resampling_weights`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torch_pretrain_update._checks import as_tensor, check_float, check_int, first_bad_row, short_repr
from torch_pretrain_update.scoring.target import Features

__all__ = ["domain_log_ratio"]


def _check_embeddings(x: Any, name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point (N, D) matrix; got {short_repr(t)}")
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) matrix; got shape {tuple(t.shape)}")
    t = t.detach()
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite; row {first_bad_row(bad)} is not")
    return t


def domain_log_ratio(
    raw_embeddings: Features,
    target_embeddings: Features,
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
    fit_size: int = 50_000,
    seed: int = 0,
) -> torch.Tensor:
    """Log density ratio ``log p_target(x) - log p_raw(x)`` of each raw embedding, by a logistic domain classifier.

    A linear logistic regression tells target (label 1) from raw (label 0) embeddings; by Bayes' rule its logit
    is ``log p_target(x) / p_raw(x) + log(n_target / n_raw)``, so the log ratio is the logit minus the class prior
    term ``log(n_target / n_raw)`` of the rows it was fitted on. Features are standardised (the fitted rows' mean
    and standard deviation); the loss is the mean cross-entropy plus ``l2 / 2 * |w|**2`` (no penalty on the
    bias), minimised by L-BFGS in float64: deterministic, no learning rate to tune. The model is exact when the
    two densities differ by an exponential family tilt (e.g. Gaussians with a shared covariance); for more
    curved differences, append features (e.g. squares) to the embeddings.

    Args:
        raw_embeddings: (N, D) embeddings of the raw pool (images, speech, text encoders).
        target_embeddings: (M, D) embeddings of the target sample.
        l2: L2 penalty on the standardised weights, ``>= 0``.
        max_iter: L-BFGS iterations, ``>= 1``.
        fit_size: the classifier is fitted on at most this many rows of each side (a random subset drawn with
            ``seed``); every raw row is scored.
        seed: seed of that subset.

    Returns:
        float64 tensor of shape (N,), for :func:`importance_resample` or :func:`resampling_weights`.

    Example::

        >>> raw = torch.randn(2000, 4)
        >>> target = torch.randn(500, 4) + torch.tensor([1.0, 0.0, 0.0, 0.0])
        >>> lr = domain_log_ratio(raw, target)  # close to x[:, 0] - 0.5
        >>> lr.shape
        torch.Size([2000])
    """
    raw = _check_embeddings(raw_embeddings, "raw_embeddings")
    tgt = _check_embeddings(target_embeddings, "target_embeddings")
    if raw.shape[1] != tgt.shape[1]:
        raise ValueError(f"target_embeddings must have the raw embeddings' dimension {raw.shape[1]}; got "
                         f"{tgt.shape[1]}")
    l2 = check_float(l2, "l2", low=0.0)
    max_iter = check_int(max_iter, "max_iter", min_value=1)
    fit_size = check_int(fit_size, "fit_size", min_value=1)
    seed = check_int(seed, "seed")
    g = torch.Generator().manual_seed(seed)

    def subset(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] <= fit_size:
            return t.cpu().double()
        idx = torch.randperm(t.shape[0], generator=g)[:fit_size].to(t.device)
        return t[idx].cpu().double()

    xr, xt = subset(raw), subset(tgt)
    n_r, n_t = xr.shape[0], xt.shape[0]
    x = torch.cat([xr, xt])
    y = torch.cat([torch.zeros(n_r, dtype=torch.float64), torch.ones(n_t, dtype=torch.float64)])
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones((), dtype=torch.float64))  # a constant feature: leave it as is
    x = (x - mean) / std
    prior = math.log(n_t / n_r)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.full((1,), prior, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_fit, bias = w.detach(), float(b.detach()) - prior
    out = torch.empty(raw.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // raw.shape[1])
    for s in range(0, raw.shape[0], step):
        part = raw[s : s + step].cpu().double()
        out[s : s + step] = ((part - mean) / std) @ w_fit + bias
    return out
