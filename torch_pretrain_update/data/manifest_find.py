"""Find the manifest that :func:`~torch_pretrain_update.data.write.write_shards` wrote next to a set of shards."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

__all__ = ["find_manifest"]


def find_manifest(urls: Sequence[str]) -> Optional[str]:
    """The manifest ``write_shards`` would have written next to ``urls``, if that file exists.

    ``write_shards(samples, "data/train-%06d.tar")`` writes ``data/train-manifest.json``: the pattern's text
    before its digits plus ``manifest.json``. This reverses it from the first shard's name
    (``data/train-000001.tar`` -> ``data/train-manifest.json``). Remote urls (``://``) and ``pipe:`` commands
    have no folder to look in.

    Args:
        urls: shard paths, as returned by :func:`~torch_pretrain_update.data.manifest.expand_urls`.

    Returns:
        The manifest's path, or ``None`` when ``urls`` is empty, remote, or has no manifest next to it.

    Example::

        >>> manifest = write_shards(samples, "data/train-%06d.tar")  # doctest: +SKIP
        >>> find_manifest(["data/train-000000.tar"]) == manifest  # doctest: +SKIP
        True
    """
    if not urls:
        return None
    first = urls[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    folder, name = os.path.split(first)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    prefix = stem.rstrip("0123456789")
    candidate = os.path.join(folder, prefix + "manifest.json")
    return candidate if os.path.isfile(candidate) else None
