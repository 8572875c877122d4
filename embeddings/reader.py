"""The serving-side reader: loads the newest published version and swaps to a newer
one without a restart. A version whose checksums do not match is refused (the
current one keeps serving). On a CUDA machine with faiss GPU support, unrestricted
searches run on a GPU copy of the index.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from embeddings.publish import INDEX_FILE, ITEMS_FILE, LATEST, MANIFEST, USERS_FILE, sha256

log = logging.getLogger(__name__)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class LoadedVersion:
    version: int
    manifest: dict
    index: faiss.Index
    gpu_index: faiss.Index | None
    item_ids: np.ndarray
    user_rows: dict[int, int]
    user_vectors: np.ndarray
    extras: dict = field(default_factory=dict)  # what a caller attaches while preparing it (see refresh)


class IndexReader:
    def __init__(self, root: str | Path, use_gpu: bool | None = None):
        self.root = Path(root)
        self.use_gpu = gpu_available() if use_gpu is None else use_gpu
        self._gpu_res = faiss.StandardGpuResources() if self.use_gpu else None
        self._current: LoadedVersion | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> int | None:
        return self._current.version if self._current else None

    @property
    def current(self) -> LoadedVersion | None:
        return self._current

    def refresh(self, prepare: Callable[[Path, LoadedVersion], None] | None = None) -> bool:
        """Loads the version LATEST points to if it is newer; True when it swapped. `prepare(path, loaded)`
        runs before the swap, so a request never sees the new version half ready."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return False
        path = self.root / name
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            log.warning("version %s unreadable (%s); keeping %s", name, exc, self.version)
            return False
        if self._current and manifest["version"] <= self._current.version:
            return False
        if self._current and manifest.get("step", 0) < self._current.manifest.get("step", 0):
            log.warning("version %s holds step %s, older than the served step %s; refused",
                        name, manifest.get("step"), self._current.manifest.get("step"))
            return False
        for f, digest in manifest["checksums"].items():
            if sha256(path / f) != digest:
                log.warning("version %s: checksum mismatch on %s; keeping %s", name, f, self.version)
                return False
        index = faiss.read_index(str(path / INDEX_FILE))
        gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index) if self._gpu_res is not None else None
        users = np.load(path / USERS_FILE)
        loaded = LoadedVersion(
            manifest["version"], manifest, index, gpu_index, np.load(path / ITEMS_FILE),
            {int(u): r for r, u in enumerate(users["ids"])}, users["vectors"],
        )
        if prepare is not None:
            prepare(path, loaded)
        with self._lock:
            self._current = loaded
        log.info("serving index version %d (%d items)", loaded.version, len(loaded.item_ids))
        return True

    def user_vectors(self, user_ids: list[int]) -> tuple[np.ndarray, list[int]]:
        """Vectors of the users this version knows, and which of the asked ids those are."""
        cur = self._require()
        known = [u for u in user_ids if u in cur.user_rows]
        return cur.user_vectors[[cur.user_rows[u] for u in known]], known

    def search(self, queries: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids (and scores) per query vector, optionally among `candidates` only; -1 pads."""
        cur = self._require()
        q = np.ascontiguousarray(queries, np.float32)
        if candidates is None:
            return (cur.gpu_index or cur.index).search(q, k)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(candidates, np.int64)))
        return cur.index.search(q, k, params=params)

    def score_matrix(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """[queries, candidates] scores from a full-depth search over the candidates (for evaluation)."""
        scores, ids = self.search(queries, len(candidates), candidates=candidates)
        col = {int(c): j for j, c in enumerate(candidates)}
        out = np.full((len(queries), len(candidates)), -np.inf, np.float32)
        for r in range(len(queries)):
            keep = ids[r] >= 0
            out[r, [col[int(i)] for i in ids[r][keep]]] = scores[r][keep]
        return out

    def _require(self) -> LoadedVersion:
        with self._lock:
            cur = self._current
        if cur is None:
            raise RuntimeError(f"no index version published under {self.root} yet")
        return cur
