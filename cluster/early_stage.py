"""MEMER's evaluation protocol (paper 004, section 3.1) and the cold-to-warm transition,
both from a published version directory.

Early stage: test items that are mature in training are embedded again as if they were
new, by each initialisation method, and scored against the users' vectors. AUC is
pooled over (user, item) pairs: every warm test positive on such an item against one
sampled item of the same set the user never interacted with (sampled negatives work on
any dataset, explicit negatives or not). RelaImpr = (AUC - 0.5) / (AUC_mature - 0.5).

Transition: Recall@20 of items grouped by the interactions they had in training
(0, 1-2, 3-5, ...), ranked within their group, with the published mapping serving the
items below the maturity threshold M and without it (content alone, the old path).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embeddings.mapping import MAPPING_FILE, EarlyStageMapper
from streaming.shards import ItemContent, read_shard
from trainer import baselines
from trainer.metrics import pooled_auc, score_metrics

COUNT_BINS = [(0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 10**9)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


@dataclass
class MappedVersion:
    """What both measures read from one version (its threshold M, its early.npz, its mapping)
    and the items' shard content, loaded once."""

    maturity: int
    early: dict[str, np.ndarray]
    mapper: EarlyStageMapper | None
    content: dict[int, ItemContent]

    @classmethod
    def load(cls, version_dir: Path, shard_dir: Path) -> "MappedVersion":
        manifest = json.loads((version_dir / "manifest.json").read_text())
        mapper = EarlyStageMapper.load(version_dir) if (version_dir / MAPPING_FILE).exists() else None
        content: dict[int, ItemContent] = {}
        if mapper is not None:
            for url in sorted({p.resolve().as_uri() for p in shard_dir.glob("*.tar")}):
                content.update(read_shard(url, mapper.cfg.frames * mapper.cfg.clips, mapper.cfg.frame_size))
        with np.load(version_dir / "early.npz") as e:
            early = dict(e)
        return cls(manifest.get("maturity", {}).get("threshold", 5), early, mapper, content)

    def remap(self, items: np.ndarray, counts: np.ndarray | None = None, withhold_images: bool = False,
              regression: bool = True) -> np.ndarray | None:
        """The mapping's embedding of each item from its shard content, at the given interaction
        counts (0: as if new, served by the version's content regression unless `regression` is
        False), optionally as if it had no image; None when the version has no mapping."""
        if self.mapper is None:
            return None
        cfg = self.mapper.cfg
        blank = np.zeros((cfg.frames * cfg.clips, cfg.frame_size, cfg.frame_size, 3), np.uint8)
        got = [self.content.get(i) for i in items.tolist()]
        frames = np.stack([c.frames if c and not withhold_images else blank for c in got]) if got else blank[:0]
        has = np.array([float(c.has_frames and not withhold_images) if c else 0.0 for c in got])
        texts = [c.text if c else "" for c in got]
        counts = np.zeros(len(items)) if counts is None else counts
        return np.concatenate([self.mapper.embed_content(frames[s:s + 256], has[s:s + 256], texts[s:s + 256], counts[s:s + 256],
                                                         regression=regression)
                               for s in range(0, len(items), 256)]) if len(items) else np.zeros((0, cfg.embedding_dim), np.float32)


def early_stage(pub: MappedVersion, users: dict[int, np.ndarray], test_pos: dict[int, set[int]], seen: dict[int, set[int]],
                tags: dict[int, set[str]], seed: int) -> dict:
    """users: user -> vector; test_pos: user -> warm test positives; seen: user -> every item
    they interacted with (train and test); tags: item -> tags. Returns the eval JSON's section."""
    maturity, e = pub.maturity, pub.early
    mature_ids = e["ids"][e["counts"] >= maturity]
    row = {int(i): k for k, i in enumerate(mature_ids)}
    rng = np.random.default_rng(seed)
    pos_pairs, neg_pairs = [], []
    for u, items in test_pos.items():
        if u not in users:
            continue
        for i in items:
            if i in row:
                j = int(rng.choice(mature_ids))
                for _ in range(20):  # a mature item the user never touched
                    if j not in seen.get(u, ()) and j != i:
                        break
                    j = int(rng.choice(mature_ids))
                pos_pairs.append((u, row[i]))
                neg_pairs.append((u, row[j]))
    if not pos_pairs:
        return {}
    full = e["full"][np.isin(e["ids"], mature_ids)]
    item_tags = [tags.get(int(i), set()) for i in mature_ids]
    leave_one_out = np.stack([baselines.tag_average_vectors(np.delete(full, k, 0), item_tags[:k] + item_tags[k + 1:], [item_tags[k]])[0]
                              for k in range(len(full))])
    methods = {
        "mature": full,
        "random": _unit(rng.normal(size=full.shape)),
        "global_avg": baselines.global_average_vectors(full, len(full)),
        "tag_avg": leave_one_out,
        "content_only": e["content"][np.isin(e["ids"], mature_ids)],
    }
    memer = pub.remap(mature_ids, regression=False)  # the regression was fitted on these very items: not a new item's view
    if memer is not None:
        methods["memer"] = memer
    u_pos = np.stack([users[u] for u, _ in pos_pairs])
    u_neg = np.stack([users[u] for u, _ in neg_pairs])
    i_pos, i_neg = np.array([k for _, k in pos_pairs]), np.array([k for _, k in neg_pairs])
    auc = {name: round(pooled_auc((u_pos * v[i_pos]).sum(1), (u_neg * v[i_neg]).sum(1)), 4) for name, v in methods.items()}
    relaimpr = {name: round((a - 0.5) / max(auc["mature"] - 0.5, 1e-9), 4) for name, a in auc.items() if name != "mature"}
    return {"auc": auc, "relaimpr": relaimpr, "maturity": maturity, "items": len(mature_ids), "pairs": len(pos_pairs)}


def transition(pub: MappedVersion, users: list[int], user_vecs: np.ndarray, test_pos: dict[int, set[int]],
               train_seen: dict[int, set[int]], counts: dict[int, int]) -> dict:
    """Recall@20 per bin of training interactions, with and without the mapping below M."""
    maturity, e = pub.maturity, pub.early
    ids = e["ids"]
    n = np.array([counts.get(int(i), 0) for i in ids])
    early = pub.remap(ids, n)
    with_map = np.where((n >= maturity)[:, None], e["full"], early if early is not None else e["content"])
    without = np.where((n >= maturity)[:, None], e["full"], e["content"])
    out = {"maturity": maturity, "bins": []}
    for lo, hi in COUNT_BINS:
        cols = np.flatnonzero((n >= lo) & (n <= hi))
        cands = ids[cols]
        positive = np.array([[int(i) in test_pos.get(u, ()) for i in cands] for u in users]).reshape(len(users), len(cands))
        keep = positive.any(1)
        if len(cands) < 2 or not keep.any():
            continue
        valid = np.array([[int(i) not in train_seen.get(u, ()) for i in cands] for u in users])[keep]
        kept = [u for u, k in zip(users, keep) if k]
        point = {"bin": f"{lo}" if lo == hi else (f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}"), "items": len(cands), "users": len(kept)}
        for name, vecs in (("with_mapping", with_map), ("without_mapping", without)):
            point[name] = round(score_metrics(user_vecs[keep] @ vecs[cols].T, positive[keep], valid, kept, cands, (20,))["recall@20"], 4)
        out["bins"].append(point)
    return out

