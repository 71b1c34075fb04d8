"""The public surface: every name in the committed list stays importable from the top level.

``tests/public_names.txt`` is the list as of the last release; removing a name from it is an API break and must be
a deliberate edit. New names may be added to ``__all__`` (and then to the list).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch_pretrain_update as tpu

COMMITTED = [line.strip() for line in (Path(__file__).parent / "public_names.txt").read_text().splitlines() if line]


def test_committed_names_are_all_exported_and_importable() -> None:
    missing = sorted(set(COMMITTED) - set(tpu.__all__))
    assert missing == []
    for name in COMMITTED:
        assert getattr(tpu, name) is not None, name


def test_all_is_unique_and_every_public_name_is_committed() -> None:
    assert len(tpu.__all__) == len(set(tpu.__all__))
    new = sorted(set(tpu.__all__) - set(COMMITTED))
    assert new == [], "public names missing from tests/public_names.txt (add them deliberately)"


def test_every_module_all_resolves() -> None:
    """Each submodule's ``__all__`` names objects it really defines or imports (no stale entries)."""
    for info in pkgutil.walk_packages(tpu.__path__, prefix="torch_pretrain_update."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{info.name}.__all__ lists {name!r} which it does not define"
