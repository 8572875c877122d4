"""Quality through the published index, while training runs: each new version the
reader swaps to is scored on the held-out cold items against the world's ground
truth, next to the popularity and random rankings of the same candidates."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from embeddings.reader import IndexReader
from trainer import baselines
from trainer.metrics import score_metrics

log = logging.getLogger(__name__)


def cold_quality(reader: IndexReader, truth: dict[int, list[int]], cold_items: set[int], k: int = 20, seed: int = 0,
                 true_scores: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict:
    """Recall@k of the model, of global popularity among the cold items (an oracle: it uses
    the test positives' counts, the best ranking that ignores the user), and of a random order.
    With `true_scores(users, items)` (a synthetic world's preference model) also the ceiling:
    ranking by true taste, which the noise in the test positives keeps below 1."""
    cur = reader.current
    candidates = np.array(sorted(set(cur.item_ids.tolist()) & cold_items), np.int64)
    vecs, users = reader.user_vectors(sorted(truth))
    if len(candidates) == 0 or not users:
        return {}
    positive = np.array([np.isin(candidates, truth[u]) for u in users])
    with_pos = positive.any(axis=1)
    users, vecs, positive = [u for u, keep in zip(users, with_pos) if keep], vecs[with_pos], positive[with_pos]
    if not users:
        return {}
    scores = {
        "model": reader.score_matrix(vecs, candidates),
        "popularity": baselines.popularity_scores(positive.sum(axis=0), len(users)),
        "random": baselines.random_scores(len(users), len(candidates), seed),
    }
    if true_scores is not None:
        scores["oracle"] = true_scores(np.array(users), candidates)
    valid = np.ones_like(positive)
    return {"version": cur.version, "step": cur.manifest.get("step"), "cold_items": len(candidates), "users": len(users)} | {
        name: score_metrics(s, positive, valid, users, candidates, (k,)) for name, s in scores.items()}


class VersionWatcher(threading.Thread):
    """Polls for new index versions, hot-swaps the reader, and scores each one (`score()` returns a
    dict with the version, or None; a `summary` string in it is what the log line says)."""

    def __init__(self, reader: IndexReader, score, interval_s: float = 1.0):
        super().__init__(daemon=True, name="index-watcher")
        self.reader, self.score, self.interval_s = reader, score, interval_s
        self.history: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval_s)

    def poll(self) -> None:
        try:
            if self.reader.refresh():
                q = self.score()
                if q:
                    q["t"] = time.time()
                    self.history.append(q)
                    log.info("index v%d: %s", q["version"], q.get("summary") or
                             "cold recall@20 %.3f (popularity %.3f, random %.3f) over %d cold items" % (
                                 q["model"]["recall@20"], q["popularity"]["recall@20"], q["random"]["recall@20"], q["cold_items"]))
        except Exception:  # the watcher must never take the run down
            log.exception("evaluating a new index version failed")

    def stop(self, timeout_s: float | None = 10.0) -> None:
        self._halt.set()
        self.join(timeout_s)
