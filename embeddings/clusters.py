"""Per-modality k-means cluster IDs (M3CSR): a trainable ID for 'content like this'.

Clusters are fitted with FAISS k-means on cheap, fixed content descriptors (a
downsampled colour layout of the frames; a hashed bag of words of the text) and
then stay fixed, so a new item gets a cluster ID, and with it a trained
embedding, the moment it is announced.
"""
from __future__ import annotations

import zlib

import faiss
import numpy as np

from trainer.text import WORD

TEXT_DIM = 512


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

    def assign(self, descriptors: np.ndarray) -> np.ndarray:
        _, idx = self._index.search(np.ascontiguousarray(descriptors, dtype=np.float32), 1)
        return idx[:, 0].astype(np.int64)
