"""The maturity threshold M from the embedding-stability curve (MEMER, section 3.1.1, Fig. 1).

The paper measures the cosine distance between an item's embedding after t and after t-1
views. Here, at every publication, each item's full embedding (content + ID) is compared
with the one it had in the previous version, and the distance is divided by the training
updates the item had in between (fresh positives and replayed ones): drift = (1 - cosine)
/ updates. Per update rather than per new event, because a replayed dataset, or a quiet
stream, brings no new events between versions while training goes on. Drifts are binned
by the item's interaction count (0, 1, 2-3, 4-7, ...). M is the lower edge of the first bin from which
the median drift stays below epsilon in every populated bin above it: past that count
an item's embedding has stopped moving, so it can be trusted over the early-stage mapping.
Until the curve can place M, the caller keeps the M it has (the configured one at first).
"""
from __future__ import annotations

from collections import deque

import numpy as np

MIN_PER_BIN = 20  # drifts a bin needs before its median counts


def count_bin(counts: np.ndarray) -> np.ndarray:
    """0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...: bin b starts at 2**(b-1) interactions."""
    c = np.asarray(counts, np.int64)
    return np.where(c <= 0, 0, np.floor(np.log2(np.maximum(c, 1))).astype(np.int64) + 1)


def bin_start(b: int) -> int:
    return 0 if b == 0 else 2 ** (b - 1)


class StabilityCurve:
    """Drift against interaction count over the recent publications (bounded)."""

    def __init__(self, epsilon: float, capacity: int = 200_000):
        self.epsilon = epsilon
        self.samples: deque[tuple[int, float]] = deque(maxlen=capacity)  # (count, drift)
        self._last: dict[int, tuple[int, np.ndarray]] = {}  # item -> (updates, vector) in the previous version

    def update(self, item_ids: np.ndarray, counts: np.ndarray, updates: np.ndarray, vectors: np.ndarray) -> None:
        """Adds the drift per update of every given item that was exported before and trained since
        (a version exports only the items that changed: the others keep their last vector)."""
        for i, c, n, v in zip(item_ids.tolist(), counts.tolist(), updates.tolist(), vectors):
            before = self._last.get(i)
            if before is not None and n > before[0]:
                self.samples.append((int(c), float(1.0 - np.dot(before[1], v)) / (n - before[0])))
        self._last.update({i: (n, v) for i, n, v in zip(item_ids.tolist(), updates.tolist(), vectors.copy())})

    def curve(self) -> list[dict]:
        """Per populated bin: its first count, the median drift and how many drifts it holds."""
        if not self.samples:
            return []
        arr = np.array(self.samples)
        bins = count_bin(arr[:, 0])
        return [{"from_count": bin_start(int(b)), "median_drift": float(np.median(arr[bins == b, 1])), "n": int((bins == b).sum())}
                for b in np.unique(bins)]

    def threshold(self) -> int | None:
        """M, or None while the curve cannot place it yet."""
        points = [p for p in self.curve() if p["n"] >= MIN_PER_BIN]
        for k, p in enumerate(points):
            if all(q["median_drift"] < self.epsilon for q in points[k:]):
                return max(p["from_count"], 1)
        return None
