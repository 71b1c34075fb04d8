"""The language-model demo's text, all of it shipped with Python (nothing is downloaded).

- **Old domain**: the standard library's source code (``.py`` files under ``sysconfig.get_paths()["stdlib"]``,
  ``site-packages`` left out).
- **New domain**: English prose, the ``topics`` dict of ``pydoc_data.topics`` (the text ``help()`` shows for
  keywords and language topics).
- **Other text**: whatever ``.txt`` / ``.rst`` / README / LICENSE / NEWS files the standard library directory
  holds (licence, IDLE help and history, e-mail test messages, numeric test tables, ...); none is fine.

Each seed splits them into disjoint parts (:func:`build_corpus`): whole source files go to pretraining, the old
test part or the pool; whole pydoc topics go to the new test part, the rest of the prose is shared out between the
target sample and the pool. The pool (code, prose and other text, shuffled) then gets planted duplicates: exact
copies and near copies (a few bytes changed) of some of its chunks, appended after the originals.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from torch_pretrain_update._rng import LM_DEMO_PLANT, LM_DEMO_SPLIT, mix_seed
from torch_pretrain_update.demo.lm.config import LMConfig

__all__ = ["SOURCE_NAMES", "Corpus", "Sources", "build_corpus", "chunk_bytes", "find_sources", "texts"]

#: ``Corpus.source`` values: what each pool chunk is
SOURCE_NAMES = ("code", "prose", "other")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = (".txt", ".rst")
_TEXT_STEMS = ("README", "LICENSE", "COPYING", "NEWS", "HISTORY", "CREDITS")
_EDIT_BYTES = b"abcdefghijklmnopqrstuvwxyz"


@dataclass
class Sources:
    """Where the text comes from: the standard library directory, its files (relative paths, sorted), and the
    pydoc topics (title -> text)."""

    stdlib: str
    code_files: list[str]
    text_files: list[str]
    topics: dict[str, str]

    def describe(self) -> dict[str, object]:
        return {"python": sys.version.split()[0], "stdlib": self.stdlib, "code_files": len(self.code_files),
                "text_files": len(self.text_files), "pydoc_topics": len(self.topics),
                "pydoc_topic_bytes": sum(len(t.encode()) for t in self.topics.values())}


def find_sources(stdlib: Optional[str] = None) -> Sources:
    """List the standard library's ``.py`` files and text files (sorted, ``site-packages`` excluded) and load
    the pydoc topics.

    Raises:
        ValueError: no ``.py`` file found, or ``pydoc_data.topics`` missing or empty (some distributions strip
            it: the demo's new domain would be missing).
    """
    root = stdlib or sysconfig.get_paths()["stdlib"]
    code: list[str] = []
    other: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name.endswith(".py"):
                code.append(rel)
            elif name.endswith(_TEXT_SUFFIXES) or name.upper().startswith(_TEXT_STEMS):
                other.append(rel)
    if not code:
        raise ValueError(f"stdlib: no .py file under {root!r}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise ValueError("pydoc_data.topics cannot be imported: the demo's new domain (English prose) is "
                         f"missing from this Python installation ({exc})") from exc
    if not topics:
        raise ValueError("pydoc_data.topics is empty: the demo's new domain (English prose) is missing")
    return Sources(stdlib=root, code_files=sorted(code), text_files=sorted(other), topics=dict(sorted(topics.items())))


def chunk_bytes(data: bytes, size: int) -> list[bytes]:
    """Consecutive non-overlapping pieces of ``size`` bytes; a shorter last piece is kept when it holds at least
    a quarter of ``size``; pieces with fewer than 8 non-whitespace bytes are left out (nothing to model)."""
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return [p for p in pieces if len(p) > size // 4 and len(b"".join(p.split())) >= 8]


def texts(chunks: Sequence[bytes]) -> list[str]:
    """The chunks as text (UTF-8, invalid bytes replaced) for the n-gram features and the duplicate search."""
    return [c.decode("utf-8", errors="replace") for c in chunks]


@dataclass
class Corpus:
    """One seed's data, as chunks of at most ``seq_len + 1`` bytes.

    ``pool`` holds the base chunks (shuffled) followed by the planted copies; ``source[i]`` indexes
    :data:`SOURCE_NAMES`; ``copy_of[i]`` is the pool index of the chunk a planted copy was made from (``-1`` for
    a base chunk) and ``near[i]`` says whether the copy had bytes changed.
    """

    old_train: list[bytes]
    old_test: list[bytes]
    new_test: list[bytes]
    target: list[bytes]
    pool: list[bytes]
    source: np.ndarray
    copy_of: np.ndarray
    near: np.ndarray

    def sizes(self) -> dict[str, int]:
        out = {k: len(getattr(self, k)) for k in ("old_train", "old_test", "new_test", "target", "pool")}
        for i, name in enumerate(SOURCE_NAMES):
            out[f"pool_{name}"] = int(((self.source == i) & (self.copy_of < 0)).sum())
        out["planted_exact"] = int(((self.copy_of >= 0) & ~self.near).sum())
        out["planted_near"] = int(self.near.sum())
        return out


def _pick(chunks: list[bytes], cap: int, rng: np.random.Generator) -> list[bytes]:
    """At most ``cap`` of a document's chunks, drawn at random, in document order."""
    if len(chunks) <= cap:
        return chunks
    return [chunks[i] for i in np.sort(rng.choice(len(chunks), cap, replace=False))]


def _fill(docs: Iterable[list[bytes]], quotas: Sequence[int]) -> list[list[bytes]]:
    """Share documents out among parts in order: each document goes whole (cut to what is missing) to the first
    part not yet full, so no document is split between parts."""
    parts: list[list[bytes]] = [[] for _ in quotas]
    k = 0
    for chunks in docs:
        while k < len(quotas) and len(parts[k]) >= quotas[k]:
            k += 1
        if k == len(quotas):
            break
        parts[k].extend(chunks[: quotas[k] - len(parts[k])])
    return parts


def _file_docs(root: str, files: list[str], size: int, cap: int, rng: np.random.Generator) -> Iterator[list[bytes]]:
    for i in rng.permutation(len(files)):
        try:
            with open(os.path.join(root, files[i]), "rb") as f:
                data = f.read()
        except OSError:  # unreadable (permissions, a broken link): other files serve
            continue
        chunks = chunk_bytes(data, size)
        if chunks:
            yield _pick(chunks, cap, rng)


def _short(part: str, got: int, want: int) -> ValueError:
    return ValueError(f"data: only {got} chunks for the {part} part, {want} wanted; lower the sizes in LMConfig")


def _plant(base: list[bytes], size: int, cfg: LMConfig, seed: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Planted copies of full-length base chunks: ``cfg.exact_copies`` exact ones, then ``cfg.near_copies``
    near ones with ``cfg.near_edits`` bytes changed (distinct positions, each to a different letter)."""
    rng = np.random.default_rng(mix_seed(seed, LM_DEMO_PLANT))
    full = np.flatnonzero([len(c) == size for c in base])
    n_exact = int(round(cfg.exact_copies * len(base)))
    n_near = int(round(cfg.near_copies * len(base)))
    origin = rng.choice(full, min(n_exact + n_near, len(full)), replace=False)
    copies: list[bytes] = []
    for j, i in enumerate(origin):
        chunk = bytearray(base[i])
        if j >= n_exact:
            for pos in rng.choice(size, cfg.near_edits, replace=False):
                options = [b for b in _EDIT_BYTES if b != chunk[pos]]
                chunk[pos] = options[int(rng.integers(len(options)))]
        copies.append(bytes(chunk))
    near = np.arange(len(origin)) >= n_exact
    return copies, origin.astype(np.int64), near


def build_corpus(sources: Sources, seed: int, cfg: LMConfig) -> Corpus:
    """One seed's :class:`Corpus`: a pure function of the sources, the seed and the sizes in ``cfg``.

    Raises:
        ValueError: too little code or prose for the sizes asked for (other text may fall short: the pool
            then holds what exists).
    """
    rng = np.random.default_rng(mix_seed(seed, LM_DEMO_SPLIT))
    size = cfg.seq_len + 1
    want = (cfg.old_train, cfg.test, cfg.pool_code)
    code = _fill(_file_docs(sources.stdlib, sources.code_files, size, cfg.file_cap, rng), want)
    for name, part, n in zip(("old training", "old test", "pool code"), code, want):
        if len(part) < n:
            raise _short(name, len(part), n)
    titles = list(sources.topics)
    topic_docs = (_pick(chunk_bytes(sources.topics[titles[i]].encode(), size), cfg.topic_cap, rng)
                  for i in rng.permutation(len(titles)))
    new_test, rest = _fill(topic_docs, (cfg.test, cfg.target + cfg.pool_prose))
    if len(new_test) < cfg.test or len(rest) < cfg.target + cfg.pool_prose:
        raise _short("prose", len(new_test) + len(rest), cfg.test + cfg.target + cfg.pool_prose)
    rest = [rest[i] for i in rng.permutation(len(rest))]
    (other,) = _fill(_file_docs(sources.stdlib, sources.text_files, size, cfg.file_cap, rng), (cfg.pool_other,))

    base = code[2] + rest[cfg.target :] + other
    kind = np.repeat(np.arange(3), [len(code[2]), len(rest) - cfg.target, len(other)])
    order = rng.permutation(len(base))
    base, kind = [base[i] for i in order], kind[order]
    copies, origin, near = _plant(base, size, cfg, seed)
    n = len(base)
    return Corpus(
        old_train=code[0], old_test=code[1], new_test=new_test, target=rest[: cfg.target],
        pool=base + copies,
        source=np.concatenate([kind, kind[origin]]).astype(np.int64),
        copy_of=np.concatenate([np.full(n, -1, dtype=np.int64), origin]),
        near=np.concatenate([np.zeros(n, dtype=bool), near]),
    )
