"""Partial (incremental) updates that really freeze.

Training only part of a pretrained model goes wrong in quiet ways: a parameter with ``requires_grad=False`` that
stays in an optimizer with a zero (not ``None``) gradient still moves under momentum or decoupled weight decay;
BatchNorm layers whose weights are frozen keep updating their running statistics in ``model.train()`` mode;
comparing parameters by value (``torch.equal``) confuses two zero-initialised biases; adding a param group breaks
``LambdaLR``/``ReduceLROnPlateau`` and resuming from a checkpoint. This module gives one small API that avoids all
of these:

- :func:`freeze` / :func:`unfreeze` select parameters by ``fnmatch`` glob patterns on their qualified names
  (``model.named_parameters()``); membership is always by identity, never by value. :func:`unfreeze` can add the
  newly trainable parameters to an optimizer as a new param group and extend the LR schedulers that drive it.
- :func:`partial_optimizer` builds a standard optimizer over the trainable parameters alone, with a
  ``weight_decay=0`` group for biases and normalisation weights and optional layer-wise LR decay.
- :class:`GradualUnfreezing` unfreezes one stage per ``step()`` (ULMFiT) and is checkpointable.
- :class:`FrozenCheck` snapshots what must not change and ``verify()`` names whatever did.

Pattern matching uses :func:`fnmatch.fnmatchcase` (case-sensitive on every OS; ``*`` also matches dots, so
``"encoder.*"`` selects everything below ``encoder``). A parameter shared under several names (tied weights) is
matched by any of its names and reported under the first one.

Frozen BatchNorm: a forward *pre-hook* sets ``module.training = False`` just before every forward of a BatchNorm
layer (any ``torch.nn.modules.batchnorm._BatchNorm``: 1d/2d/3d, lazy and ``SyncBatchNorm``) whose parameters are all
frozen. ``model.train()`` therefore cannot switch it back to batch statistics: the layer normalises with its
running statistics and never updates them (nor ``num_batches_tracked``). The hook is a module-level function, so it
survives ``model.train()``/``eval()``, ``state_dict()``/``load_state_dict()`` (which do not touch hooks),
``copy.deepcopy`` and pickling; a freshly constructed model has no hooks, so re-apply :func:`freeze` (or rebuild
with :func:`partial_optimizer` / :class:`GradualUnfreezing`) before loading a checkpoint into it. :func:`unfreeze`
removes the hook. Note: a hook does not run when ``bn.forward(x)`` is called directly instead of ``bn(x)``.
"""

from __future__ import annotations

import fnmatch
import inspect
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LambdaLR,
    LRScheduler,
    OneCycleLR,
    ReduceLROnPlateau,
)

from torch_pretrain_update._checks import _short, check_bool, check_float

__all__ = ["freeze", "unfreeze", "partial_optimizer", "GradualUnfreezing", "FrozenCheck"]

Patterns = Union[str, Sequence[str]]
Scheduler = Union[LRScheduler, ReduceLROnPlateau]

# Modules whose weights (and biases) are normalisation parameters: excluded from weight decay.
_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, lazy variants
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)
_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------------------------- input checks
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {_short(model)} of type {type(model).__name__}")
    return model


def _as_patterns(patterns: Any, name: str) -> list[str]:
    """A str (one pattern) or a non-empty sequence of str, as a list."""
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, bytearray)) or not isinstance(patterns, Sequence):
        raise TypeError(
            f"{name} must be a str or a sequence of str (glob patterns); got {_short(patterns)} "
            f"of type {type(patterns).__name__}"
        )
    out = list(patterns)
    if not out:
        raise ValueError(f"{name} must contain at least one pattern; got an empty {type(patterns).__name__}")
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(
                f"{name}[{i}] must be a str (a glob pattern); got {_short(p)} of type {type(p).__name__}"
            )
    return out


def _check_optimizer(optimizer: Any, name: str = "optimizer") -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{name} must be a torch.optim.Optimizer; got {_short(optimizer)} of type {type(optimizer).__name__}"
        )
    return optimizer


def _check_schedulers(schedulers: Any, optimizer: Optional[Optimizer]) -> list[Scheduler]:
    if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, Sequence):
        raise TypeError(
            f"schedulers must be a sequence of torch.optim.lr_scheduler objects; got {_short(schedulers)} "
            f"of type {type(schedulers).__name__}"
        )
    out = list(schedulers)
    if out and optimizer is None:
        raise ValueError(f"schedulers were given ({len(out)}) but optimizer is None; pass the optimizer they drive")
    for i, s in enumerate(out):
        if not isinstance(s, (LRScheduler, ReduceLROnPlateau)):
            raise TypeError(
                f"schedulers[{i}] must be a torch.optim.lr_scheduler.LRScheduler or ReduceLROnPlateau; "
                f"got {_short(s)} of type {type(s).__name__}"
            )
        if getattr(s, "optimizer", None) is not optimizer:
            raise ValueError(f"schedulers[{i}] ({type(s).__name__}) drives a different optimizer than `optimizer`")
    return out


def _check_lr(lr: Any, name: str = "lr") -> Optional[float]:
    if lr is None:
        return None
    return check_float(lr, name, low=0.0)


# ------------------------------------------------------------------------------------------ name matching
class _Entry:
    """One distinct parameter: its canonical (first) name, every name it is reachable by, the tensor."""

    __slots__ = ("name", "aliases", "param")

    def __init__(self, name: str, param: nn.Parameter) -> None:
        self.name = name
        self.aliases = [name]
        self.param = param


def _param_table(model: nn.Module) -> list[_Entry]:
    """Distinct parameters in ``named_parameters()`` order, keyed by identity (shared tensors appear once)."""
    by_id: dict[int, _Entry] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        e = by_id.get(id(p))
        if e is None:
            by_id[id(p)] = _Entry(name, p)
        else:
            e.aliases.append(name)
    return list(by_id.values())


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _paramless_bns(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """BatchNorm layers without parameters (``affine=False``) that track running statistics, with the qualified
    names of their buffers (what a pattern can match for them)."""
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, _BatchNorm) and not any(True for _ in m.parameters(recurse=False)):
            bufs = [_qualify(mname, b) for b, t in m.named_buffers(recurse=False) if t is not None]
            if bufs:
                out.append((mname, m, bufs))
    return out


def _no_match_error(argname: str, pattern: str, model: nn.Module, table: list[_Entry]) -> ValueError:
    examples = ", ".join(repr(e.name) for e in table[:3]) or "(the model has no parameters)"
    hint = ""
    if any(fnmatch.fnmatchcase(a, pattern + ".*") for e in table for a in e.aliases):
        hint = f" (did you mean {pattern + '.*'!r}?)"
    return ValueError(
        f"{argname}: pattern {pattern!r} matches no parameter name of {type(model).__name__}{hint}; "
        f"names look like {examples}"
    )


def _select(
    model: nn.Module, patterns: Optional[list[str]], argname: str, table: list[_Entry]
) -> tuple[list[_Entry], list[nn.Module]]:
    """Parameters (and parameter-less BatchNorm layers) selected by ``patterns`` (None = all).

    Every pattern must match at least one parameter name (or, for a BatchNorm layer with ``affine=False``, one of
    its buffer names such as ``"bn.running_mean"``); otherwise ``ValueError`` naming the pattern.
    """
    bns = _paramless_bns(model)
    if patterns is None:
        return list(table), [m for _, m, _ in bns]
    hit = dict.fromkeys(patterns, False)
    chosen: list[_Entry] = []
    for e in table:
        found = False
        for p in patterns:
            if any(fnmatch.fnmatchcase(a, p) for a in e.aliases):
                hit[p] = found = True
        if found:
            chosen.append(e)
    chosen_bns = []
    for _, m, bufs in bns:
        found = False
        for p in patterns:
            if any(fnmatch.fnmatchcase(b, p) for b in bufs):
                hit[p] = found = True
        if found:
            chosen_bns.append(m)
    for p, ok in hit.items():
        if not ok:
            raise _no_match_error(argname, p, model, table)
    return chosen, chosen_bns


# ------------------------------------------------------------------------------------ BatchNorm eval guard
def _bn_eval_pre_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen BatchNorm layer: normalise with (and never update) the running statistics,
    whatever ``model.train()`` set. Module-level so that deepcopy and pickle keep it."""
    module.training = False


def _guard_keys(module: nn.Module) -> list[int]:
    return [k for k, h in module._forward_pre_hooks.items() if h is _bn_eval_pre_hook]


def _is_guarded(module: nn.Module) -> bool:
    return bool(_guard_keys(module))


def _guard(module: nn.Module) -> None:
    if not _is_guarded(module):
        # prepend: later pre-hooks of the user already see training=False
        module.register_forward_pre_hook(_bn_eval_pre_hook, prepend=True)
    module.training = False


def _unguard(module: nn.Module, training: bool) -> None:
    keys = _guard_keys(module)
    for k in keys:
        del module._forward_pre_hooks[k]
        module._forward_pre_hooks_with_kwargs.pop(k, None)
    if keys:
        module.training = training


def _has_stats(module: nn.Module) -> bool:
    return any(b is not None for b in module.buffers(recurse=False))


def _bn_layers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    return [
        (m, list(m.parameters(recurse=False))) for m in model.modules() if isinstance(m, _BatchNorm)
    ]


# ------------------------------------------------------------------------------------------- freeze/unfreeze
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
    no_decay: Optional[Patterns] = None,
) -> list[str]:
    """Make the parameters matching ``patterns`` trainable again; optionally add them to an optimizer.

    Sets ``requires_grad=True`` on every selected parameter and lifts the BatchNorm guard of :func:`freeze` from
    each BatchNorm layer that now has a trainable parameter (its ``training`` flag is reset to
    ``model.training``).

    With ``optimizer``, the selected parameters that are not already in it (by identity) join it as a new param
    group with fresh optimizer state. The group's hyper-parameters are the optimizer's defaults (as
    ``add_param_group`` does), except:

    - its *base* learning rate is ``lr``, by default the first group's base learning rate (its ``"initial_lr"``
      when a scheduler set one, otherwise its ``"lr"``);
    - per-group scheduler keys of the first group are carried over: ``"initial_lr"`` (= the base lr),
      ``OneCycleLR``'s ``"max_lr"``/``"min_lr"`` scaled by ``base lr / first group's base lr``, and the cycled
      momentum keys (``"max_momentum"``, ``"base_momentum"`` and the current ``"momentum"``/``"betas"``).

    Each scheduler in ``schedulers`` is extended for the new group so that its next ``step()`` works: ``base_lrs``
    (and ``CyclicLR``'s ``max_lrs``/momentum lists), ``LambdaLR``/``MultiplicativeLR``'s ``lr_lambdas`` (the new
    group uses the first group's function), ``ReduceLROnPlateau``'s ``min_lrs``, the last-lr list, and children of
    ``SequentialLR``/``ChainedScheduler``. The new group then follows the schedule as if it had been in the
    optimizer from the start: its current lr is the schedule's value at the current step (closed form where the
    scheduler has one; for purely multiplicative schedules without one, the first group's current lr scaled by
    the base-lr ratio). ``ReduceLROnPlateau`` has no schedule to replay: the group starts at its base lr and is
    reduced with the others from then on. With several independent schedulers, the last one sets the starting lr
    (compose them with ``SequentialLR``/``ChainedScheduler`` instead).

    Args:
        model: the module.
        patterns: glob pattern(s) as in :func:`freeze`; ``None`` selects every parameter.
        optimizer: if given, receives the new group (nothing is added when every selected parameter is already in
            it).
        lr: base learning rate of the new group (see above).
        schedulers: the LR schedulers driving ``optimizer``.
        no_decay: if given (patterns as in :func:`partial_optimizer`), the new parameters are split into a group
            with the optimizer's weight decay and a ``weight_decay=0`` group for biases and normalisation weights.

    Returns:
        The (first) names of the selected parameters, in ``named_parameters()`` order.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = partial_optimizer(model, torch.optim.SGD, trainable="2.*", lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        >>> unfreeze(model, "0.*", optimizer=opt, schedulers=[sched])
        ['0.weight', '0.bias']
        >>> len(opt.param_groups), len(sched.base_lrs)
        (3, 3)
    """
    _check_model(model)
    pats = None if patterns is None else _as_patterns(patterns, "patterns")
    if optimizer is not None:
        _check_optimizer(optimizer)
    lr = _check_lr(lr)
    scheds = _check_schedulers(schedulers, optimizer)
    nd = None if no_decay is None else _as_patterns(no_decay, "no_decay")
    if lr is not None and optimizer is None:
        raise ValueError(f"lr={lr} was given but optimizer is None; lr is the new param group's learning rate")
    if nd is not None and optimizer is None:
        raise ValueError("no_decay was given but optimizer is None; it splits the new param group")
    table = _param_table(model)
    chosen, chosen_bns = _select(model, pats, "patterns", table)
    for e in chosen:
        e.param.requires_grad_(True)
    touched = {id(e.param) for e in chosen}
    for m, params in _bn_layers(model):
        if any(id(p) in touched for p in params):
            _unguard(m, model.training)
    for m in chosen_bns:
        _unguard(m, model.training)
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [e for e in chosen if id(e.param) not in held]
        if new:
            if nd is not None and "weight_decay" in optimizer.defaults:
                owners = _owner_modules(model)
                flags = [_is_no_decay(e, nd, owners) for e in new]
                parts = [
                    ([e for e, f in zip(new, flags) if not f], {}),
                    ([e for e, f in zip(new, flags) if f], {"weight_decay": 0.0}),
                ]
            else:
                parts = [(new, {})]
            for entries, extra in parts:
                if entries:
                    if "param_names" in optimizer.param_groups[0]:  # an optimizer built from named_parameters()
                        extra = {**extra, "param_names": [e.name for e in entries]}
                    _add_group(optimizer, [e.param for e in entries], extra, lr, scheds)
    return [e.name for e in chosen]


# ----------------------------------------------------------------------------- new param groups + schedulers
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


# ------------------------------------------------------------------------------------------ partial_optimizer
def _owner_modules(model: nn.Module) -> dict[int, nn.Module]:
    """id(param) -> the module that registers it (the first one, for shared parameters)."""
    owners: dict[int, nn.Module] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), m)
    return owners


def _is_no_decay(e: _Entry, no_decay: list[str], owners: dict[int, nn.Module]) -> bool:
    """No weight decay for: a name matching an entry (glob entries with fnmatchcase on the whole qualified name,
    plain entries as case-insensitive substrings), a parameter of a normalisation layer, a <=1-D "...bias"."""
    for pat in no_decay:
        if _GLOB_CHARS.intersection(pat):
            if any(fnmatch.fnmatchcase(a, pat) for a in e.aliases):
                return True
        elif any(pat.lower() in a.lower() for a in e.aliases):
            return True
    if isinstance(owners.get(id(e.param)), _NORM_TYPES):
        return True
    leaf = e.name.rsplit(".", 1)[-1]
    return e.param.ndim <= 1 and leaf.endswith("bias")


def _layer_index(
    model: nn.Module, table: list[_Entry], layers: Optional[Sequence[Any]]
) -> tuple[dict[int, int], int]:
    """id(param) -> layer index (0 = bottom) and the number of layers."""
    if layers is None:
        # Default depth: parameters registered on the root itself form the bottom layer (embeddings such as a
        # class token usually live there), then every top-level child that owns parameters, in registration
        # order. Frozen children count: depth is a property of the model, not of what is trainable.
        units: list[str] = []
        if any(True for _ in model.parameters(recurse=False)):
            units.append("")
        for cname, child in model.named_children():
            if any(True for _ in child.parameters()):
                units.append(cname)
        pos = {u: i for i, u in enumerate(units)}
        return {id(e.param): pos[e.name.split(".", 1)[0] if "." in e.name else ""] for e in table}, len(units)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(
            f"layers must be a non-empty sequence (bottom to top) whose entries are a pattern or a sequence of "
            f"patterns; got {_short(layers)}"
        )
    per_layer = [_as_patterns(entry, f"layers[{i}]") for i, entry in enumerate(layers)]
    index: dict[int, int] = {}
    for i, pats in enumerate(per_layer):
        chosen, _ = _select(model, pats, f"layers[{i}]", table)
        for e in chosen:
            index.setdefault(id(e.param), i)  # first (lowest) matching layer wins
    return index, len(per_layer)


def partial_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    trainable: Patterns,
    no_decay: Optional[Patterns] = ("bias", "norm"),
    layer_decay: Optional[float] = None,
    layers: Optional[Sequence[Patterns]] = None,
    bn_stats: bool = True,
    **kwargs: Any,
) -> Optimizer:
    """Freeze everything but ``trainable`` and return an ``optimizer_cls`` over the trainable parameters alone.

    Parameters matching ``trainable`` get ``requires_grad=True``, all others are frozen as by :func:`freeze`
    (including the BatchNorm guard when ``bn_stats``). Param groups hold the trainable parameters only, chosen by
    identity, in ``named_parameters()`` order, ordered by layer from the bottom (without ``layer_decay``: one
    layer), and within a layer the decayed group before the ``weight_decay=0`` group; empty groups are left out.
    The result is a plain ``optimizer_cls`` instance: nothing is added to its ``step()``.

    No decay: when ``no_decay`` is not ``None``/empty and ``optimizer_cls`` takes ``weight_decay``, a parameter goes
    to a ``weight_decay=0`` group if (a) one of its names matches a ``no_decay`` entry: an entry with a glob
    character (``*?[``) is matched with :func:`fnmatch.fnmatchcase` against the whole qualified name, any other
    entry is a case-insensitive substring of it (so ``"norm"`` matches ``"encoder.LayerNorm.weight"``); or (b) it
    belongs to a normalisation layer (BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm, whatever its name); or
    (c) it is a 0-D/1-D parameter whose own name ends in ``"bias"`` (``bias``, ``in_proj_bias``).

    Layer decay (discriminative learning rates): a parameter in layer ``i`` of ``L`` (0 = bottom) gets
    ``lr * layer_decay ** (L - 1 - i)``: the top layer keeps ``lr``, each layer below is ``layer_decay`` times
    slower (ULMFiT divides by 2.6 per layer: ``layer_decay=1/2.6``). Layers are, by default, the parameters
    registered on ``model`` itself (bottom) followed by each top-level child that owns parameters, in
    registration order; frozen ones count. ``layers`` overrides this with a bottom-to-top list whose entries are a
    pattern or a list of patterns (a parameter belongs to the first entry it matches; every trainable parameter
    must match one).

    Args:
        model: the module.
        optimizer_cls: a ``torch.optim.Optimizer`` subclass (``TypeError`` otherwise).
        trainable: glob pattern(s) of the parameters to train (each must match something).
        no_decay: see above; ``None`` or ``()`` puts every trainable parameter under the optimizer's weight decay.
        layer_decay: factor in ``(0, 1]``, or ``None`` for one learning rate.
        layers: custom layer split for ``layer_decay`` (see above).
        bn_stats: freeze the running statistics of fully frozen BatchNorm layers (see :func:`freeze`).
        **kwargs: passed to ``optimizer_cls`` (``lr``, ``weight_decay``, ``momentum``, ...).

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> opt = partial_optimizer(model, torch.optim.AdamW, trainable=["1.*", "2.*"], lr=1e-3,
        ...                         weight_decay=0.05, layer_decay=0.5)
        >>> [(len(g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]
        [(2, 0.0005, 0.0), (1, 0.001, 0.05), (1, 0.001, 0.0)]
    """
    _check_model(model)
    if not (inspect.isclass(optimizer_cls) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW); got "
            f"{_short(optimizer_cls)} of type {type(optimizer_cls).__name__}"
        )
    pats = _as_patterns(trainable, "trainable")
    if no_decay is None or (isinstance(no_decay, (tuple, list)) and len(no_decay) == 0):
        nd: Optional[list[str]] = None
    else:
        nd = _as_patterns(no_decay, "no_decay")
    if layer_decay is not None:
        layer_decay = check_float(layer_decay, "layer_decay", low=0.0, high=1.0, low_inclusive=False)
    elif layers is not None:
        raise ValueError("layers only sets the depth used by layer_decay; pass layer_decay too (or drop layers)")
    bn_stats = check_bool(bn_stats, "bn_stats")

    table = _param_table(model)
    chosen, chosen_bns = _select(model, pats, "trainable", table)
    on = {id(e.param) for e in chosen}
    for e in table:
        if id(e.param) in on:
            e.param.requires_grad_(True)
        else:
            e.param.requires_grad_(False)
            e.param.grad = None
    selected_bns = {id(m) for m in chosen_bns}
    for m, params in _bn_layers(model):
        if any(p.requires_grad for p in params) or id(m) in selected_bns:
            _unguard(m, model.training)
        elif bn_stats and (params or _has_stats(m)):
            _guard(m)

    if layer_decay is not None:
        index, n_layers = _layer_index(model, table, layers)
        missing = [e.name for e in chosen if id(e.param) not in index]
        if missing:
            raise ValueError(
                f"layers: {len(missing)} trainable parameter(s) belong to no layer, e.g. {missing[:3]}; "
                "add a pattern for them"
            )
    else:
        index, n_layers = {}, 1
    split = nd is not None and "weight_decay" in inspect.signature(optimizer_cls).parameters
    owners = _owner_modules(model) if split else {}
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for e in chosen:
        key = (index.get(id(e.param), 0), split and _is_no_decay(e, nd or [], owners))
        buckets.setdefault(key, []).append(e.param)
    groups: list[dict[str, Any]] = []
    scales: list[float] = []
    for key in sorted(buckets):
        layer, nodecay = key
        g: dict[str, Any] = {"params": buckets[key]}
        if nodecay:
            g["weight_decay"] = 0.0
        groups.append(g)
        scales.append(1.0 if layer_decay is None else layer_decay ** (n_layers - 1 - layer))
    optimizer = optimizer_cls(groups, **kwargs)
    for g, s in zip(optimizer.param_groups, scales):
        if s != 1.0:
            g["lr"] = g["lr"] * s
    return optimizer


# ------------------------------------------------------------------------------------------ GradualUnfreezing
class GradualUnfreezing:
    """Unfreeze one stage of parameters per :meth:`step` (ULMFiT's gradual unfreezing), adding each to the
    optimizer as a new param group that follows the schedulers.

    On construction every parameter matched by a stage is frozen (:func:`freeze`, with the BatchNorm guard when
    ``bn_stats``); none of them may already be in ``optimizer`` (``ValueError``). The ``i``-th call of
    :meth:`step` (``i`` = 0, 1, ...) calls :func:`unfreeze` on ``stages[i]`` with ``lr = base * lr_factor **
    (i + 1)``, where ``base`` is the first param group's base lr (its ``"initial_lr"``, else ``"lr"``); with
    ``lr_factor=1`` the new groups share the first group's schedule. After the last stage, ``step()`` does nothing.

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
        no_decay: passed to :func:`unfreeze` (split each stage into decayed and ``weight_decay=0`` groups).
        bn_stats: freeze the statistics of fully frozen BatchNorm layers while their stage is frozen.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = partial_optimizer(model, torch.optim.SGD, trainable="4.*", lr=0.1)
        >>> gu = GradualUnfreezing(model, opt, [["2.*"], ["0.*"]], lr_factor=1 / 2.6)
        >>> gu.step()  # after the first epoch
        ['2.weight', '2.bias']
        >>> len(opt.param_groups), gu.state_dict()  # head weight, head bias (no decay), stage 0
        (3, {'stage': 1, 'num_stages': 2, 'groups_added': [1]})
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        stages: Sequence[Patterns],
        *,
        schedulers: Sequence[Scheduler] = (),
        lr_factor: float = 1.0,
        no_decay: Optional[Patterns] = None,
        bn_stats: bool = True,
    ) -> None:
        self.model = _check_model(model)
        self.optimizer = _check_optimizer(optimizer)
        self.schedulers = _check_schedulers(schedulers, optimizer)
        self.lr_factor = check_float(lr_factor, "lr_factor", low=0.0, low_inclusive=False)
        self.no_decay = None if no_decay is None else _as_patterns(no_decay, "no_decay")
        self.bn_stats = check_bool(bn_stats, "bn_stats")
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise TypeError(
                f"stages must be a non-empty sequence of stages (each a pattern or a sequence of patterns); "
                f"got {_short(stages)}"
            )
        self.stages = [_as_patterns(s, f"stages[{i}]") for i, s in enumerate(stages)]
        table = _param_table(model)
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
            lr = _base_lr(self.optimizer.param_groups[0]) * self.lr_factor ** (i + 1)
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
        stage = state_dict["stage"]
        if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) or not 0 <= stage <= num:
            raise ValueError(f"state_dict['stage'] must be an int in [0, {num}]; got {stage!r}")
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


# ------------------------------------------------------------------------------------------------ FrozenCheck
def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # bit-level equality: NaN == NaN with the same payload, -0.0 != +0.0
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class FrozenCheck:
    """Snapshot of everything that must not change while part of a model trains; :meth:`verify` names what did.

    Snapshotted: every parameter with ``requires_grad=False`` and the buffers of every module whose own
    parameters are all frozen, or that :func:`freeze` guards (BatchNorm running statistics and
    ``num_batches_tracked``). Comparison is bit for bit. The snapshot is a copy (same device) of those tensors;
    take a new one after :func:`unfreeze`.

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
        _check_model(model)
        self._items: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                self._items.append((name, p, p.detach().clone()))
        seen: set[int] = set()
        for mname, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            if _is_guarded(m) or (own and not any(p.requires_grad for p in own)):
                for bname, buf in m.named_buffers(recurse=False):
                    if buf is not None and id(buf) not in seen:
                        seen.add(id(buf))
                        self._items.append((_qualify(mname, bname), buf, buf.detach().clone()))

    @property
    def names(self) -> list[str]:
        """Names of the snapshotted tensors."""
        return [n for n, _, _ in self._items]

    def changed(self) -> list[str]:
        """Names of the snapshotted tensors whose current value differs (bitwise) from the snapshot."""
        return [n for n, t, snap in self._items if not _same_bits(t.detach(), snap)]

    def verify(self) -> None:
        """Raise ``RuntimeError`` naming every frozen tensor that changed since the snapshot."""
        bad = self.changed()
        if bad:
            shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
            raise RuntimeError(f"{len(bad)} frozen tensor(s) changed since the snapshot: {shown}")
