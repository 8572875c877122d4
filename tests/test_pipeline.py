"""The input thread: batches built ahead of the step, bounded, paused by the loop, errors surfaced."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cluster.pipeline import Prefetcher, StepClock
from trainer.batch import ContentStore, make_batch
from trainer.counts import KeyedCounts
from trainer.config import ModelConfig

CFG = ModelConfig(embedding_dim=8, d_model=16, heads=2, frame_layers=1, text_layers=1, frames=2, frame_size=16, patch=8, text_vocab=32, text_len=4)


def _store(n: int) -> ContentStore:
    rng = np.random.default_rng(0)
    store = ContentStore(CFG, capacity=2)  # grows while filled
    for i in range(n):
        store.add(100 + i, rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8), i % 2 == 0, f"item {i}", i % 3, i % 5)
    return store


def test_store_grows_and_batches_keep_their_content():
    store = _store(5)
    rng = np.random.default_rng(1)
    batch = make_batch(np.array([0, 1, 2]), np.array([104, 100, 104]), store, 1.0, rng, KeyedCounts(), KeyedCounts())
    assert batch.slots.tolist() == [0, 4] and batch.item_index.tolist() == [1, 0, 1]
    with_skips = make_batch(np.array([0, 1]), np.array([104, 100]), store, 1.0, rng, KeyedCounts(), KeyedCounts(), negatives=np.array([102, 104]))
    assert with_skips.slots.tolist() == [0, 2, 4] and with_skips.item_index.tolist() == [2, 0] and with_skips.negative_index.tolist() == [1, 2]
    frames_before = batch.content[0]
    for i in range(20):
        store.add(200 + i, np.zeros((2, 16, 16, 3), np.uint8), False, "x", 0, 0)
    assert len(store) == 25 and store.frames is not frames_before  # grown: a new tensor ...
    assert torch.equal(batch.content[0][batch.slots], store.frames[batch.slots])  # ... with the same rows
    assert batch.kjt["frame_cluster"].values().tolist() == [0, 1] and batch.kjt["text_cluster"].values().tolist() == [0, 4]


def test_prefetcher_runs_ahead_bounded_and_pauses_on_its_lock():
    store = _store(4)
    rng = np.random.default_rng(2)
    built = []

    def build():
        time.sleep(0.005)
        b = make_batch(np.arange(4), np.array([100, 101, 102, 103]), store, 1.0, rng, KeyedCounts(), KeyedCounts())
        b.seq = len(built)
        built.append(b.seq)
        return b

    pf = Prefetcher(build, torch.device("cpu"), depth=3)
    time.sleep(0.5)
    assert 3 <= len(built) <= 5  # ran ahead of a step that never came, then blocked: bounded
    assert [pf.get(1.0).seq for _ in range(3)] == [0, 1, 2]  # in order
    with pf.paused():
        n = len(built)
        time.sleep(0.2)
        assert len(built) == n  # no build while the loop holds the lock
    left = pf.close()
    assert all(b.seq >= 3 for b in left)


def test_prefetcher_surfaces_a_failed_build():
    def build():
        raise ValueError("broker gone")

    pf = Prefetcher(build, torch.device("cpu"), depth=2)
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="input thread failed") as exc:
        pf.get(0.1)
    assert isinstance(exc.value.__cause__, ValueError)
    with pytest.raises(RuntimeError, match="input thread failed"):
        pf.close()  # also at the end: a final checkpoint must not run past a lost build


def test_step_clock_counts_only_the_step():
    clock = StepClock(torch.device("cpu"))
    for _ in range(3):
        clock.start()
        time.sleep(0.02)
        clock.stop()
        time.sleep(0.02)
    assert 0.055 < clock.seconds() < 0.1
