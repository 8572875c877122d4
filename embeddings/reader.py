"""The serving-side reader: loads the newest published version and swaps to a newer
one without a restart. A version whose checksums do not match is refused (the
current one keeps serving). A version built on the base already loaded costs only its
new delta segments (see `embeddings/layered.py`). On a CUDA machine with faiss GPU
support, unrestricted searches run on a GPU copy of the base.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from embeddings.layered import LayeredIndex
from embeddings.publish import DELTA_FILE, INDEX_FILE, ITEMS_FILE, LATEST, MANIFEST, NAMES_FILE, USERS_FILE, sha256
from streaming import storage
from streaming.schema import INT_ID_LIMIT, RawId, id_key, parse_id, raw_id

log = logging.getLogger(__name__)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class LoadedVersion:
    version: int
    manifest: dict
    index: LayeredIndex  # what is served: the published index plus what a caller adds live (posted items)
    user_rows: dict[int, int]
    user_vectors: np.ndarray
    published: LayeredIndex  # the version as published, never modified: the next version derives from it
    extras: dict = field(default_factory=dict)  # what a caller attaches while preparing it (see refresh)
    names: dict[int, str] = field(default_factory=dict)  # key -> string id (NAMES_FILE); integer ids are their keys

    @cached_property
    def string_item_ids(self) -> bool:
        """Whether the items as published carry string ids (what a posted id that spells a number is)."""
        ids = self.published.ids()
        return bool(len(ids)) and int(ids[-1]) >= INT_ID_LIMIT

    def raw_id(self, key: int) -> RawId:
        """An item or user key as the stream carried it."""
        return raw_id(key, self.names)

    def key(self, text: str, known: Callable[[int], bool]) -> int:
        """The key of an id written as text: the integer it spells if `known`, else the string's."""
        first = id_key(parse_id(text))
        return first if known(first) else id_key(text)

    @cached_property
    def item_ids(self) -> np.ndarray:
        """Every item id this version serves, sorted (computed on first use: O(catalogue))."""
        return self.index.ids()


def _chain(manifest: dict, name: str) -> tuple[str, list[str]]:
    """(base, segments after it) that a version is built from; a base is its own, with none."""
    return (manifest["base"], manifest["segments"]) if manifest.get("base") else (name, [])


class IndexReader:
    def __init__(self, root: str | Path, use_gpu: bool | None = None, cache: Path | None = None):
        """root: the publisher's directory, or its object-store prefix (s3://...): then the
        versions it follows are downloaded into `cache` (a base once, then only segments)."""
        self.remote = str(root) if storage.is_remote(root) else None
        self.root = Path(cache or tempfile.mkdtemp(prefix="coldstream-reader-")) if self.remote else Path(root)
        if self.remote and cache is None:  # a cache of our own making goes with us
            weakref.finalize(self, shutil.rmtree, self.root, True)
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

    def pin(self, loaded: LoadedVersion) -> None:
        """Serves a version loaded before (an evaluation keeps the one validation chose)."""
        with self._lock:
            self._current = loaded

    def refresh(self, prepare: Callable[[Path, LoadedVersion], None] | None = None) -> bool:
        """Loads the version LATEST points to if it is newer; True when it swapped. `prepare(path, loaded)`
        runs before the swap, so a request never sees the new version half ready. A version built
        on the base already loaded costs only the segments not applied yet."""
        try:
            name = self._download_latest() if self.remote else (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return False
        if name is None:
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
        try:
            if not self._verified(path, manifest):
                return False
            index = self._index(name, manifest)
            with np.load(path / USERS_FILE) as users:
                user_ids, user_vectors = users["ids"], users["vectors"]
            names = {int(k): v for k, v in json.loads((path / NAMES_FILE).read_text()).items()} if NAMES_FILE in manifest["checksums"] else {}
        except (FileNotFoundError, json.JSONDecodeError, KeyError, RuntimeError) as exc:  # pruned under us (faiss: RuntimeError)
            log.warning("version %s incomplete (%s); keeping %s", name, exc, self.version)
            return False
        if index is None:
            return False
        manifest["name"] = name
        loaded = LoadedVersion(manifest["version"], manifest, index.derive(), {int(u): r for r, u in enumerate(user_ids)},
                               user_vectors, published=index, names=names)
        if prepare is not None:
            prepare(path, loaded)
        with self._lock:
            self._current = loaded
        log.info("serving index version %d (%d items)", loaded.version, loaded.index.ntotal)
        return True

    def _download_latest(self) -> str | None:
        """Brings the store's newest version (its base and segments) into the cache; its name, or
        None when the store is unreadable (the served version stays)."""
        try:
            name = storage.read_bytes(storage.join(self.remote, LATEST)).decode().strip()
            if self._current is not None and name == self._current.manifest["name"]:
                return name
            manifest = json.loads(storage.read_bytes(storage.join(self.remote, name, MANIFEST)))
            base, segments = _chain(manifest, name)
            chain = [base, *segments]
            for part in chain:
                local = self.root / part
                if (local / MANIFEST).exists():
                    continue
                files = json.loads(storage.read_bytes(storage.join(self.remote, part, MANIFEST)))["checksums"]
                tmp = self.root / f".dl-{part}"
                shutil.rmtree(tmp, ignore_errors=True)
                for f in (*files, MANIFEST):
                    storage.get_file(storage.join(self.remote, part, f), tmp / f)
                if not self._verified(tmp, {"checksums": files}):  # never cache a bad copy
                    shutil.rmtree(tmp, ignore_errors=True)
                    return None
                tmp.rename(local)
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            log.warning("index store %s unreadable (%s); keeping %s", self.remote, exc, self.version)
            return None
        keep = set(chain)  # and what the served version is built on, until the swap
        if self._current is not None:
            served_base, served_segments = _chain(self._current.manifest, self._current.manifest["name"])
            keep |= {served_base, *served_segments}
        for old in self.root.glob("v[0-9]*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        (self.root / f".{LATEST}.tmp").write_text(name)  # the cache reads like a published directory
        (self.root / f".{LATEST}.tmp").replace(self.root / LATEST)
        return name

    def _verified(self, path: Path, manifest: dict, only: tuple[str, ...] | None = None) -> bool:
        for f, digest in manifest["checksums"].items():
            if (only is None or f in only) and sha256(path / f) != digest:
                log.warning("version %s: checksum mismatch on %s; keeping %s", path.name, f, self.version)
                return False
        return True

    def _index(self, name: str, manifest: dict) -> LayeredIndex | None:
        """The version's index: the served one's base and overlay plus the new segments when it
        extends the served chain, else its base read from disk plus all its segments."""
        base, segments = _chain(manifest, name)
        cur = self._current
        cur_base, cur_segments = _chain(cur.manifest, cur.manifest["name"]) if cur else (None, [])
        if cur is not None and cur_base == base and segments[:len(cur_segments)] == cur_segments:
            index, todo = cur.published.derive(), segments[len(cur_segments):]
        else:
            base_dir = self.root / base
            if base != name and not self._verified(base_dir, json.loads((base_dir / MANIFEST).read_text()), (INDEX_FILE, ITEMS_FILE)):
                return None
            cpu = faiss.read_index(str(base_dir / INDEX_FILE))
            gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu) if self._gpu_res is not None else None
            index, todo = LayeredIndex(cpu, np.load(base_dir / ITEMS_FILE), gpu), segments
        for seg in todo:
            seg_dir = self.root / seg
            if seg != name and not self._verified(seg_dir, json.loads((seg_dir / MANIFEST).read_text()), (DELTA_FILE,)):
                return None
            with np.load(seg_dir / DELTA_FILE) as d:
                index.apply(d["ids"], d["vectors"], d["removed"])
        return index

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
            return cur.index.search(q, k)
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
