"""Scheduler surgery: add a param group to a running optimizer and place it on the schedules that drive it.

torch's LR schedulers keep per-group lists (``base_lrs``, ``lr_lambdas``, ``min_lrs``, ``max_lrs``, the last-lr
list) sized when they were built; ``optimizer.add_param_group`` leaves them one short, so the next ``step()``
fails or silently skips the new group. :func:`_add_group` extends every such list (through ``SequentialLR`` and
``ChainedScheduler`` children) and starts the group at the lr the schedule gives it *now*, as if it had been in
the optimizer from the start. Used by :func:`~torch_pretrain_update.unfreeze`; nothing here is public.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LambdaLR,
    OneCycleLR,
    ReduceLROnPlateau,
)

from torch_pretrain_update.training._params import Scheduler

__all__: list[str] = []


def _base_lr(group: Mapping[str, Any]) -> float:
    """The lr a schedule scales for this group: ``initial_lr`` when a scheduler set one, else ``lr``."""
    return float(group.get("initial_lr", group["lr"]))


def _add_group(
    optimizer: Optimizer, params: list[nn.Parameter], extra: dict[str, Any], lr: Optional[float],
    schedulers: list[Scheduler],
) -> None:
    g0 = optimizer.param_groups[0]
    b0 = _base_lr(g0)
    b = b0 if lr is None else lr
    ratio: Optional[float] = 1.0 if b == b0 else (b / b0 if b0 != 0 else None)

    def scaled(v: Any, what: str) -> float:
        if ratio is None:
            raise ValueError(
                f"cannot scale {what} to lr={b}: the first param group's base lr is 0, so the new group's "
                "schedule has no reference; give the first group a non-zero lr or leave lr=None"
            )
        return float(v) * ratio if ratio != 1.0 else float(v)

    group: dict[str, Any] = {"params": params, "lr": b, **extra}
    if "initial_lr" in g0:
        group["initial_lr"] = b
    for key in ("max_lr", "min_lr"):  # OneCycleLR's per-group boundaries
        if key in g0:
            group[key] = scaled(g0[key], f"param_groups[0][{key!r}]")
    if "max_momentum" in g0:  # OneCycleLR/CyclicLR cycling momentum: same cycle, current value of group 0
        for key in ("max_momentum", "base_momentum", "momentum", "betas"):
            if key in g0:
                group[key] = g0[key]
    optimizer.add_param_group(group)
    group = optimizer.param_groups[-1]

    extended: list[Any] = []
    seen: set[int] = set()

    def extend(s: Any) -> None:
        if id(s) in seen:
            return
        seen.add(id(s))
        for child in getattr(s, "_schedulers", None) or ():
            extend(child)
        if isinstance(s, ReduceLROnPlateau):
            s.min_lrs.append(s.default_min_lr if s.default_min_lr is not None else s.min_lrs[0])
        else:
            if isinstance(getattr(s, "base_lrs", None), list):
                s.base_lrs.append(b if not isinstance(s, CyclicLR) else scaled(s.base_lrs[0], "CyclicLR base_lr"))
            if isinstance(getattr(s, "lr_lambdas", None), list):
                s.lr_lambdas.append(s.lr_lambdas[0])
            if isinstance(s, CyclicLR):
                s.max_lrs.append(scaled(s.max_lrs[0], "CyclicLR max_lr"))
                if s.cycle_momentum:
                    s.base_momentums.append(s.base_momentums[0])
                    s.max_momentums.append(s.max_momentums[0])
        extended.append(s)

    for s in schedulers:
        extend(s)

    current: Optional[float] = None
    for s in schedulers:
        v = _current_lr(s, optimizer, b, ratio)
        if v is not None:
            current = v
    if current is not None:
        group["lr"] = current
    for s in extended:
        last = getattr(s, "_last_lr", None)
        if isinstance(last, list) and len(last) == len(optimizer.param_groups) - 1:
            last.append(group["lr"])


def _current_lr(s: Any, optimizer: Optimizer, b: float, ratio: Optional[float]) -> Optional[float]:
    """The lr the schedule gives the (already registered) last param group at the scheduler's current step."""
    if isinstance(s, ReduceLROnPlateau):
        return None
    if getattr(s, "_schedulers", None) is None:
        if hasattr(s, "_get_closed_form_lr"):
            return float(s._get_closed_form_lr()[-1])
        if isinstance(s, LambdaLR):
            return float(b * s.lr_lambdas[-1](s.last_epoch))
        if isinstance(s, (OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts)):
            # get_lr() is a closed form of the step counter for these; it also sets the cycled momentum of
            # every group (to the values it already has for the old groups). It warns when called outside
            # step(), which is what we do on purpose here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(s.get_lr()[-1])
    # Multiplicative schedules without a closed form (MultiplicativeLR, chains): the first group's current lr
    # scaled by the base-lr ratio.
    if ratio is None:
        raise ValueError(
            f"cannot place the new group on the schedule of {type(s).__name__}: the first param group's base lr "
            "is 0; give it a non-zero lr or leave lr=None"
        )
    return float(optimizer.param_groups[0]["lr"]) * ratio
