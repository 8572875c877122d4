"""Replaying a dataset through the real path: items packed into WebDataset shards,
each announced at its first appearance, interactions produced in time order.

The evaluation split decides which rows reach Kafka: cold items are announced (their
content exists from release) but none of their interactions are produced, and each
user's warm test rows are held back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from streaming.datasets import Dataset, Row
from streaming.producer import Sink
from streaming.schema import Interaction, ItemAnnouncement
from streaming import storage
from streaming.shards import write_shard


def event_of(row: Row, threshold: float) -> str:
    """An explicit event wins; a rating becomes a positive (like) at the threshold and an
    explicit negative (skip) below it; a bare row is an implicit positive (play)."""
    if row.event:
        return row.event
    if row.rating is not None:
        return "like" if row.rating >= threshold else "skip"
    return "play"


@dataclass
class Split:
    cold_items: set[str]
    train: np.ndarray  # row indices that reach Kafka
    test: np.ndarray  # warm test rows (held back)


def split_dataset(ds: Dataset, cold_fraction: float, seed: int, test_fraction: float = 0.2) -> Split:
    """A seeded share of items is cold (all their rows held out, as in CLCRec and seed 000);
    the warm rows are split per user into train and test."""
    rng = np.random.default_rng(seed)
    keys = sorted(ds.item_ids, key=ds.item_ids.get)
    cold = set(rng.choice(keys, size=int(round(cold_fraction * len(keys))), replace=False).tolist())
    by_user: dict[str, list[int]] = {}
    for idx, r in enumerate(ds.rows):
        if r.item not in cold:
            by_user.setdefault(r.user, []).append(idx)
    train, test = [], []
    for rows in by_user.values():
        rows = rng.permutation(rows)
        n_test = int(len(rows) * test_fraction) if len(rows) > 1 else 0
        test.extend(rows[:n_test])
        train.extend(rows[n_test:])
    return Split(cold, np.sort(np.array(train, np.int64)), np.sort(np.array(test, np.int64)))


@dataclass
class Validation:
    """A validation slice carved from the training rows only (the test rows stay untouched):
    pseudo-cold items (all their training rows held out) and a share of each user's other rows."""

    cold_items: set[str]
    cold_rows: np.ndarray  # training rows of the pseudo-cold items
    warm_rows: np.ndarray  # a share of each user's remaining training rows
    train: np.ndarray  # what is left to train on


def validation_split(ds: Dataset, train: np.ndarray, seed: int, fraction: float = 0.05) -> Validation:
    """`fraction` of the items in `train` become pseudo-cold, and `fraction` of each user's remaining
    rows (of users with at least 1 / fraction of them) are held out: both follow the data's size."""
    rng = np.random.default_rng((seed, 1))
    items = sorted({ds.rows[i].item for i in train}, key=ds.item_ids.get)
    cold = set(rng.choice(items, size=max(1, int(round(fraction * len(items)))), replace=False).tolist()) if items else set()
    is_cold = np.array([ds.rows[i].item in cold for i in train], bool)
    by_user: dict[str, list[int]] = {}
    for idx in train[~is_cold]:
        by_user.setdefault(ds.rows[idx].user, []).append(int(idx))
    held = [r for rows in by_user.values() for r in rng.permutation(rows)[: int(len(rows) * fraction)]]
    warm = np.sort(np.array(held, np.int64))
    return Validation(cold, np.sort(train[is_cold]), warm, np.setdiff1d(train[~is_cold], warm))


def pack_items(ds: Dataset, shard_dir: str | Path, items_per_shard: int = 200) -> dict[str, str]:
    """Shards in first-appearance order; images are stored as they are (no re-encoding)."""
    urls: dict[str, str] = {}
    keys = sorted(ds.item_ids, key=ds.item_ids.get)
    for n, start in enumerate(range(0, len(keys), items_per_shard)):
        chunk = keys[start:start + items_per_shard]
        samples = []
        for key in chunk:
            frames = [(p.read_bytes(), p.suffix.lower().lstrip(".")) for p in ds.images(key)]
            meta = ds.items.get(key)
            samples.append({"item_id": ds.item_ids[key], "frames": frames, "text": ds.text(key),
                            "meta": {"key": key, "tags": meta.tags if meta else []}})
        url = write_shard(storage.child(shard_dir, f"items-{n:06d}.tar"), samples)
        urls.update({k: url for k in chunk})
    return urls


def replay(ds: Dataset, urls: dict[str, str], sink: Sink, produce_rows: np.ndarray | None = None,
           speedup: float | None = None, threshold: float = 4.0) -> Iterator[str]:
    """Announces every item at its first appearance and produces the chosen rows in time order,
    as fast as possible or `speedup` times real time. Yields a progress line now and then."""
    chosen = np.ones(len(ds.rows), bool) if produce_rows is None else np.isin(np.arange(len(ds.rows)), produce_rows)
    announced: set[str] = set()
    t_data0, t_wall0 = (ds.rows[0].ts if ds.rows else 0.0), time.monotonic()
    produced = 0
    for idx, r in enumerate(ds.rows):
        if speedup:
            wait = (r.ts - t_data0) / speedup - (time.monotonic() - t_wall0)
            if wait > 0:
                sink.flush()
                time.sleep(wait)
        if r.item not in announced:
            announced.add(r.item)
            sink.announce(ItemAnnouncement(ds.item_ids[r.item], urls[r.item], r.ts))
        if chosen[idx]:
            sink.interaction(Interaction(ds.user_ids[r.user], ds.item_ids[r.item], event_of(r, threshold), r.ts))
            produced += 1
        if idx and idx % 20000 == 0:
            yield f"replayed {idx}/{len(ds.rows)} rows ({produced} produced, {len(announced)} items announced)"
    for key in sorted(set(ds.item_ids) - announced, key=ds.item_ids.get):  # catalogue items never interacted with
        sink.announce(ItemAnnouncement(ds.item_ids[key], urls[key], t_data0))
    sink.flush()
    yield f"replay done: {produced} interactions produced, {len(ds.item_ids)} items announced"
