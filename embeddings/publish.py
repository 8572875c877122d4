"""Publishing item vectors as versions of a FAISS serving index.

A version is a directory `v000007/` holding the index (ids are item ids), the user
vectors the serving side scores with, and `manifest.json` (version, step, wall time,
Kafka offsets, sha256 of every file). It is written under a temporary name and
renamed into place, then `LATEST` is replaced atomically: a reader sees a whole
version or none. Only the newest `keep` versions stay on disk. A temporary directory
left by a crash is removed by the next publish. Versions never go backwards: weights
older (by training step), or Kafka offsets lower, than the latest version's are not
published.

`COLDSTREAM_CRASH_PUBLISH=N` makes the process exit just before version N is renamed
into place (once: the retry finds the leftover): the fault the chaos benchmark injects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

log = logging.getLogger(__name__)
INDEX_FILE, ITEMS_FILE, USERS_FILE, MANIFEST, LATEST = "items.faiss", "item_ids.npy", "users.npz", "manifest.json", "LATEST"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("v[0-9]*") if p.is_dir())


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str) -> faiss.Index:
    """Inner-product index over unit vectors (cosine); ids are the item ids themselves."""
    base = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained:
        base.train(vectors)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
    return index


@dataclass
class Published:
    version: int
    path: Path
    manifest: dict


class IndexPublisher:
    def __init__(self, root: str | Path, keep: int = 3, factory: str = "Flat"):
        self.root = Path(root)
        self.keep, self.factory = keep, factory
        self.root.mkdir(parents=True, exist_ok=True)

    def next_version(self) -> int:
        dirs = version_dirs(self.root)
        return int(dirs[-1].name[1:]) + 1 if dirs else 1

    def latest_manifest(self) -> dict:
        dirs = version_dirs(self.root)
        if not dirs:
            return {}
        try:
            return json.loads((dirs[-1] / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _older(self, info: dict) -> str | None:
        """Why `info` is older than the latest version, or None."""
        last = self.latest_manifest()
        if "step" in last and info.get("step", last["step"]) < last["step"]:
            return f"step {info.get('step')} < step {last['step']}"
        for topic, parts in info.get("kafka_offsets", {}).items():
            for part, offset in parts.items():
                before = last.get("kafka_offsets", {}).get(topic, {}).get(part)
                if before is not None and offset < before:
                    return f"{topic}[{part}] offset {offset} < {before}"
        return None

    def publish(self, item_ids: np.ndarray, item_vecs: np.ndarray, user_ids: np.ndarray, user_vecs: np.ndarray,
                info: dict, extra: dict[str, Callable[[Path], None]] | None = None) -> Published | None:
        """Writes the next version; None (and a logged reason) when `info` is older than the latest's
        (after a restore from a checkpoint older than the last publication). `extra` maps more
        file names to functions that write them (the MEMER mapping, early-stage vectors); they are
        checksummed like the index."""
        why = self._older(info)
        if why:
            log.warning("not publishing: version %s is newer (%s)", self.next_version() - 1, why)
            return None
        leftovers = list(self.root.glob(".tmp-v*"))
        for stale in leftovers:  # a crash mid-publish left it; only one publisher writes here
            shutil.rmtree(stale, ignore_errors=True)
        version = self.next_version()
        tmp = self.root / f".tmp-v{version:06d}-{os.getpid()}"
        tmp.mkdir()
        faiss.write_index(build_index(item_vecs, item_ids, self.factory), str(tmp / INDEX_FILE))
        np.save(tmp / ITEMS_FILE, item_ids.astype(np.int64))
        np.savez(tmp / USERS_FILE, ids=user_ids.astype(np.int64), vectors=user_vecs.astype(np.float32))
        for name, write in (extra or {}).items():
            write(tmp / name)
        manifest = {
            "version": version,
            "wall_time": time.time(),
            "n_items": int(len(item_ids)),
            "n_users": int(len(user_ids)),
            "dim": int(item_vecs.shape[1]),
            "index_factory": self.factory,
            **info,
            "checksums": {f: sha256(tmp / f) for f in (INDEX_FILE, ITEMS_FILE, USERS_FILE, *(extra or {}))},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = self.root / f"v{version:06d}"
        if os.environ.get("COLDSTREAM_CRASH_PUBLISH") == str(version) and not leftovers:  # once: the retry goes through
            log.error("COLDSTREAM_CRASH_PUBLISH=%d: exiting before the rename", version)
            os._exit(1)
        os.rename(tmp, final)
        latest_tmp = self.root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, self.root / LATEST)
        for old in version_dirs(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return Published(version, final, manifest)
