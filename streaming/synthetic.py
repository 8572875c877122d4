"""A learnable synthetic world: the embedded default of `launch.py demo`.

Users have latent tastes, items have latent content, and the content is rendered
into real pixels (frames whose patterns are driven by the latent factors) and a
caption (words tied to the factors). Events come from a ground-truth preference
model: exposure follows popularity and taste, the response (skip/click/play/like)
follows taste plus noise. So content predicts taste the way it does in real data,
and a model that learns to read frames and text can rank items nobody has touched.

Evaluation ground truth is drawn with uniform exposure over the held-out cold
items, so that it measures taste, not popularity.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from streaming.config import WorldConfig
from streaming.producer import Sink
from streaming.schema import Interaction, ItemAnnouncement
from streaming import storage
from streaming.shards import encode_png, write_shard

log = logging.getLogger(__name__)

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "xu", "be", "zo", "fa", "gu", "hi"]
RESPONSE_THRESHOLDS = {"like": 1.2, "play": 0.5, "click": 0.0}  # response below 0: skip


def _words(rng: np.random.Generator, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))))
    return sorted(out)


@dataclass
class World:
    cfg: WorldConfig
    taste: np.ndarray  # [U, D]
    content: np.ndarray  # [I, D]
    pop_bias: np.ndarray  # [I]
    patterns: np.ndarray  # [D, S, S, 3], the pixel pattern each latent factor drives
    pos_words: list[list[str]]
    neg_words: list[list[str]]
    filler: list[str]
    cold_items: set[int] = field(default_factory=set)

    @classmethod
    def create(cls, cfg: WorldConfig) -> "World":
        rng = np.random.default_rng(cfg.seed)
        d, s = cfg.latent_dim, cfg.frame_size
        n_items = cfg.initial_items + cfg.new_items
        shared = rng.normal(0, 0.3, d)  # a common component: some content appeals to most users
        taste = (shared + rng.normal(0, 1, (cfg.n_users, d))) / np.sqrt(d)
        content = rng.normal(0, 1, (n_items, d))
        pop_bias = rng.normal(0, cfg.popularity_skew, n_items)
        yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
        patterns = np.empty((d, s, s, 3))
        for k in range(d):
            fx, fy = rng.integers(1, 4, 2)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.cos(2 * np.pi * (fx * xx + fy * yy) / s + phase)
            patterns[k] = wave[..., None] * rng.uniform(-1, 1, 3)
        vocab = _words(rng, d * 12 + 30)
        pos = [vocab[k * 12: k * 12 + 6] for k in range(d)]
        neg = [vocab[k * 12 + 6: k * 12 + 12] for k in range(d)]
        return cls(cfg, taste, content, pop_bias, patterns, pos, neg, vocab[d * 12:])

    # ---- content -------------------------------------------------------------------------
    def frames(self, item: int) -> np.ndarray:
        """uint8 [F, S, S, 3]; later frames drift in phase, like a short clip."""
        rng = np.random.default_rng((self.cfg.seed, item, 1))
        c = self.content[item]
        out = []
        for t in range(self.cfg.frames_per_item):
            shifted = np.roll(self.patterns, shift=t, axis=2)
            img = 128 + 40 * np.tensordot(c, shifted, axes=1) + rng.normal(0, 10, shifted.shape[1:])
            out.append(np.clip(img, 0, 255).astype(np.uint8))
        return np.stack(out)

    def caption(self, item: int) -> str:
        rng = np.random.default_rng((self.cfg.seed, item, 2))
        c = self.content[item]
        weight = np.abs(c) / np.abs(c).sum()
        words = []
        for _ in range(self.cfg.caption_words):
            if rng.random() < 0.25:
                words.append(str(rng.choice(self.filler)))
                continue
            k = int(rng.choice(len(c), p=weight))
            words.append(str(rng.choice(self.pos_words[k] if c[k] > 0 else self.neg_words[k])))
        return " ".join(words)

    # ---- preferences ---------------------------------------------------------------------
    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.einsum("ud,id->ui", self.taste[users], self.content[items])

    def respond(self, rng: np.random.Generator, scores: np.ndarray) -> list[str]:
        r = scores + rng.normal(0, 0.5, scores.shape)
        return [next((e for e, t in RESPONSE_THRESHOLDS.items() if v > t), "skip") for v in r]

    def sample_events(self, rng: np.random.Generator, users: np.ndarray, items: np.ndarray, n: int, ts: float) -> list[Interaction]:
        """n events for the given users over the given items: exposure ~ popularity x taste."""
        logits = self.score(users, items) / self.cfg.taste_temperature + self.pop_bias[items][None, :]
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        u_idx = rng.integers(0, len(users), n)
        cum = prob.cumsum(axis=1)
        i_idx = np.minimum((cum[u_idx] < rng.random(n)[:, None]).sum(axis=1), len(items) - 1)
        events = self.respond(rng, self.score(users, items)[u_idx, i_idx])
        return [Interaction(int(users[u]), int(items[i]), e, ts) for u, i, e in zip(u_idx, i_idx, events)]

    def eval_truth(self, seed: int) -> dict[int, list[int]]:
        """Per user, the cold items they respond to positively under uniform exposure (play or like)."""
        rng = np.random.default_rng((seed, 99))
        cold = np.array(sorted(self.cold_items))
        truth: dict[int, list[int]] = {}
        if len(cold) == 0:
            return truth
        users = np.arange(self.cfg.n_users)
        for u in users:
            shown = rng.choice(cold, size=min(self.cfg.eval_events_per_user, len(cold)), replace=False)
            r = self.score(np.array([u]), shown)[0] + rng.normal(0, 0.5, len(shown))
            pos = shown[r > RESPONSE_THRESHOLDS["play"]]
            if len(pos):
                truth[int(u)] = sorted(int(i) for i in pos)
        return truth

    def malformed(self, rng: np.random.Generator) -> bytes:
        """Broken payloads of the kinds a real stream sees."""
        kind = rng.integers(0, 5)
        return [
            b"{not json",
            json.dumps({"user_id": 1, "event": "play", "ts": 0}).encode(),  # missing item_id
            json.dumps({"user_id": -3, "item_id": 1, "event": "play", "ts": 0}).encode(),
            json.dumps({"user_id": 1, "item_id": 7.5, "event": "like", "ts": 0}).encode(),
            json.dumps({"user_id": 1, "item_id": 2**63, "event": "click", "ts": 0}).encode(),
        ][kind]


def run_world(world: World, shard_dir: str | Path, sink: Sink, realtime: bool = True, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Writes shards, announces items and produces events; yields a status line per phase.

    The initial catalogue and its history go out at once; new items then arrive one
    group at a time (every new_item_interval_s when realtime). A held-out share of
    new items is announced but its events are never produced: they are the cold
    test items.
    """
    cfg = world.cfg
    rng = np.random.default_rng((cfg.seed, 7))
    users = np.arange(cfg.n_users)
    shard_no = 0

    def publish_items(items: list[int]) -> None:
        nonlocal shard_no
        url = write_shard(
            storage.child(shard_dir, f"items-{shard_no:06d}.tar"),
            [{"item_id": i, "frames": [encode_png(f) for f in world.frames(i)], "text": world.caption(i), "meta": {}} for i in items],
        )
        shard_no += 1
        for i in items:
            sink.announce(ItemAnnouncement(i, url, time.time()))

    def produce(events: list[Interaction]) -> None:
        for ev in events:
            if rng.random() < cfg.malformed_fraction:
                sink.raw_interaction(ev.user_id, world.malformed(rng))
            sink.interaction(ev)

    initial = list(range(cfg.initial_items))
    for start in range(0, len(initial), cfg.items_per_shard):
        publish_items(initial[start: start + cfg.items_per_shard])
    produce(world.sample_events(rng, users, np.array(initial), cfg.n_users * cfg.events_per_user, time.time()))
    sink.flush()
    yield f"initial catalogue: {len(initial)} items, {cfg.n_users * cfg.events_per_user} events"

    group = 10
    new = list(range(cfg.initial_items, cfg.initial_items + cfg.new_items))
    for start in range(0, len(new), group):
        if stop():
            break
        items = new[start: start + group]
        held = [i for i in items if rng.random() < cfg.cold_holdout_fraction]
        world.cold_items.update(held)
        publish_items(items)
        live = np.array([i for i in items if i not in held])
        if len(live) and cfg.events_per_new_item:
            produce(world.sample_events(rng, users, live, len(live) * cfg.events_per_new_item, time.time()))
        sink.flush()
        yield f"new items {items[0]}..{items[-1]} ({len(held)} held out as cold)"
        if realtime:
            time.sleep(cfg.new_item_interval_s * len(items))
