"""Ranking metrics, averaged over users with at least one test positive (CLCRec protocol)."""
from __future__ import annotations

import numpy as np


def ranking_metrics(ranked: dict[int, list[int]], positives: dict[int, list[int]], ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    """ranked: user -> items best first; positives: user -> relevant items.

    recall@K = hits / |positives|, precision@K = hits / K, NDCG@K with binary gains.
    A user with positives but no ranking counts as zero.
    """
    out: dict[str, float] = {}
    users = [u for u, p in positives.items() if p]
    for k in ks:
        rec, prec, ndcg = [], [], []
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        for u in users:
            pos = set(positives[u])
            top = ranked.get(u, [])[:k]
            hits = np.array([i in pos for i in top], float)
            rec.append(hits.sum() / len(pos))
            prec.append(hits.sum() / k)
            ideal = discounts[: min(len(pos), k)].sum()
            ndcg.append(float((hits * discounts[: len(hits)]).sum() / ideal))
        out[f"recall@{k}"] = float(np.mean(rec)) if users else 0.0
        out[f"precision@{k}"] = float(np.mean(prec)) if users else 0.0
        out[f"ndcg@{k}"] = float(np.mean(ndcg)) if users else 0.0
    return out
