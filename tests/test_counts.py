"""Per-key counters over unbounded int64 ids."""
import numpy as np

from trainer.counts import KeyedCounts


def test_counts_grow_past_their_capacity_and_copy_independently():
    c = KeyedCounts(capacity=4)
    keys = np.array([2**62 + 5, 7, 2**40, 7, 3, 9, 11, 12, 13], np.int64)
    c.add(keys)
    c.add(np.arange(100, 2100))  # far past the capacity in one call
    c.add(np.array([7]), np.array([5]))
    assert c.get(np.array([7, 2**62 + 5, 3, 999_999, 150])).tolist() == [7, 1, 1, 0, 1]
    assert c.total == len(keys) + 2000 + 5 and len(c) == 8 + 2000
    d = c.copy()
    d.add(np.array([7]), -7)
    assert c.get(np.array([7]))[0] == 7 and d.get(np.array([7]))[0] == 0
    assert sorted(zip(c.keys().tolist(), c.values().tolist()))[:2] == [(3, 1), (7, 7)]
