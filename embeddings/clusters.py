"""Per-modality k-means cluster IDs (M3CSR): a trainable ID for 'content like this'.

Clusters are fitted with FAISS k-means on cheap, fixed content descriptors (a
downsampled colour layout of the frames; a hashed bag of words of the text: the
non-trainable features M3CSR clusters), over the whole catalogue known at the time. A
new item gets its nearest centroid, and with it a trained embedding, the moment it is
announced. As the catalogue grows the centroids are refit (`ClusterModel.refit`), with
k = sqrt(items) up to the table's size, and each new centroid takes the id of the old one
it matches, so the trained cluster embeddings keep meaning what they meant.
"""
from __future__ import annotations

import math
import zlib

import faiss
import numpy as np

from trainer.text import WORD

TEXT_DIM = 512
FRAME_DIM = 8 * 8 * 3


def frame_descriptor(frames: np.ndarray) -> np.ndarray:
    """frames uint8 [F, S, S, 3] -> float32 [8*8*3]: mean over the clip, 8x8 average pooling."""
    f, s = frames.shape[0], frames.shape[1]
    x = frames.astype(np.float32).mean(0) / 255.0
    k = max(1, s // 8)
    x = x[: k * 8, : k * 8].reshape(8, k, 8, k, 3).mean((1, 3))
    return (x - x.mean()).ravel().astype(np.float32)


def text_descriptor(text: str) -> np.ndarray:
    v = np.zeros(TEXT_DIM, np.float32)
    for w in WORD.findall(text.lower()):
        v[zlib.crc32(w.encode()) % TEXT_DIM] += 1.0
    n = np.linalg.norm(v)
    return v / n if n else v


class ClusterModel:
    """Centroids for one modality; `assign` maps descriptors to cluster ids."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._index = faiss.IndexFlatL2(self.centroids.shape[1])
        self._index.add(self.centroids)

    @classmethod
    def fit(cls, descriptors: np.ndarray, k: int, seed: int = 0) -> "ClusterModel":
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        k = min(k, len(x))
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, min_points_per_centroid=1, max_points_per_centroid=100000)
        km.train(x)
        return cls(km.centroids)

    def refit(self, descriptors: np.ndarray, k: int, seed: int = 0) -> "ClusterModel":
        """Centroids fitted anew on `descriptors` (k never below the current count), numbered so that
        the old ids go to the new centroids matched to them at the least total squared distance
        (Hungarian matching); the centroids beyond the old count take the next ids."""
        from scipy.optimize import linear_sum_assignment

        old = self.centroids
        fresh = ClusterModel.fit(descriptors, max(k, len(old)), seed).centroids
        if len(fresh) < len(old):  # fewer distinct descriptors than clusters: keep what there is
            return self
        cost = ((fresh[:, None, :] - old[None, :, :]) ** 2).sum(-1)
        new_rows, old_ids = linear_sum_assignment(cost)
        order = np.empty(len(fresh), np.int64)
        order[old_ids] = new_rows
        order[len(old):] = np.setdiff1d(np.arange(len(fresh)), new_rows)
        return ClusterModel(fresh[order])

    def assign(self, descriptors: np.ndarray) -> np.ndarray:
        _, idx = self._index.search(np.ascontiguousarray(descriptors, dtype=np.float32), 1)
        return idx[:, 0].astype(np.int64)


def clusters_for(n_items: int, most: int) -> int:
    """k for a catalogue of n items: sqrt(n) (a cluster per sqrt(n) items), at least 2, at most the table's rows."""
    return int(min(most, max(2, round(math.sqrt(n_items)))))
