"""Gradual unfreezing (ULMFiT): one stage of parameters becomes trainable per :meth:`GradualUnfreezing.step`."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

from torch import nn
from torch.optim import Optimizer

from torch_pretrain_update._checks import check_bool, check_float, short_repr
from torch_pretrain_update.training._params import (
    Patterns,
    Scheduler,
    _as_patterns,
    _check_model,
    _check_optimizer,
    _check_schedulers,
    _param_table,
    _select,
)
from torch_pretrain_update.training.freeze import freeze, unfreeze
from torch_pretrain_update.training.optim import _check_no_decay, _no_decay_ids, _top_lr

__all__ = ["GradualUnfreezing"]


class GradualUnfreezing:
    """Unfreeze one stage of parameters per :meth:`step` (ULMFiT's gradual unfreezing), adding each to the
    optimizer as a new param group that follows the schedulers.

    On construction every parameter matched by a stage is frozen (:func:`freeze`, with the BatchNorm guard when
    ``bn_stats``); none of them may already be in ``optimizer`` (``ValueError``). The ``i``-th call of
    :meth:`step` (``i`` = 0, 1, ...) calls :func:`unfreeze` on ``stages[i]`` with ``lr = top * lr_factor **
    (i + 1)``, where ``top`` is the top layer's lr (the ``lr`` :func:`~torch_pretrain_update.partial_optimizer` was
    given, else the first param group's base lr: its ``"initial_lr"``, else ``"lr"``). With ``lr_factor=1``
    (default) :func:`unfreeze` picks the lr by the optimizer's param-group rule: the ``layer_decay`` it was built
    with, else ``top``. After the last stage, ``step()`` does nothing.

    Resuming: build model, optimizer, schedulers and this object exactly as for the original run, then load, in
    this order: ``model.load_state_dict``, **this object's** :meth:`load_state_dict` (it replays the unfreezing
    steps so that the optimizer and schedulers regain the added groups), then ``optimizer.load_state_dict`` and each
    scheduler's ``load_state_dict``. Loading the optimizer first fails with torch's "loaded state dict has a
    different number of parameter groups".

    Args:
        model: the module.
        optimizer: the optimizer over the already trainable parameters (e.g. from :func:`partial_optimizer`).
        stages: a sequence of stages, each a glob pattern or a sequence of them, in unfreezing order (top to
            bottom for ULMFiT). Every pattern must match a parameter.
        schedulers: the LR schedulers driving ``optimizer`` (extended at every stage).
        lr_factor: per-stage factor of the new groups' base lr (``1/2.6`` for ULMFiT), in ``(0, inf)``.
        no_decay: passed to :func:`unfreeze`: ``None`` (default) continues the optimizer's rule (``ndim <= 1``
            parameters get ``weight_decay=0``); ``True``, ``False`` or pattern(s) as in ``partial_optimizer``.
        bn_stats: freeze the statistics of fully frozen BatchNorm layers while their stage is frozen.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = partial_optimizer(model, torch.optim.SGD, trainable="4.*", lr=0.1)
        >>> gu = GradualUnfreezing(model, opt, [["2.*"], ["0.*"]], lr_factor=1 / 2.6)
        >>> gu.step()  # after the first epoch
        ['2.weight', '2.bias']
        >>> len(opt.param_groups), gu.state_dict()  # weight, bias (weight_decay=0) of the head and of stage 0
        (4, {'stage': 1, 'num_stages': 2, 'groups_added': [2]})
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        stages: Sequence[Patterns],
        *,
        schedulers: Sequence[Scheduler] = (),
        lr_factor: float = 1.0,
        no_decay: Union[bool, Patterns, None] = None,
        bn_stats: bool = True,
    ) -> None:
        self.model = _check_model(model)
        self.optimizer = _check_optimizer(optimizer)
        self.schedulers = _check_schedulers(schedulers, optimizer)
        self.lr_factor = check_float(lr_factor, "lr_factor", low=0.0, low_inclusive=False)
        if no_decay is not None and not isinstance(no_decay, bool):
            no_decay = list(_check_no_decay(no_decay) or ())
        self.no_decay = no_decay
        self.bn_stats = check_bool(bn_stats, "bn_stats")
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise TypeError(
                f"stages must be a non-empty sequence of stages (each a pattern or a sequence of patterns); "
                f"got {short_repr(stages)}"
            )
        self.stages = [_as_patterns(s, f"stages[{i}]") for i, s in enumerate(stages)]
        table = _param_table(model)
        if isinstance(self.no_decay, list):
            _no_decay_ids(model, table, tuple(self.no_decay))  # each pattern must match a parameter name
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for i, pats in enumerate(self.stages):
            chosen, _ = _select(model, pats, f"stages[{i}]", table)
            inside = [e.name for e in chosen if id(e.param) in held]
            if inside:
                raise ValueError(
                    f"stages[{i}] selects parameters that are already in the optimizer: {inside[:5]}; a stage "
                    "must hold parameters that are frozen until it is reached"
                )
        freeze(model, [p for pats in self.stages for p in pats], bn_stats=self.bn_stats)
        self.stage = 0
        self._groups_added: list[int] = []

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def step(self) -> list[str]:
        """Unfreeze the next stage; return the names it selected (``[]`` when every stage is done)."""
        if self.stage >= len(self.stages):
            return []
        i = self.stage
        lr = None
        if self.lr_factor != 1.0:
            lr = _top_lr(self.optimizer) * self.lr_factor ** (i + 1)
        before = len(self.optimizer.param_groups)
        names = unfreeze(
            self.model, self.stages[i], optimizer=self.optimizer, lr=lr, schedulers=self.schedulers,
            no_decay=self.no_decay,
        )
        self._groups_added.append(len(self.optimizer.param_groups) - before)
        self.stage += 1
        return names

    def state_dict(self) -> dict[str, Any]:
        """``{"stage", "num_stages", "groups_added"}``: plain JSON-serialisable values."""
        return {"stage": self.stage, "num_stages": len(self.stages), "groups_added": list(self._groups_added)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replay the unfreezing up to the saved stage (call before ``optimizer.load_state_dict``).

        Raises ``ValueError`` if the replay does not add the same number of param groups per stage as the saved
        run (the objects were built differently); the replay has happened by then, so rebuild before retrying.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}")
        missing = {"stage", "num_stages", "groups_added"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks key(s) {sorted(missing)}; got keys {sorted(state_dict)}")
        num = state_dict["num_stages"]
        if num != len(self.stages):
            raise ValueError(
                f"state_dict['num_stages']={num!r} but this GradualUnfreezing has {len(self.stages)} stages"
            )
        raw_stage = state_dict["stage"]
        if isinstance(raw_stage, bool) or not isinstance(raw_stage, numbers.Integral) or not 0 <= int(raw_stage) <= num:
            raise ValueError(f"state_dict['stage'] must be an int in [0, {num}]; got {raw_stage!r}")
        stage = int(raw_stage)
        added = state_dict["groups_added"]
        if not isinstance(added, (list, tuple)) or len(added) != stage:
            raise ValueError(f"state_dict['groups_added'] must be a list of {stage} ints; got {added!r}")
        if stage < self.stage:
            raise ValueError(
                f"cannot load stage {stage} into a GradualUnfreezing already at stage {self.stage}: stages are "
                "never re-frozen; load into a freshly built one"
            )
        while self.stage < stage:
            self.step()
        if self._groups_added != [int(a) for a in added]:
            raise ValueError(
                f"state_dict['groups_added']={list(added)} but replaying the stages added {self._groups_added} "
                "param groups: the model or optimizer was built differently from the saved run (the replay has "
                "already changed them: rebuild before trying again)"
            )


