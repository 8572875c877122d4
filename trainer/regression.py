"""The vector a brand-new item is served with: a ridge regression from its fixed content
descriptors onto the vectors the trained items are served with (DeepMusic's idea, linear).

Why not the item tower's own content path? The towers are trained from scratch on the
catalogue, and they learn its items by heart: on MovieLens 100K their content vector of a cold
item ranked at cold Recall@20 0.23, where this regression from the same items' descriptors onto
the same model's item vectors ranked at 0.34 (README, "Cold items by regression"). A linear map
with its strength chosen by leave-one-out error cannot memorise a title word the way a
transformer does, and it is refit on every encoder version, so it follows the vectors it
predicts.

The descriptors are the ones the k-means cluster IDs are fitted on (embeddings.clusters: a
hashed bag of words of the text, an 8x8 colour layout of the frames). Each modality is a block
with its own strength: the closed-form leave-one-out error of ridge (Allen's PRESS) picks a
weight per block and an overall strength from a grid, so a modality that predicts nothing
(posters, on MovieLens) is shrunk away by the data, not by a flag.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
REGRESSION_FILE = "regression.npz"
STRENGTHS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # ridge lambda, on unit-norm text descriptors
FRAME_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0)  # the frames block's scale against the text block's
MOST_ITEMS = 20_000  # fitted on a uniform sample beyond this: 700 features are saturated long before
CHUNK = 65_536  # items per block of predictions


def _design(frame_desc: np.ndarray, text_desc: np.ndarray, frame_weight: float, dtype=np.float64) -> np.ndarray:
    n = len(text_desc)
    return np.concatenate([np.asarray(text_desc, dtype), frame_weight * np.asarray(frame_desc, dtype), np.ones((n, 1), dtype)], 1)


def _press(x: np.ndarray, y: np.ndarray, strengths: tuple[float, ...]) -> list[float]:
    """Mean squared leave-one-out error of ridge for each strength, in closed form: with
    X'X = V diag(s) V', the hat matrix's diagonal is sum_k (X v_k)^2 / (s_k + lambda)."""
    s, v = np.linalg.eigh(x.T @ x)
    z = x @ v  # [n, d]
    zy = z.T @ y  # [d, D]
    out = []
    for lam in strengths:
        inv = 1.0 / (np.maximum(s, 0) + lam)
        pred = z @ (zy * inv[:, None])
        hat = (z * z) @ inv
        out.append(float((((y - pred) / np.maximum(1 - hat, 1e-6)[:, None]) ** 2).mean()))
    return out


class ContentRegression:
    """weights [text + frames + 1, D] of the ridge fit, with the frames block's scale."""

    def __init__(self, weights: np.ndarray, frame_weight: float, strength: float, fitted_on: int):
        self.weights, self.frame_weight, self.strength, self.fitted_on = weights, frame_weight, strength, fitted_on

    @classmethod
    def fit(cls, frame_desc: np.ndarray, text_desc: np.ndarray, vectors: np.ndarray, seed: int = 0) -> "ContentRegression":
        """Fits on items' descriptors and their vectors [n, D] (the served unit vectors; or ALS factors)."""
        if len(vectors) > MOST_ITEMS:
            keep = np.sort(np.random.default_rng(seed).choice(len(vectors), MOST_ITEMS, replace=False))
            frame_desc, text_desc, vectors = frame_desc[keep], text_desc[keep], vectors[keep]
        y = np.asarray(vectors, np.float64)
        scores = {(w, lam): err for w in FRAME_WEIGHTS
                  for lam, err in zip(STRENGTHS, _press(_design(frame_desc, text_desc, w), y, STRENGTHS))}
        w, lam = min(scores, key=scores.get)
        x = _design(frame_desc, text_desc, w)
        weights = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y).astype(np.float32)
        log.info("content regression: fitted on %d items, frames weight %g, strength %g (leave-one-out error %.4f)",
                 len(y), w, lam, scores[(w, lam)])
        return cls(weights, w, lam, len(y))

    def raw(self, frame_desc: np.ndarray, text_desc: np.ndarray) -> np.ndarray:
        """The fit's predictions [n, D] for items' descriptors, as regressed (the ALS baseline's factors);
        in chunks, so that a whole catalogue's export never holds its design matrix at once."""
        out = np.empty((len(text_desc), self.weights.shape[1]), np.float32)
        for s in range(0, len(text_desc), CHUNK):
            out[s:s + CHUNK] = _design(frame_desc[s:s + CHUNK], text_desc[s:s + CHUNK], self.frame_weight, np.float32) @ self.weights
        return out

    def predict(self, frame_desc: np.ndarray, text_desc: np.ndarray) -> np.ndarray:
        """Unit vectors [n, D] for items' descriptors: what is served."""
        out = self.raw(frame_desc, text_desc)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def save(self, path: Path) -> dict:
        """Writes the fit; returns what the manifest says of it."""
        np.savez(path, weights=self.weights, frame_weight=self.frame_weight, strength=self.strength, fitted_on=self.fitted_on)
        return {"file": REGRESSION_FILE, "fitted_on": self.fitted_on, "frame_weight": self.frame_weight, "strength": self.strength}

    @classmethod
    def load(cls, path: Path) -> "ContentRegression":
        with np.load(path) as z:
            return cls(z["weights"], float(z["frame_weight"]), float(z["strength"]), int(z["fitted_on"]))
