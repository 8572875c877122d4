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
from trainer.evaluation import ranking_metrics

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
    cand = set(candidates.tolist())
    positives = {u: [i for i in truth[u] if i in cand] for u in users}
    positives = {u: p for u, p in positives.items() if p}
    _, ids = reader.search(vecs, k, candidates=candidates)
    model = {u: [int(i) for i in row if i >= 0] for u, row in zip(users, ids)}
    counts = {i: 0 for i in candidates.tolist()}
    for p in positives.values():
        for i in p:
            counts[i] += 1
    popular = sorted(counts, key=lambda i: -counts[i])[:k]
    rng = np.random.default_rng(seed)
    rand = {u: rng.permutation(candidates)[:k].tolist() for u in positives}
    extra = {}
    if true_scores is not None:
        order = np.argsort(-true_scores(np.array(list(positives)), candidates), axis=1)[:, :k]
        extra["oracle"] = ranking_metrics({u: candidates[row].tolist() for u, row in zip(positives, order)}, positives, (k,))
    return extra | {
        "version": cur.version,
        "step": cur.manifest.get("step"),
        "cold_items": len(candidates),
        "users": len(positives),
        "model": ranking_metrics(model, positives, (k,)),
        "popularity": ranking_metrics({u: popular for u in positives}, positives, (k,)),
        "random": ranking_metrics(rand, positives, (k,)),
    }


class VersionWatcher(threading.Thread):
    """Polls for new index versions, hot-swaps the reader, and scores each one."""

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
                    log.info("index v%d: cold recall@20 %.3f (popularity %.3f, random %.3f) over %d cold items",
                             q["version"], q["model"]["recall@20"], q["popularity"]["recall@20"], q["random"]["recall@20"], q["cold_items"])
        except Exception:  # the watcher must never take the run down
            log.exception("evaluating a new index version failed")

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
