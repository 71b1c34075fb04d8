"""What a resumable object's state records about the object that made it, and the check made on load.

A sampler's, stream's or stage's ``state_dict()`` carries ``"config"``: the plain values its output depends on
(sizes, seed, number of ranks, shuffle settings, ...) with large inputs (weights, scores, labels, shard lists) as
a short hash. ``load_state_dict`` compares it with the loading object's own and refuses a state from an object
built differently, saying which settings differ, instead of silently resuming a different stream (re-serving
consumed samples and skipping others). A state without ``"config"`` (saved before it was recorded) is accepted
unchecked.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__: list[str] = []  # private module

_DIGEST_PREFIX = "sha256:"


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """``"sha256:<32 hex digits>"`` (truncated) of the dtypes, shapes and bytes of ``tensors`` (None allowed).

    Hashes the tensor memory directly (no copy for a contiguous CPU tensor). SHA-256, not BLAKE2: with the SHA
    instructions of current x86 CPUs it measured 2.5x faster here (0.55 vs 0.2 GB/s on a loaded machine); still
    about 1.5 s for 10^8 float64 weights, so callers compute it once and cache it.
    """
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the array's memory, no copy
    return _DIGEST_PREFIX + h.hexdigest()[:32]


def _a(kind: Any) -> str:
    return f"{'an' if str(kind)[:1] in 'AEIOU' else 'a'} {kind}"


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith(_DIGEST_PREFIX):
        return value[: len(_DIGEST_PREFIX) + 12] + "..."  # enough to tell two apart in a message
    return repr(value)


def check_config(saved: Any, mine: dict[str, Any]) -> None:
    """Raise ``ValueError`` if a state's ``saved`` config differs from ``mine`` (the loading object's).

    ``saved`` None (a state saved before configs were recorded) passes unchecked. ``mine["type"]`` names the
    kind of object; the message lists every other entry that differs, saved values first.
    """
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"state['config'] must be a dict; got {type(saved).__name__}")
    kind = mine.get("type", "object")
    if saved.get("type", kind) != kind:
        raise ValueError(f"state was saved by {_a(saved.get('type'))}; this is {_a(kind)}")
    missing = object()
    keys = dict.fromkeys([*mine, *saved])
    differ = [k for k in keys if k != "type" and saved.get(k, missing) != mine.get(k, missing)]
    if not differ:
        return

    def show(config: dict[str, Any]) -> str:
        return ", ".join(f"{k}={_show(config[k])}" if k in config else f"{k} (absent)" for k in differ)

    raise ValueError(
        f"state was saved by {_a(kind)} with {show(saved)}; this one has {show(mine)}: a state resumes only in an "
        "object built with the same inputs and settings"
    )
