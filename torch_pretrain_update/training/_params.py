"""Shared by :mod:`.freeze`, :mod:`.optim` and :mod:`.gradual`: argument checks, the table of a model's distinct
parameters, glob-pattern selection by name, and the forward pre-hook that keeps a frozen BatchNorm layer in eval
mode (see :mod:`torch_pretrain_update.training.freeze` for what it guarantees)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from torch_pretrain_update._checks import check_float, short_repr

__all__: list[str] = []

Patterns = Union[str, Sequence[str]]
Scheduler = Union[LRScheduler, ReduceLROnPlateau]


# --------------------------------------------------------------------------------------------- input checks
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {short_repr(model)} of type {type(model).__name__}")
    return model


def _as_patterns(patterns: Any, name: str) -> list[str]:
    """A str (one pattern) or a non-empty sequence of str, as a list."""
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, bytearray)) or not isinstance(patterns, Sequence):
        raise TypeError(
            f"{name} must be a str or a sequence of str (glob patterns); got {short_repr(patterns)} "
            f"of type {type(patterns).__name__}"
        )
    out = list(patterns)
    if not out:
        raise ValueError(f"{name} must contain at least one pattern; got an empty {type(patterns).__name__}")
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(
                f"{name}[{i}] must be a str (a glob pattern); got {short_repr(p)} of type {type(p).__name__}"
            )
    return out


def _check_optimizer(optimizer: Any, name: str = "optimizer") -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{name} must be a torch.optim.Optimizer; got {short_repr(optimizer)} of type {type(optimizer).__name__}"
        )
    return optimizer


def _check_schedulers(schedulers: Any, optimizer: Optional[Optimizer]) -> list[Scheduler]:
    if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, Sequence):
        raise TypeError(
            f"schedulers must be a sequence of torch.optim.lr_scheduler objects; got {short_repr(schedulers)} "
            f"of type {type(schedulers).__name__}"
        )
    out = list(schedulers)
    if out and optimizer is None:
        raise ValueError(f"schedulers were given ({len(out)}) but optimizer is None; pass the optimizer they drive")
    for i, s in enumerate(out):
        if not isinstance(s, (LRScheduler, ReduceLROnPlateau)):
            raise TypeError(
                f"schedulers[{i}] must be a torch.optim.lr_scheduler.LRScheduler or ReduceLROnPlateau; "
                f"got {short_repr(s)} of type {type(s).__name__}"
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
    out: list[tuple[str, nn.Module, list[str]]] = []
    for mname, m in model.named_modules():
        if isinstance(m, _BatchNorm) and not any(True for _ in m.parameters(recurse=False)):
            bufs = [_qualify(mname, b) for b, t in m.named_buffers(recurse=False) if t is not None]
            if bufs:
                out.append((mname, m, bufs))
    return out


def _no_match_error(argname: str, pattern: str, model: nn.Module, table: list[_Entry]) -> ValueError:
    examples = ", ".join(repr(e.name) for e in table[:3]) or "(the model has no parameters)"
    hint = ""
    for guess in (pattern + ".*", f"*{pattern}*"):  # a module name; a substring, as other libraries match
        if any(fnmatch.fnmatchcase(a, guess) for e in table for a in e.aliases):
            hint = f" (did you mean {guess!r}?)"
            break
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
