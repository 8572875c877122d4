"""From (user, item) pairs plus item content to the tensors one training step needs.

Content is encoded once per distinct item in a batch (a popular item appears many
times), so the KJT carries per-example user ids but per-distinct-item item and
cluster ids; `item_index` maps examples back to their item row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from trainer.config import ModelConfig
from trainer.model import FEATURES
from trainer.text import tokenize


@dataclass
class ItemFeatures:
    frames: np.ndarray  # uint8 [F, S, S, 3]
    has_frames: bool
    tokens: np.ndarray  # int64 [T]
    frame_cluster: int
    text_cluster: int


class ContentStore:
    """Per-item model inputs, filled as items are announced and their shards read."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.items: dict[int, ItemFeatures] = {}

    def add(self, item_id: int, frames: np.ndarray, has_frames: bool, text: str, frame_cluster: int, text_cluster: int) -> None:
        self.items[item_id] = ItemFeatures(frames, has_frames, tokenize(text, self.cfg.text_vocab, self.cfg.text_len), frame_cluster, text_cluster)

    def __contains__(self, item_id: int) -> bool:
        return item_id in self.items

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Batch:
    kjt: KeyedJaggedTensor
    user_ids: torch.Tensor  # [B]
    item_ids: torch.Tensor  # [B]
    item_index: torch.Tensor  # [B] -> row of the distinct-item tensors below
    frames: torch.Tensor  # uint8 [U, F, S, S, 3]
    tokens: torch.Tensor  # [U, T]
    has_frames: torch.Tensor  # [U]
    id_keep: torch.Tensor  # [U]
    item_log_q: torch.Tensor  # [B] log share of positives that went to this example's item
    user_log_q: torch.Tensor  # [B] ... and to this example's user

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def _kjt(stride: int, users: np.ndarray, items: np.ndarray, fc: np.ndarray, tc: np.ndarray) -> KeyedJaggedTensor:
    """One id per row; a feature with fewer ids than `stride` has zero-length tails."""
    values, lengths = [], []
    for ids in (users, items, fc, tc):
        values.append(ids)
        lengths.append(np.r_[np.ones(len(ids), np.int32), np.zeros(stride - len(ids), np.int32)])
    return KeyedJaggedTensor(
        keys=list(FEATURES),
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=stride,
    )


def item_tensors(store: ContentStore, items: np.ndarray) -> dict[str, torch.Tensor]:
    feats = [store.items[int(i)] for i in items]
    return {
        "frames": torch.from_numpy(np.stack([f.frames for f in feats])),
        "tokens": torch.from_numpy(np.stack([f.tokens for f in feats])),
        "has_frames": torch.tensor([float(f.has_frames) for f in feats]),
    }


def log_share(counts: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """log(count / total) per id, counting each id at least once (a new id is rare, not impossible)."""
    c = np.maximum(counts[ids], 1).astype(np.float64)
    return torch.from_numpy(np.log(c / max(counts.sum(), 1)).astype(np.float32))


def make_batch(users: np.ndarray, items: np.ndarray, store: ContentStore, id_keep_prob: float, rng: np.random.Generator,
               item_positives: np.ndarray, user_positives: np.ndarray) -> Batch:
    """item_positives / user_positives: positives seen so far per item / user (for the logQ correction)."""
    uniq, index = np.unique(items, return_inverse=True)
    fc = np.array([store.items[int(i)].frame_cluster for i in uniq])
    tc = np.array([store.items[int(i)].text_cluster for i in uniq])
    return Batch(
        kjt=_kjt(len(users), users, uniq, fc, tc),
        user_ids=torch.from_numpy(users.astype(np.int64)),
        item_ids=torch.from_numpy(items.astype(np.int64)),
        item_index=torch.from_numpy(index.astype(np.int64)),
        id_keep=torch.from_numpy((rng.random(len(uniq)) < id_keep_prob).astype(np.float32)),
        item_log_q=log_share(item_positives, items),
        user_log_q=log_share(user_positives, users),
        **item_tensors(store, uniq),
    )


def item_kjt(store: ContentStore, items: np.ndarray) -> KeyedJaggedTensor:
    fc = np.array([store.items[int(i)].frame_cluster for i in items])
    tc = np.array([store.items[int(i)].text_cluster for i in items])
    return _kjt(len(items), np.zeros(0, np.int64), items, fc, tc)


def user_kjt(users: np.ndarray) -> KeyedJaggedTensor:
    empty = np.zeros(0, np.int64)
    return _kjt(len(users), users, empty, empty, empty)
