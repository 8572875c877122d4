"""The baselines the papers compare against, scored on the same users and candidates.

Each returns a [users, candidates] score matrix that `evaluation.score_metrics` ranks:
random; popularity (training positives per item); content k-NN (a user's profile is
the mean content feature of the items they liked); and MEMER's initialisations for
cold items, the global-average and the tag-average embedding, scored with the
model's own user vectors.
"""
from __future__ import annotations

import numpy as np


def random_scores(n_users: int, n_items: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_users, n_items))


def popularity_scores(train_pos_counts: np.ndarray, n_users: int) -> np.ndarray:
    """train_pos_counts [C]; cold items have none, so among them this is a tie (a random order)."""
    return np.broadcast_to(train_pos_counts.astype(float), (n_users, len(train_pos_counts)))


def content_knn_scores(user_liked: list[np.ndarray], item_features: np.ndarray, cand_features: np.ndarray) -> np.ndarray:
    """Cosine between each user's mean liked-item feature and each candidate's feature."""
    f = item_features / np.maximum(np.linalg.norm(item_features, axis=1, keepdims=True), 1e-9)
    c = cand_features / np.maximum(np.linalg.norm(cand_features, axis=1, keepdims=True), 1e-9)
    profiles = np.stack([f[liked].mean(0) if len(liked) else np.zeros(f.shape[1]) for liked in user_liked])
    return profiles @ c.T


def global_average_vectors(warm_vectors: np.ndarray, n_cold: int) -> np.ndarray:
    mean = warm_vectors.mean(0)
    return np.repeat((mean / max(np.linalg.norm(mean), 1e-9))[None], n_cold, 0)


def tag_average_vectors(warm_vectors: np.ndarray, warm_tags: list[set[str]], cold_tags: list[set[str]]) -> np.ndarray:
    """Each cold item: the mean vector of warm items sharing its tags (weighted by overlap);
    the global average when it shares none."""
    fallback = global_average_vectors(warm_vectors, 1)[0]
    out = []
    for tags in cold_tags:
        w = np.array([len(tags & t) for t in warm_tags], float)
        v = (w[:, None] * warm_vectors).sum(0) / w.sum() if w.sum() else fallback
        out.append(v / max(np.linalg.norm(v), 1e-9))
    return np.stack(out) if out else np.zeros((0, warm_vectors.shape[1]))
