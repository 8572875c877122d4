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


def exact_scores(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """users @ items.T, where identical item vectors get bit-identical scores. A BLAS product rounds
    a column differently by its position (measured: 943 users x 252 copies of one vector gave 1.8
    distinct scores per user), so scores equal in exact arithmetic would not tie: they would fall
    back on candidate order, which follows arrival and leaks popularity."""
    unique, inverse = np.unique(np.asarray(items), axis=0, return_inverse=True)
    return (users @ unique.T)[:, inverse.ravel()]


def score_metrics(scores: np.ndarray, positive: np.ndarray, valid: np.ndarray, users: list[int], candidates: np.ndarray,
                  ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    """Full-ranking metrics from a score matrix.

    scores [U, C] (any method), positive [U, C] the test positives, valid [U, C] the
    candidates each user is ranked over (their training items are excluded). Users
    with no positive among their candidates are left out of the averages. AUC is the
    share of (positive, non-positive) candidate pairs ordered correctly, per user.
    """
    s = np.where(valid, scores, -np.inf)
    # ties (popularity among never-seen items, one shared vector) break at random, not by
    # candidate order, which often follows time of arrival and would leak popularity
    tiebreak = np.random.default_rng(0).random(s.shape)
    order = np.lexsort((tiebreak, -s), axis=1)[:, : max(ks)]
    ranked = {u: candidates[order[r]][valid[r, order[r]]].tolist() for r, u in enumerate(users)}
    pos = {u: candidates[positive[r] & valid[r]].tolist() for r, u in enumerate(users)}
    out = ranking_metrics(ranked, pos, ks)
    aucs = []
    for r in range(len(users)):
        p, n = positive[r] & valid[r], ~positive[r] & valid[r]
        if p.any() and n.any():
            ps, ns = np.sort(scores[r, p]), np.sort(scores[r, n])
            below = np.searchsorted(ns, ps, side="left") + 0.5 * (np.searchsorted(ns, ps, side="right") - np.searchsorted(ns, ps, side="left"))
            aucs.append(below.sum() / (len(ps) * len(ns)))
    out["auc"] = float(np.mean(aucs)) if aucs else 0.0
    return out


def pooled_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(a positive pair outscores a negative one), ties counting half: the classifier AUC over
    pooled (user, item) pairs that MEMER reports."""
    pos, neg = np.asarray(positive_scores, np.float64), np.sort(np.asarray(negative_scores, np.float64))
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))
