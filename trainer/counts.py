"""Per-id counters over an unbounded id space.

Ids are int64 keys (streaming.schema.id_key), so host-side statistics cannot be arrays
indexed by id. `KeyedCounts` gives each key seen a slot in a growing array: lookups and
updates stay vectorised over a batch, and memory follows the ids actually seen (8 bytes
per id and counter, against the 64+ floats of an embedding row, which is why the rows
are bounded and evicted while these are not).
"""
from __future__ import annotations

import numpy as np


class KeyedCounts:
    def __init__(self, capacity: int = 1024):
        self.slot: dict[int, int] = {}
        self._values = np.zeros(capacity, np.int64)

    def _slots(self, keys: np.ndarray, create: bool) -> np.ndarray:
        out = np.empty(len(keys), np.int64)
        for n, k in enumerate(np.asarray(keys, np.int64).tolist()):
            s = self.slot.get(k, -1)
            if s < 0 and create:
                s = self.slot[k] = len(self.slot)
            out[n] = s
        if len(self.slot) > len(self._values):
            self._values = np.concatenate([self._values, np.zeros(max(len(self.slot), len(self._values)), np.int64)])
        return out

    def add(self, keys: np.ndarray, amount: int | np.ndarray = 1) -> None:
        slots = self._slots(keys, create=True)  # first: it may grow (replace) the array
        np.add.at(self._values, slots, amount)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The count of each key (0 for a key never added)."""
        slots = self._slots(keys, create=False)
        return np.where(slots >= 0, self._values[np.maximum(slots, 0)], 0)

    @property
    def total(self) -> int:
        return int(self._values.sum())

    def keys(self) -> np.ndarray:
        return np.fromiter(self.slot, np.int64, len(self.slot))

    def values(self) -> np.ndarray:
        return self._values[: len(self.slot)].copy()

    def copy(self) -> "KeyedCounts":
        out = KeyedCounts(len(self._values))
        out.slot, out._values = dict(self.slot), self._values.copy()
        return out

    def __len__(self) -> int:
        return len(self.slot)
