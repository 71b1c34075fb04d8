"""The stream stage of de-duplication: :class:`NearDuplicateFilter` drops exact and near duplicates of earlier
kept samples, one sample at a time.

It hashes as :func:`~torch_pretrain_update.near_duplicate_mask` does (``scoring/minhash.py``) but cannot see later
samples, so it drops a sample that duplicates an earlier *kept* one; ``scoring/dedup.py`` says how that compares
with the pool-wide mask.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np

from torch_pretrain_update._checks import check_int
from torch_pretrain_update._state import check_config
from torch_pretrain_update.scoring.minhash import _band_keys, _check_common, _digest, _items, _signatures

__all__ = ["NearDuplicateFilter"]


class NearDuplicateFilter:
    """A stream stage that drops exact and near duplicates of earlier kept samples, one sample at a time.

    Call it on an iterator of dict samples (webdataset's convention) to get the samples that are not duplicates;
    or call :meth:`is_duplicate` per item. Each call on an iterator is one pass (an epoch) and starts with an
    empty memory, so a second epoch over the same data is not dropped whole as duplicates of the first; the
    exception is the first pass after :meth:`load_state_dict`, which continues the saved pass. After
    :meth:`set_epoch` the memory belongs to the epoch instead: every pass of that epoch continues it (a stream
    that applies its stages one shard range at a time, as ``WeightedWebDataset`` does, then drops duplicates
    across shards), and a call with another epoch starts empty. In a ``WeightedWebDataset`` whose ranks yield a
    fixed number of samples (a manifest's ``split="samples"``), the repeats that pad a rank are duplicates too and
    are dropped, so the stream cannot pad: there, de-duplicate the pool with :func:`near_duplicate_mask` and pass
    the kept ``indices`` instead.

    It keeps the content hash, MinHash signature and LSH band keys of every kept sample of the pass (about
    ``4 * num_perm + 16`` bytes each plus the band tables); a new sample is an exact duplicate
    when its hash was kept, a near duplicate when a kept sample shares one of its LSH buckets (the first kept
    sample of each bucket is compared) with an estimated Jaccard similarity ``>= threshold``. The hashing,
    shingles and options are those of :func:`near_duplicate_mask`, so on groups of copies of one source the
    two drop the same samples. ``stats`` counts ``seen``, ``kept``, ``dropped_exact`` and ``dropped_near``.

    ``state_dict()`` is JSON-serialisable (the kept signatures and hashes as base64 strings, ``stats`` and the
    options as ``config``); after ``load_state_dict`` the next pass continues as if the filter had seen the earlier
    samples itself: feed it the samples after the ones it had seen. In a ``DataLoader`` with workers each worker
    has its own copy and de-duplicates its own share only; de-duplicate a whole pool with
    :func:`near_duplicate_mask` instead.

    Args:
        key: the sample key holding the text (``str`` or UTF-8 ``bytes``) or the token ids.
        threshold, num_perm, seed, ngram, shingle, normalize, bands: as in :func:`near_duplicate_mask`.

    Example::

        >>> dedup = NearDuplicateFilter(key="txt")
        >>> ds = wds.WebDataset(urls, shardshuffle=False).decode().compose(dedup)
        >>> for sample in ds: ...
        >>> dedup.stats
        {'seen': 10000, 'kept': 9120, 'dropped_exact': 700, 'dropped_near': 180}
    """

    def __init__(
        self,
        *,
        key: str = "txt",
        threshold: float = 0.8,
        num_perm: int = 128,
        seed: int = 0,
        ngram: int = 5,
        shingle: str = "char",
        normalize: bool = True,
        bands: Optional[tuple[int, int]] = None,
    ) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str; got {type(key).__name__}")
        self.key = key
        self._epoch: Optional[int] = None  # set_epoch's: passes of one epoch share the memory
        (self.threshold, self.num_perm, self.seed, self.ngram, self.shingle, self.normalize,
         self.bands) = _check_common(threshold, num_perm, seed, ngram, shingle, normalize, bands)
        self.reset()

    def reset(self) -> None:
        """Forget every kept sample and zero ``stats`` (what each pass over an iterator does first)."""
        self.stats = {"seen": 0, "kept": 0, "dropped_exact": 0, "dropped_near": 0}
        self._pending = False
        self._clear()

    def set_epoch(self, epoch: int) -> None:
        """Make the memory the epoch's: the passes that follow continue it until an epoch other than ``epoch`` is
        set (then it starts empty). A state loaded for the same epoch is kept."""
        epoch = check_int(epoch, "epoch", min_value=0)
        if epoch != self._epoch:
            self.reset()
        self._epoch = epoch

    def _clear(self) -> None:
        self._digests: dict[bytes, int] = {}
        self._tables: list[dict[int, int]] = [{} for _ in range(self.bands[0])]
        self._sigs = np.empty((0, self.num_perm), dtype=np.int32)
        self._count = 0

    def _remember(self, digest: bytes, sig: np.ndarray, keys: np.ndarray) -> None:
        slot = self._count
        if slot == self._sigs.shape[0]:  # grow by doubling: amortised O(1) per sample
            grown = np.empty((max(16, 2 * slot), self.num_perm), dtype=np.int32)
            grown[:slot] = self._sigs[:slot]
            self._sigs = grown
        self._sigs[slot] = sig
        self._count += 1
        self._digests.setdefault(digest, slot)
        for table, k in zip(self._tables, keys.tolist()):
            table.setdefault(k, slot)

    def is_duplicate(self, item: Any) -> bool:
        """True if ``item`` (a text or token-id sequence) duplicates an earlier kept one; otherwise it is kept
        (remembered) and False is returned. Counts it in ``stats``."""
        kind, items = _items([item], "item", self.normalize, self.shingle)
        norm = items[0]
        digest = _digest(norm)
        self.stats["seen"] += 1
        if digest in self._digests:
            self.stats["dropped_exact"] += 1
            return True
        sig = _signatures(items, kind, self.shingle, self.ngram, self.num_perm, self.seed)[0]
        keys = _band_keys(sig[None], *self.bands)[0]
        need = self.threshold * self.num_perm - 1e-9 * self.num_perm
        for table, k in zip(self._tables, keys.tolist()):
            slot = table.get(k)
            if slot is not None and np.count_nonzero(self._sigs[slot] == sig) >= need:
                self.stats["dropped_near"] += 1
                return True
        self._remember(digest, sig, keys)
        self.stats["kept"] += 1
        return False

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        """One pass: the samples of ``samples`` that are not duplicates of earlier kept ones of this pass."""
        if not self._pending and self._epoch is None:
            self.reset()
        self._pending = False
        return self._run(iter(samples))

    def _run(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            if not isinstance(sample, dict):
                raise TypeError(f"samples must be dicts (webdataset convention); got {type(sample).__name__}")
            if self.key not in sample:
                present = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"sample __key__={sample.get('__key__')!r} has no key {self.key!r}; it has "
                                 f"{present}")
            try:
                dup = self.is_duplicate(sample[self.key])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"sample __key__={sample.get('__key__')!r}, key {self.key!r}: {exc}") from exc
            if not dup:
                yield sample

    def _config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "key": self.key, "threshold": self.threshold,
                "num_perm": self.num_perm, "seed": self.seed, "ngram": self.ngram, "shingle": self.shingle,
                "normalize": self.normalize, "bands": list(self.bands)}

    def state_dict(self) -> dict[str, Any]:
        """``{"stats", "signatures", "digests", "config"}``: plain, JSON-serialisable values."""
        digests = sorted(self._digests, key=self._digests.__getitem__)  # one per kept slot, in slot order
        return {
            "stats": dict(self.stats),
            "signatures": base64.b64encode(self._sigs[: self._count].astype("<i4").tobytes()).decode("ascii"),
            "digests": base64.b64encode(b"".join(digests)).decode("ascii"),
            "epoch": self._epoch,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (after ``json.loads`` too). Raises ``ValueError`` for a state
        of a filter built with other options (the message names them) or a damaged state."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        missing = {"stats", "signatures", "digests"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        check_config(state.get("config"), self._config())
        stats = state["stats"]
        if not isinstance(stats, dict) or set(stats) != set(self.stats):
            raise ValueError(f"state['stats'] must be a dict with keys {sorted(self.stats)}; got {stats!r}")
        stats = {k: check_int(v, f"state['stats'][{k!r}]", min_value=0) for k, v in stats.items()}
        try:
            sig_bytes = base64.b64decode(state["signatures"], validate=True)
            dig_bytes = base64.b64decode(state["digests"], validate=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state['signatures'] / state['digests'] must be base64 strings ({exc})") from exc
        row = 4 * self.num_perm
        count = len(sig_bytes) // row
        if len(sig_bytes) != count * row or len(dig_bytes) != 16 * count or count != stats["kept"]:
            raise ValueError(
                f"state holds {len(sig_bytes)} signature bytes and {len(dig_bytes)} digest bytes for "
                f"stats['kept']={stats['kept']} samples; expected {row} and 16 bytes per kept sample"
            )
        sigs = np.frombuffer(sig_bytes, dtype="<i4").reshape(count, self.num_perm).astype(np.int32)
        self._clear()
        keys = _band_keys(sigs, *self.bands) if count else np.empty((0, self.bands[0]), np.uint64)
        for slot in range(count):
            self._remember(dig_bytes[16 * slot : 16 * slot + 16], sigs[slot], keys[slot])
        self.stats = stats
        epoch = state.get("epoch")  # absent from a state of an earlier version
        self._epoch = None if epoch is None else check_int(epoch, "state['epoch']", min_value=0)
        self._pending = True  # the next pass continues this state
