"""An optimizer over the trainable part of a model: param groups, the no-weight-decay rule, layer-wise LR decay.

:func:`partial_optimizer` freezes everything but the selected parameters and builds a plain optimizer over the
rest. Its param-group rule (which parameters get ``weight_decay=0``, which learning rate each layer gets) is
recorded on the optimizer, and :func:`~torch_pretrain_update.unfreeze` applies the same rule to parameters that
become trainable later, so that a model unfrozen step by step ends with the groups that building the optimizer
over the whole model at once gives.

The no-weight-decay rule is timm's: a parameter gets ``weight_decay=0`` when it has at most one dimension (biases,
normalisation weights and scales, whatever their names) or when the model lists its name in
``model.no_weight_decay()`` (class tokens, position embeddings); ``no_decay`` patterns add more names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn
from torch.optim import Optimizer

from torch_pretrain_update._checks import check_bool, check_float, short_repr
from torch_pretrain_update.training._params import (
    Patterns,
    _as_patterns,
    _bn_layers,
    _check_model,
    _Entry,
    _guard,
    _has_stats,
    _no_match_error,
    _param_table,
    _select,
    _unguard,
)
from torch_pretrain_update.training.schedulers import _base_lr

__all__ = ["partial_optimizer"]

#: Attribute under which :func:`partial_optimizer` records its param-group rule on the optimizer it returns.
_RULE_ATTR = "_torch_pretrain_update_group_rule"
#: ``no_decay`` once checked: ``None`` = no split, ``()`` = the standard rule, else the standard rule plus globs.
NoDecay = Optional[tuple[str, ...]]


@dataclass(frozen=True)
class _GroupRule:
    """How :func:`partial_optimizer` split its param groups, so that ``unfreeze`` can continue it."""

    no_decay: NoDecay
    layer_decay: Optional[float]
    layers: Optional[tuple[tuple[str, ...], ...]]
    lr: Optional[float]  # the top layer's learning rate


def _check_no_decay(no_decay: Any) -> NoDecay:
    """``True`` -> the standard rule, ``False`` -> no split, pattern(s) -> the standard rule plus those names."""
    if no_decay is True:
        return ()
    if no_decay is False:
        return None
    if no_decay is None:
        raise TypeError(
            "no_decay must be True (parameters with ndim <= 1 and the names in model.no_weight_decay() get "
            "weight_decay=0), False (every parameter is decayed) or glob pattern(s) of more names; got None "
            "(pass False for no split)"
        )
    return tuple(_as_patterns(no_decay, "no_decay"))


def _rule_of(optimizer: Optimizer) -> Optional[_GroupRule]:
    rule = getattr(optimizer, _RULE_ATTR, None)
    return rule if isinstance(rule, _GroupRule) else None


def _top_lr(optimizer: Optimizer) -> float:
    """The top layer's base lr: the ``lr`` :func:`partial_optimizer` was given, else the first group's base lr."""
    rule = _rule_of(optimizer)
    return rule.lr if rule is not None and rule.lr is not None else _base_lr(optimizer.param_groups[0])


def _no_weight_decay_names(model: nn.Module) -> list[str]:
    """The names (globs allowed) that ``model.no_weight_decay()`` lists, if the model defines it (timm's hook)."""
    hook = getattr(model, "no_weight_decay", None)
    if not callable(hook):
        return []
    names = hook()
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(
            f"model.no_weight_decay() must return a collection of parameter names; got {short_repr(names)} "
            f"of type {type(names).__name__}"
        )
    names = list(names)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"model.no_weight_decay() must return parameter names (str); got {short_repr(n)} in it")
    return names


def _no_decay_ids(model: nn.Module, table: list[_Entry], no_decay: tuple[str, ...]) -> set[int]:
    """ids of the parameters that get ``weight_decay=0``; every ``no_decay`` pattern must match a name."""
    for pat in no_decay:
        if not any(fnmatch.fnmatchcase(a, pat) for e in table for a in e.aliases):
            raise _no_match_error("no_decay", pat, model, table)
    listed = [*_no_weight_decay_names(model), *no_decay]
    return {
        id(e.param) for e in table
        if e.param.ndim <= 1 or any(fnmatch.fnmatchcase(a, pat) for pat in listed for a in e.aliases)
    }


def _check_layers(layers: Any) -> tuple[tuple[str, ...], ...]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(
            f"layers must be a non-empty sequence (bottom to top) whose entries are a pattern or a sequence of "
            f"patterns; got {short_repr(layers)}"
        )
    return tuple(tuple(_as_patterns(entry, f"layers[{i}]")) for i, entry in enumerate(layers))


def _layer_index(
    model: nn.Module, table: list[_Entry], layers: Optional[tuple[tuple[str, ...], ...]]
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
    index: dict[int, int] = {}
    for i, pats in enumerate(layers):
        chosen, _ = _select(model, list(pats), f"layers[{i}]", table)
        for e in chosen:
            index.setdefault(id(e.param), i)  # first (lowest) matching layer wins
    return index, len(layers)


def _plan_groups(
    model: nn.Module, table: list[_Entry], chosen: list[_Entry], rule: _GroupRule, decays: bool
) -> list[tuple[list[_Entry], dict[str, Any], float]]:
    """(parameters, extra group keys, lr scale) per param group: bottom layer first, within a layer the decayed
    group before the ``weight_decay=0`` one, empty groups left out. ``decays``: the optimizer has weight decay."""
    if rule.layer_decay is not None:
        index, n_layers = _layer_index(model, table, rule.layers)
        missing = [e.name for e in chosen if id(e.param) not in index]
        if missing:
            raise ValueError(
                f"layers: {len(missing)} trainable parameter(s) belong to no layer, e.g. {missing[:3]}; "
                "add a pattern for them"
            )
    else:
        index, n_layers = {}, 1
    skip = _no_decay_ids(model, table, rule.no_decay) if decays and rule.no_decay is not None else set()
    buckets: dict[tuple[int, bool], list[_Entry]] = {}
    for e in chosen:
        buckets.setdefault((index.get(id(e.param), 0), id(e.param) in skip), []).append(e)
    plan = []
    for layer, nodecay in sorted(buckets):
        scale = 1.0 if rule.layer_decay is None else rule.layer_decay ** (n_layers - 1 - layer)
        plan.append((buckets[layer, nodecay], {"weight_decay": 0.0} if nodecay else {}, scale))
    return plan


def _make_rule(no_decay: Any, layer_decay: Any, layers: Any, base: Optional[_GroupRule] = None) -> _GroupRule:
    """Check the arguments. With ``base`` (``unfreeze`` continuing an optimizer's rule), ``None`` takes its value."""
    nd = base.no_decay if base is not None and no_decay is None else _check_no_decay(no_decay)
    if layer_decay is not None:
        layer_decay = check_float(layer_decay, "layer_decay", low=0.0, high=1.0, low_inclusive=False)
    elif base is not None:
        layer_decay = base.layer_decay
    lays = _check_layers(layers) if layers is not None else (base.layers if base is not None else None)
    if layers is not None and layer_decay is None:
        raise ValueError("layers only sets the depth used by layer_decay; pass layer_decay too (or drop layers)")
    return _GroupRule(nd, layer_decay, lays, base.lr if base is not None else None)


#: What ``unfreeze`` continues for an optimizer that :func:`partial_optimizer` did not build.
_DEFAULT_RULE = _GroupRule(no_decay=(), layer_decay=None, layers=None, lr=None)


def partial_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    trainable: Patterns,
    no_decay: Union[bool, Patterns] = True,
    layer_decay: Optional[float] = None,
    layers: Optional[Sequence[Patterns]] = None,
    bn_stats: bool = True,
    **kwargs: Any,
) -> Optimizer:
    """Freeze everything but ``trainable`` and return an ``optimizer_cls`` over the trainable parameters alone.

    Parameters matching ``trainable`` get ``requires_grad=True``, all others are frozen as by
    :func:`~torch_pretrain_update.freeze` (including the BatchNorm guard when ``bn_stats``). Param groups hold the
    trainable parameters only, chosen by identity, in ``named_parameters()`` order, ordered by layer from the
    bottom (without ``layer_decay``: one layer), and within a layer the decayed group before the
    ``weight_decay=0`` group; empty groups are left out. The result is a plain ``optimizer_cls`` instance: nothing
    is added to its ``step()``. The rule below is recorded on it, and :func:`~torch_pretrain_update.unfreeze`
    continues it for parameters unfrozen later.

    No decay (timm's convention): when ``no_decay`` is not ``False`` and ``optimizer_cls`` takes ``weight_decay``,
    a parameter goes to a ``weight_decay=0`` group if it has at most one dimension (biases, normalisation weights,
    per-channel scales, whatever their names), or if one of its names matches an entry of
    ``model.no_weight_decay()`` (when the model defines that method, as timm's models do for class tokens and
    position embeddings), or matches a ``no_decay`` pattern. Names are matched whole with
    :func:`fnmatch.fnmatchcase` (a name without ``*?[`` matches only itself); a ``no_decay`` pattern that matches
    no parameter name is a ``ValueError``.

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
        no_decay: ``True`` (default) for the rule above, glob pattern(s) for the rule plus those names, ``False``
            to put every trainable parameter under the optimizer's weight decay.
        layer_decay: factor in ``(0, 1]``, or ``None`` for one learning rate.
        layers: custom layer split for ``layer_decay`` (see above).
        bn_stats: freeze the running statistics of fully frozen BatchNorm layers (see
            :func:`~torch_pretrain_update.freeze`).
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
            f"{short_repr(optimizer_cls)} of type {type(optimizer_cls).__name__}"
        )
    pats = _as_patterns(trainable, "trainable")
    rule = _make_rule(no_decay, layer_decay, layers)
    bn_stats = check_bool(bn_stats, "bn_stats")

    table = _param_table(model)
    chosen, chosen_bns = _select(model, pats, "trainable", table)
    decays = "weight_decay" in inspect.signature(optimizer_cls).parameters
    plan = _plan_groups(model, table, chosen, rule, decays)  # raises before anything changes
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

    optimizer = optimizer_cls([{"params": [e.param for e in es], **extra} for es, extra, _ in plan], **kwargs)
    for g, (_, _, scale) in zip(optimizer.param_groups, plan):
        if scale != 1.0:
            g["lr"] = g["lr"] * scale
    top = optimizer.defaults.get("lr")
    setattr(optimizer, _RULE_ATTR, dataclasses.replace(rule, lr=None if top is None else float(top)))
    return optimizer
