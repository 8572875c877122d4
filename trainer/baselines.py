"""The baselines the papers compare against, scored on the same users and candidates.

Each returns a [users, candidates] score matrix that `metrics.score_metrics` ranks:
random; popularity (training positives per item); content k-NN (a user's profile is
the mean content feature of the items they liked); MEMER's initialisations for cold
items, the global-average and the tag-average embedding, scored with the model's own
user vectors; and two learned ones: `implicit`'s ALS on the training positives (the
collaborative baseline for warm items), and a DeepMusic-style ridge regression from the
same content descriptors to ALS's item factors (the content-to-collaborative baseline
for cold items).
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


def _als(pos: dict[int, set[int]], n_users: int, n_items: int, seed: int, factors: int, reg: float, alpha: float):
    from implicit.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix

    users = np.array([u for u, items in pos.items() for _ in items], np.int64)
    items = np.array([i for its in pos.values() for i in its], np.int64)
    matrix = csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    model = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=alpha, iterations=20, random_state=seed)
    model.fit(matrix, show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


ALS_GRID = [(f, reg, alpha) for f in (32, 64, 128) for reg in (0.01, 0.1, 1.0) for alpha in (1.0, 10.0)]


def als_factors(train_pos: dict[int, set[int]], n_users: int, n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(user factors [n_users, f], item factors [n_items, f]) of implicit's ALS on the binary
    training positives; rows that had no positive stay zero. Factors, regularisation and
    confidence are chosen on a validation slice of the training rows (a tenth of each user's
    positives, recall@20 over the rest of the catalogue), then the model is refit on all of them:
    the strongest honest setting, not the library's defaults."""
    rng = np.random.default_rng(seed)
    fit: dict[int, set[int]] = {}
    held: dict[int, set[int]] = {}
    for u, items in train_pos.items():
        items = sorted(items)
        out = set(rng.choice(items, len(items) // 10, replace=False).tolist()) if len(items) >= 10 else set()
        fit[u], held[u] = set(items) - out, out
    users = np.array([u for u in held if held[u]], np.int64)

    def recall(setting) -> float:
        uf, itf = _als(fit, n_users, n_items, seed, *setting)
        scores = uf[users] @ itf.T
        for r, u in enumerate(users):
            scores[r, list(fit[u])] = -np.inf
        top = np.argsort(-scores, 1)[:, :20]
        return float(np.mean([len(set(top[r].tolist()) & held[u]) / min(len(held[u]), 20) for r, u in enumerate(users)]))

    best = max(ALS_GRID, key=recall) if len(users) else (64, 0.1, 1.0)
    return _als(train_pos, n_users, n_items, seed, *best)
