"""Partial (incremental) updates that really freeze: :func:`freeze`, :func:`unfreeze`, :class:`FrozenCheck`.

Training only part of a pretrained model goes wrong in quiet ways: a parameter with ``requires_grad=False`` that
stays in an optimizer with a zero (not ``None``) gradient still moves under momentum or decoupled weight decay;
BatchNorm layers whose weights are frozen keep updating their running statistics in ``model.train()`` mode;
comparing parameters by value (``torch.equal``) confuses two zero-initialised biases; adding a param group breaks
``LambdaLR``/``ReduceLROnPlateau`` and resuming from a checkpoint. The ``training`` package avoids all of these:

- :func:`freeze` / :func:`unfreeze` (here) select parameters by ``fnmatch`` glob patterns on their qualified names
  (``model.named_parameters()``); membership is always by identity, never by value. :func:`unfreeze` can add the
  newly trainable parameters to an optimizer, with the param-group rule of
  :func:`~torch_pretrain_update.partial_optimizer`, and extend the LR schedulers that drive it.
- :func:`~torch_pretrain_update.partial_optimizer` builds a standard optimizer over the trainable parameters alone
  (``weight_decay=0`` for parameters with ``ndim <= 1``, optional layer-wise LR decay).
- :class:`~torch_pretrain_update.GradualUnfreezing` unfreezes one stage per ``step()`` (ULMFiT), checkpointable.
- :class:`FrozenCheck` (here) snapshots what must not change and ``verify()`` names whatever did.

Pattern matching uses :func:`fnmatch.fnmatchcase` (case-sensitive on every OS; ``*`` also matches dots, so
``"encoder.*"`` selects everything below ``encoder``). A parameter shared under several names (tied weights) is
matched by any of its names and reported under the first one.

Frozen BatchNorm: a forward *pre-hook* sets ``module.training = False`` just before every forward of a BatchNorm
layer (any ``torch.nn.modules.batchnorm._BatchNorm``: 1d/2d/3d, lazy and ``SyncBatchNorm``) whose parameters are all
frozen. ``model.train()`` therefore cannot switch it back to batch statistics: the layer normalises with its
running statistics and never updates them (nor ``num_batches_tracked``). The hook is a module-level function, so it
survives ``model.train()``/``eval()``, ``state_dict()``/``load_state_dict()`` (which do not touch hooks),
``copy.deepcopy`` and pickling; a freshly constructed model has no hooks, so re-apply :func:`freeze` (or rebuild
with ``partial_optimizer`` / ``GradualUnfreezing``) before loading a checkpoint into it. :func:`unfreeze` removes
the hook. Note: a hook does not run when ``bn.forward(x)`` is called directly instead of ``bn(x)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from torch_pretrain_update._checks import check_bool, short_repr
from torch_pretrain_update.training._params import (
    Patterns,
    Scheduler,
    _as_patterns,
    _bn_layers,
    _check_lr,
    _check_model,
    _check_optimizer,
    _check_schedulers,
    _guard,
    _is_guarded,
    _param_table,
    _qualify,
    _select,
    _unguard,
)
from torch_pretrain_update.training.optim import _DEFAULT_RULE, _make_rule, _plan_groups, _rule_of, _top_lr
from torch_pretrain_update.training.schedulers import _add_group

__all__ = ["freeze", "unfreeze", "FrozenCheck"]


def freeze(model: nn.Module, patterns: Optional[Patterns] = None, *, bn_stats: bool = True) -> list[str]:
    """Freeze the parameters whose qualified names match ``patterns`` (all of them when ``None``).

    Sets ``requires_grad=False`` and drops ``.grad`` (``None``) on every selected parameter, so that even an
    optimizer that still holds it skips it (torch.optim's built-in optimizers skip parameters whose grad is
    ``None``; a zero grad would still move them under momentum or decoupled weight decay). Frozen parameters
    are best left out of optimizers altogether, as :func:`partial_optimizer` does.

    Args:
        model: the module.
        patterns: a glob pattern or a sequence of them, matched with :func:`fnmatch.fnmatchcase` against the names
            of ``model.named_parameters()``; ``None`` selects every parameter. A pattern matching nothing is a
            ``ValueError`` naming it.
        bn_stats: also freeze the running statistics of every BatchNorm layer (any ``_BatchNorm``) that has a
            parameter selected by this call and whose parameters are now all frozen: such a layer normalises with
            its running statistics and never updates them, even after ``model.train()`` (see the module
            docstring for how). A BatchNorm layer with ``affine=False`` has no parameters; it is frozen when
            ``patterns`` is ``None`` or a pattern matches one of its buffer names (``"bn.running_mean"``, or
            ``"bn.*"``).

    Returns:
        The (first) names of the selected parameters, in ``named_parameters()`` order.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> freeze(model, ["0.*", "1.*"])
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> model.train()(torch.randn(8, 4)).shape  # BatchNorm "1" still uses (and keeps) its running stats
        torch.Size([8, 2])
    """
    _check_model(model)
    pats = None if patterns is None else _as_patterns(patterns, "patterns")
    bn_stats = check_bool(bn_stats, "bn_stats")
    table = _param_table(model)
    chosen, chosen_bns = _select(model, pats, "patterns", table)
    for e in chosen:
        e.param.requires_grad_(False)
        e.param.grad = None
    if bn_stats:
        touched = {id(e.param) for e in chosen}
        for m, params in _bn_layers(model):
            if params and any(id(p) in touched for p in params) and not any(p.requires_grad for p in params):
                _guard(m)
        for m in chosen_bns:
            _guard(m)
    return [e.name for e in chosen]



def unfreeze(
    model: nn.Module,
    patterns: Optional[Patterns] = None,
    *,
    optimizer: Optional[Optimizer] = None,
    lr: Optional[float] = None,
    schedulers: Sequence[Scheduler] = (),
    no_decay: Union[bool, Patterns, None] = None,
    layer_decay: Optional[float] = None,
    layers: Optional[Sequence[Patterns]] = None,
) -> list[str]:
    """Make the parameters matching ``patterns`` trainable again; optionally add them to an optimizer.

    Sets ``requires_grad=True`` on every selected parameter and lifts the BatchNorm guard of :func:`freeze` from
    each BatchNorm layer that now has a trainable parameter (its ``training`` flag is reset to
    ``model.training``).

    With ``optimizer``, the selected parameters that are not already in it (by identity) join it as new param
    groups with fresh optimizer state, split by the rule of :func:`~torch_pretrain_update.partial_optimizer`:
    parameters with ``ndim <= 1`` (and those named by ``model.no_weight_decay()`` or ``no_decay`` patterns) get
    ``weight_decay=0``, and with layer decay each layer gets ``top lr * layer_decay ** (L - 1 - i)``. For an
    optimizer built by ``partial_optimizer`` the rule it was built with is continued (``no_decay``,
    ``layer_decay``, ``layers`` and its ``lr`` as the top layer's lr), so that unfreezing a layer gives it the
    groups it would have had if it had been trainable from the start; arguments given here override the rule.
    For any other optimizer the defaults are those of ``partial_optimizer`` (no-decay split, no layer decay) and
    the top lr is the first group's base learning rate (its ``"initial_lr"`` when a scheduler set one, otherwise
    its ``"lr"``). Other hyper-parameters are the optimizer's defaults (as ``add_param_group`` does), except that
    per-group scheduler keys of the first group are carried over: ``"initial_lr"`` (= the base lr),
    ``OneCycleLR``'s ``"max_lr"``/``"min_lr"`` scaled by ``base lr / first group's base lr``, and the cycled
    momentum keys (``"max_momentum"``, ``"base_momentum"`` and the current ``"momentum"``/``"betas"``).

    Each scheduler in ``schedulers`` is extended for the new groups so that its next ``step()`` works:
    ``base_lrs`` (and ``CyclicLR``'s ``max_lrs``/momentum lists), ``LambdaLR``/``MultiplicativeLR``'s
    ``lr_lambdas`` (a new group uses the first group's function), ``ReduceLROnPlateau``'s ``min_lrs``, the
    last-lr list, and children of ``SequentialLR``/``ChainedScheduler``. A new group then follows the schedule as
    if it had been in the optimizer from the start: its current lr is the schedule's value at the current step
    (closed form where the scheduler has one; for purely multiplicative schedules without one, the first group's
    current lr scaled by the base-lr ratio). ``ReduceLROnPlateau`` has no schedule to replay: the group starts at
    its base lr and is reduced with the others from then on. With several independent schedulers, the last one
    sets the starting lr (compose them with ``SequentialLR``/``ChainedScheduler`` instead).

    Args:
        model: the module.
        patterns: glob pattern(s) as in :func:`freeze`; ``None`` selects every parameter.
        optimizer: if given, receives the new groups (nothing is added when every selected parameter is already in
            it).
        lr: base learning rate of every new group, instead of the rule's (see above).
        schedulers: the LR schedulers driving ``optimizer``.
        no_decay: ``None`` (default): the optimizer's rule; otherwise as in ``partial_optimizer`` (``True``,
            ``False`` or pattern(s)).
        layer_decay: ``None`` (default): the optimizer's rule; otherwise a factor in ``(0, 1]`` (``1.0`` turns
            layer decay off).
        layers: ``None`` (default): the optimizer's rule; otherwise as in ``partial_optimizer``.

    Returns:
        The (first) names of the selected parameters, in ``named_parameters()`` order.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = partial_optimizer(model, torch.optim.SGD, trainable="2.*", lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        >>> unfreeze(model, "0.*", optimizer=opt, schedulers=[sched])
        ['0.weight', '0.bias']
        >>> len(opt.param_groups), len(sched.base_lrs)  # weight, bias (weight_decay=0) for each layer
        (4, 4)
    """
    _check_model(model)
    pats = None if patterns is None else _as_patterns(patterns, "patterns")
    if optimizer is not None:
        _check_optimizer(optimizer)
    lr = _check_lr(lr)
    scheds = _check_schedulers(schedulers, optimizer)
    if optimizer is None:
        for key, value in (("lr", lr), ("no_decay", no_decay), ("layer_decay", layer_decay), ("layers", layers)):
            if value is not None:
                raise ValueError(
                    f"{key}={short_repr(value)} was given but optimizer is None; it shapes the param groups added "
                    "to the optimizer"
                )
    table = _param_table(model)
    chosen, chosen_bns = _select(model, pats, "patterns", table)
    plan: list = []
    if optimizer is not None:
        rule = _make_rule(no_decay, layer_decay, layers, base=_rule_of(optimizer) or _DEFAULT_RULE)
        if lr is not None:  # one lr for every new group: no need to split them by layer
            rule = dataclasses.replace(rule, layer_decay=None)
        top = _top_lr(optimizer)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [e for e in chosen if id(e.param) not in held]
        if new:  # planned before anything changes: a bad argument leaves the model as it was
            plan = _plan_groups(model, table, new, rule, "weight_decay" in optimizer.defaults)
    for e in chosen:
        e.param.requires_grad_(True)
    touched = {id(e.param) for e in chosen}
    for m, params in _bn_layers(model):
        if any(id(p) in touched for p in params):
            _unguard(m, model.training)
    for m in chosen_bns:
        _unguard(m, model.training)
    if optimizer is not None:  # (plan is empty without one)
        for entries, extra, scale in plan:
            if "param_names" in optimizer.param_groups[0]:  # an optimizer built from named_parameters()
                extra = {**extra, "param_names": [e.name for e in entries]}
            _add_group(optimizer, [e.param for e in entries], extra, lr if lr is not None else top * scale, scheds)
    return [e.name for e in chosen]


# ------------------------------------------------------------------------------------------------ FrozenCheck
def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.to(b.device)  # a model moved to another device still holds the same values
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # bit-level equality: NaN == NaN with the same payload, -0.0 != +0.0
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class FrozenCheck:
    """Snapshot of everything that must not change while part of a model trains; :meth:`verify` names what did.

    Snapshotted: every parameter with ``requires_grad=False`` and the buffers of every module whose own
    parameters are all frozen, or that :func:`freeze` guards (BatchNorm running statistics and
    ``num_batches_tracked``). The snapshot is a copy (same device) of those tensors, kept by name; take a new one
    after :func:`unfreeze`.

    :meth:`changed` looks every name up in the model as it is *now* and compares bit for bit, so it also sees a
    tensor that was replaced rather than modified in place (``model.load_state_dict(sd, assign=True)``,
    ``model.fc.weight = nn.Parameter(...)``, ``module.running_mean = ...``). A snapshotted parameter also counts as
    changed when it is missing from ``model.named_parameters()`` (deleted or set to ``None``) or has
    ``requires_grad=True`` now; a buffer when it is missing from ``model.named_buffers()``. A replacement with the
    same values and dtype passes (on any device).

    Args:
        model: the module.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> opt = partial_optimizer(model, torch.optim.AdamW, trainable="2.*", weight_decay=0.1)
        >>> check = FrozenCheck(model)
        >>> model.train()(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> check.verify()  # raises RuntimeError naming any frozen tensor that moved
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = _check_model(model)
        self._params: list[tuple[str, torch.Tensor]] = [
            (name, p.detach().clone()) for name, p in model.named_parameters() if not p.requires_grad
        ]
        self._buffers: list[tuple[str, torch.Tensor]] = []
        seen: set[int] = set()
        for mname, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            if _is_guarded(m) or (own and not any(p.requires_grad for p in own)):
                for bname, buf in m.named_buffers(recurse=False):
                    if buf is not None and id(buf) not in seen:
                        seen.add(id(buf))
                        self._buffers.append((_qualify(mname, bname), buf.detach().clone()))

    @property
    def names(self) -> list[str]:
        """Names of the snapshotted tensors (parameters first, then buffers)."""
        return [n for n, _ in self._params] + [n for n, _ in self._buffers]

    def _problems(self) -> list[tuple[str, str]]:
        """(name, what happened) for every snapshotted tensor that differs now, in :attr:`names` order."""
        params = dict(self._model.named_parameters(remove_duplicate=False))
        buffers = dict(self._model.named_buffers(remove_duplicate=False))
        out = []
        for name, snap in self._params:
            p = params.get(name)
            if p is None:
                out.append((name, "missing"))
            elif p.requires_grad:
                out.append((name, "requires_grad is True"))
            elif not _same_bits(p.detach(), snap):
                out.append((name, "value changed"))
        for name, snap in self._buffers:
            b = buffers.get(name)
            if b is None:
                out.append((name, "missing"))
            elif not _same_bits(b.detach(), snap):
                out.append((name, "value changed"))
        return out

    def changed(self) -> list[str]:
        """Names of the snapshotted tensors that differ now (value, presence, or ``requires_grad``), in order."""
        return [n for n, _ in self._problems()]

    def verify(self) -> None:
        """Raise ``RuntimeError`` naming every frozen tensor that changed since the snapshot, and how."""
        bad = [f"{n} ({what})" for n, what in self._problems()]
        if bad:
            shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
            raise RuntimeError(f"{len(bad)} frozen tensor(s) changed since the snapshot: {shown}")
