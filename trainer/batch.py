"""From (user, item) pairs plus item content to the tensors one training step needs.

Item content lives in a `ContentStore`: slot-indexed tensors on the device the step
runs on, written once when an item is announced. A batch carries only ids and slots,
and the step gathers its items' frames and tokens where it runs, so a batch costs a
device-side gather instead of a host copy of every clip (about 50 MB at batch 4,096).

Content is encoded once per distinct item in a batch (a popular item appears many
times), so the KJT carries per-example user ids but per-distinct-item item and
cluster ids; `item_index` maps examples back to their item row.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from streaming.schema import EVENT_TYPES
from trainer.config import ModelConfig
from trainer.counts import KeyedCounts
from trainer.model import FEATURES
from trainer.text import tokenize


# The lookup range of user and item keys: TorchRec's managed collisions route an id by its block of
# [0, KEY_RANGE) to the rank owning that block, so keys are mixed into it first (`spread`).
KEY_RANGE = 2**62


def spread(keys: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of 64-bit words), cut to [0, KEY_RANGE): consecutive
    integer ids spread evenly over ranks. Two keys share a lookup id with probability ~2**-62."""
    z = np.asarray(keys, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(2)).astype(np.int64)


class ContentStore:
    """Per-item model inputs, filled as items are announced and their shards read.

    Rows are addressed by slot (item id -> slot in `items`). The tensors grow by doubling;
    a batch keeps references to the tensors that were current when it was built, so a
    later growth never changes what an already built batch reads.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", capacity: int = 256):
        self.cfg, self.device = cfg, torch.device(device)
        self.items: dict[int, int] = {}
        self.frames = torch.zeros((capacity, cfg.frames * cfg.clips, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8, device=self.device)
        self.tokens = torch.zeros((capacity, cfg.text_len), dtype=torch.int64, device=self.device)
        self.has_frames = torch.zeros(capacity, device=self.device)
        # cluster ids stay on the host: they go into the KJT, which is built on the host; so do the
        # descriptors they are assigned from (float16), which a refit of the clusters reads again
        self.frame_cluster = np.zeros(capacity, np.int64)
        self.text_cluster = np.zeros(capacity, np.int64)
        self.frame_desc = np.zeros((capacity, 0), np.float16)
        self.text_desc = np.zeros((capacity, 0), np.float16)
        self.described = True  # False after loading a checkpoint written before descriptors were kept

    def _grow(self, need: int) -> None:
        cap = len(self.frame_cluster)
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("frames", "tokens", "has_frames"):
            old = getattr(self, name)
            grown = old.new_zeros((new, *old.shape[1:]))
            grown[:cap] = old
            if old.is_cuda:  # the copy may run on a side stream: keep `old` alive until it has
                old.record_stream(torch.cuda.current_stream(old.device))
            setattr(self, name, grown)
        for name in ("frame_cluster", "text_cluster", "frame_desc", "text_desc"):
            old = getattr(self, name)
            grown = np.zeros((new, *old.shape[1:]), old.dtype)
            grown[:cap] = old
            setattr(self, name, grown)

    def add(self, item_id: int, frames: np.ndarray, has_frames: bool, text: str, frame_cluster: int, text_cluster: int,
            descriptors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        slot = self.items.get(item_id, len(self.items))
        self._grow(slot + 1)
        if descriptors is not None:
            for name, d in zip(("frame_desc", "text_desc"), descriptors):
                if getattr(self, name).shape[1] != len(d):
                    setattr(self, name, np.zeros((len(self.frame_cluster), len(d)), np.float16))
                getattr(self, name)[slot] = d
        self.frames[slot] = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, non_blocking=True)
        self.tokens[slot] = torch.from_numpy(tokenize(text, self.cfg.text_vocab, self.cfg.text_len)).to(self.device, non_blocking=True)
        self.has_frames[slot] = float(has_frames)
        self.frame_cluster[slot], self.text_cluster[slot] = frame_cluster, text_cluster
        self.items[item_id] = slot

    def state(self) -> dict[str, np.ndarray]:
        """Everything in the store, host-side, in slot order: what a checkpoint keeps so that a
        restore does not depend on the item topic's retention."""
        n = len(self.items)
        return {"items": np.array(sorted(self.items, key=self.items.get), np.int64),
                "frames": self.frames[:n].cpu().numpy(), "tokens": self.tokens[:n].cpu().numpy(),
                "has_frames": self.has_frames[:n].cpu().numpy(),
                "frame_cluster": self.frame_cluster[:n].copy(), "text_cluster": self.text_cluster[:n].copy(),
                "frame_desc": self.frame_desc[:n].copy(), "text_desc": self.text_desc[:n].copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        n = len(state["items"])
        self._grow(n)
        for name in ("frames", "tokens", "has_frames"):
            getattr(self, name)[:n] = torch.from_numpy(state[name]).to(self.device)
        self.frame_cluster[:n], self.text_cluster[:n] = state["frame_cluster"], state["text_cluster"]
        self.described = "frame_desc" in state
        for name in ("frame_desc", "text_desc"):
            if name in state:
                setattr(self, name, np.zeros((len(self.frame_cluster), state[name].shape[1]), np.float16))
                getattr(self, name)[:n] = state[name]
        self.items = {int(i): slot for slot, i in enumerate(state["items"])}

    def descriptors(self, items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(frame, text) descriptors [n, *] of the given items (default: every item, in slot order):
        what the clusters are fitted on, and what a new item's regressed vector is predicted from."""
        at = np.arange(len(self.items)) if items is None else self.slots(items)
        return self.frame_desc[at].astype(np.float32), self.text_desc[at].astype(np.float32)

    def slots(self, items: np.ndarray) -> np.ndarray:
        return np.fromiter((self.items[int(i)] for i in items), np.int64, len(items))

    def content(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current (frames, tokens, has_frames) tensors, for a batch to gather from."""
        return self.frames, self.tokens, self.has_frames

    def __contains__(self, item_id: int) -> bool:
        return item_id in self.items

    def __len__(self) -> int:
        return len(self.items)


def gather_content(content: tuple[torch.Tensor, ...], slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """frames [U, F, S, S, 3] uint8, tokens [U, T], has_frames [U] for the given slots, on the store's device."""
    return tuple(t.index_select(0, slots.to(t.device)) for t in content)


@dataclass
class Batch:
    kjt: KeyedJaggedTensor
    user_ids: torch.Tensor  # [B]
    item_ids: torch.Tensor  # [B]
    item_index: torch.Tensor  # [B] -> row of the distinct-item tensors below
    negative_ids: torch.Tensor  # [K] skipped items, extra negatives of the softmax
    negative_index: torch.Tensor  # [K] -> their rows of the distinct-item tensors
    slots: torch.Tensor  # [U] content-store slot of each distinct item
    id_keep: torch.Tensor  # [U]
    item_log_q: torch.Tensor  # [B] log share of positives that went to this example's item
    user_log_q: torch.Tensor  # [B] ... and to this example's user
    content: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the store's tensors when the batch was built
    # MEMER's inputs: labels [B, S] per example and signal; per distinct item, mature [U] in {0,1}
    # (only mature items teach the mapping) and the stage freq [U] the decoder is told
    labels: torch.Tensor
    mature: torch.Tensor
    freq: torch.Tensor
    item_counts: torch.Tensor  # [U] positives so far (the popularity gate's input)
    # M3CSR's user tower: [B, L] rows of the looked-up item tensors holding each example's history
    # (the distinct items first, then history-only items), and True where a position is empty; L = 0 without it
    hist_index: torch.Tensor
    hist_pad: torch.Tensor
    seq: int = -1  # numbered by whoever builds batches, to track which are not yet trained

    # what travels host -> device with the batch (the content is on the device already)
    MOVED = ("kjt", "user_ids", "item_ids", "item_index", "negative_ids", "negative_index", "slots", "id_keep", "item_log_q", "user_log_q", "labels", "mature", "freq",
             "item_counts", "hist_index", "hist_pad")

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) if f.name in self.MOVED else getattr(self, f.name) for f in fields(self)})

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        """Tells the CUDA caching allocator that `stream` uses these tensors (they were copied on another)."""
        for t in (*(getattr(self, name) for name in self.MOVED), *self.content):
            t.record_stream(stream)


def _kjt(stride: int, users: np.ndarray, items: np.ndarray, fc: np.ndarray, tc: np.ndarray) -> KeyedJaggedTensor:
    """One id per row (user and item keys spread, cluster numbers as they are); a feature with
    fewer ids than `stride` has zero-length tails."""
    stride = max(stride, len(users), len(items))
    values, lengths = [], []
    for ids in (spread(users), spread(items), fc, tc):
        values.append(ids)
        lengths.append(np.r_[np.ones(len(ids), np.int32), np.zeros(stride - len(ids), np.int32)])
    return KeyedJaggedTensor(
        keys=list(FEATURES),
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=stride,
    )


def log_share(counts: KeyedCounts, ids: np.ndarray, total: int | None = None) -> torch.Tensor:
    """log(count / total) per id, counting each id at least once (a new id is rare, not impossible)."""
    c = np.maximum(counts.get(ids), 1).astype(np.float64)
    total = counts.total if total is None else total
    return torch.from_numpy(np.log(c / max(total, 1)).astype(np.float32))


def signal_labels(events: np.ndarray, signals: list[str]) -> np.ndarray:
    """[B, S] float32: 1 where example b's event counts for signal s ('positive': any positive event)."""
    codes = np.asarray(events, np.int64)
    if not signals:
        return np.zeros((len(codes), 0), np.float32)
    return np.stack([np.ones(len(codes), bool) if s == "positive" else codes == EVENT_TYPES.index(s) for s in signals], 1
                    ).astype(np.float32).reshape(len(codes), len(signals))


def with_history(store: ContentStore, items: np.ndarray, hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items then the history-only items, to look up together; [n, L] row of each history position in
    that list; [n, L] True where a position is empty). Only `items` get their content encoded: the
    history is read through its ID and cluster embeddings (M3CSR's modal encoder on the user side)."""
    pad = hist < 0
    extra = np.setdiff1d(np.unique(hist[~pad]), items)
    extra = extra[np.fromiter((i in store for i in extra.tolist()), bool, len(extra))]  # content (clusters) known
    looked_up = np.concatenate([items, extra])
    if len(looked_up) == 0:
        return looked_up, np.zeros(hist.shape, np.int64), np.ones(hist.shape, bool)
    order = np.argsort(looked_up, kind="stable")
    pos = np.searchsorted(looked_up, hist, sorter=order).clip(0, len(looked_up) - 1)
    index = order[pos]
    pad |= looked_up[index] != hist
    return looked_up, np.where(pad, 0, index), pad


def make_batch(users: np.ndarray, items: np.ndarray, store: ContentStore, id_keep_prob: float, rng: np.random.Generator,
               item_positives: KeyedCounts, user_positives: KeyedCounts, events: np.ndarray | None = None,
               signals: list[str] = (), mature: Callable[[np.ndarray], np.ndarray] | None = None,
               history: np.ndarray | None = None, count_scale: int = 1, negatives: np.ndarray | None = None) -> Batch:
    """item_positives / user_positives: positives seen so far per item / user (for the logQ correction
    and, times `count_scale` (the workers sharing the stream), the popularity gate).
    events: the event code (index in EVENT_TYPES) per example; mature: whether MEMER may learn from
    each of the given items; history [B, L]: each example's user's recent positives (trainer.history),
    the example's own item masked out. The stage MEMER's decoder is told in training is drawn at random (see trainer.memer).
    negatives [K]: skipped items, encoded with the batch's items (their own rows, content and dropout)."""
    negatives = np.zeros(0, np.int64) if negatives is None else np.asarray(negatives, np.int64)
    uniq, index = np.unique(np.concatenate([np.asarray(items, np.int64), negatives]), return_inverse=True)
    index, negative_index = index[:len(items)], index[len(items):]
    slots = store.slots(uniq)
    total = item_positives.total
    events = np.full(len(items), EVENT_TYPES.index("like")) if events is None else events
    history = np.zeros((len(users), 0), np.int64) if history is None else np.where(history == items[:, None], -1, history)
    looked_up, hist_index, hist_pad = with_history(store, uniq, history)
    all_slots = store.slots(looked_up)
    return Batch(
        kjt=_kjt(len(users), users, looked_up, store.frame_cluster[all_slots], store.text_cluster[all_slots]),
        user_ids=torch.from_numpy(users.astype(np.int64)),
        item_ids=torch.from_numpy(items.astype(np.int64)),
        item_index=torch.from_numpy(index.astype(np.int64)),
        negative_ids=torch.from_numpy(negatives),
        negative_index=torch.from_numpy(negative_index.astype(np.int64)),
        slots=torch.from_numpy(slots),
        id_keep=torch.from_numpy((rng.random(len(uniq)) < id_keep_prob).astype(np.float32)),
        item_log_q=log_share(item_positives, items, total),
        user_log_q=log_share(user_positives, users, total),
        content=store.content(),
        labels=torch.from_numpy(signal_labels(events, list(signals))),
        mature=torch.from_numpy(np.zeros(len(uniq), np.float32) if mature is None else mature(uniq).astype(np.float32)),
        freq=torch.from_numpy(rng.random(len(uniq)).astype(np.float32)),
        item_counts=torch.from_numpy((item_positives.get(uniq) * count_scale).astype(np.float32)),
        hist_index=torch.from_numpy(hist_index),
        hist_pad=torch.from_numpy(hist_pad),
    )


def item_kjt(store: ContentStore, items: np.ndarray) -> KeyedJaggedTensor:
    slots = store.slots(items)
    return _kjt(len(items), np.zeros(0, np.int64), items, store.frame_cluster[slots], store.text_cluster[slots])


def cluster_kjt(n_frame: int, n_text: int) -> KeyedJaggedTensor:
    """Every cluster id of both modalities: to read the cluster tables out for publication."""
    empty = np.zeros(0, np.int64)
    return _kjt(max(n_frame, n_text), empty, empty, np.arange(n_frame), np.arange(n_text))


def user_kjt(store: ContentStore, users: np.ndarray, history: np.ndarray | None = None
             ) -> tuple[KeyedJaggedTensor, np.ndarray, np.ndarray, np.ndarray]:
    """The lookup of users and, with `history` [n, L], of their history items: (kjt, the history items
    looked up, history rows, pad), as `with_history`."""
    empty = np.zeros(0, np.int64)
    history = np.zeros((len(users), 0), np.int64) if history is None else history
    looked_up, index, pad = with_history(store, empty, history)
    slots = store.slots(looked_up)
    return _kjt(len(users), users, looked_up, store.frame_cluster[slots], store.text_cluster[slots]), looked_up, index, pad
