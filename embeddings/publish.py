"""Publishing item vectors as versions of a FAISS serving index.

A version is a directory `v000007/` holding the user vectors the serving side scores
with, `manifest.json` (version, step, wall time, Kafka offsets, sha256 of every file),
and the items in one of two forms:
- a base: the whole index (`items.faiss`, ids are item ids) and its sorted ids;
- a delta segment (`delta.npz`): the vectors upserted and the ids removed since the
  version before it. Its manifest names its base and the chain of segments since then,
  so a reader applies only the segments it has not seen (see `embeddings/layered.py`).
`publish` diffs the catalogue against the last version it wrote and writes a segment when
little changed; `publish_delta` takes the change itself, for callers that know it (the
trainer), and costs what changed even at 10M items: the publisher keeps the catalogue and
folds the changes in only when it writes a base. A base is rebuilt every `rebase_every` versions, or
when the segments since it hold more than `rebase_fraction` of the catalogue.
Files are fsynced, written under a temporary name and renamed into place, then `LATEST`
is replaced atomically: a reader sees a whole version or none. The newest `keep`
versions stay on disk, with the base and segments they are built on. A temporary directory
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
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from embeddings.layered import changed_rows, find_sorted
from streaming import storage

log = logging.getLogger(__name__)
INDEX_FILE, ITEMS_FILE, USERS_FILE, MANIFEST, LATEST = "items.faiss", "item_ids.npy", "users.npz", "manifest.json", "LATEST"
DELTA_FILE = "delta.npz"
NAMES_FILE = "names.json"  # key -> raw id of the string ids among the items and users (integer ids are their own keys)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("v[0-9]*") if p.is_dir())


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str, search_params: str = "") -> faiss.Index:
    """Inner-product index over unit vectors (cosine); ids are the item ids themselves.
    `search_params` (e.g. "nprobe=16") are set on the index and saved with it. An IVF index gets
    its direct map, so that serving can reconstruct an item's vector (/similar)."""
    base = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained:
        base.train(vectors)
    if search_params:
        faiss.ParameterSpace().set_index_parameters(base, search_params)
    if (ivf := faiss.try_extract_index_ivf(base)) is not None:
        ivf.make_direct_map()
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
    return index


@dataclass
class Published:
    version: int
    path: Path
    manifest: dict


class Catalogue:
    """The last published (ids, vectors), kept so that a change can be published without the
    caller holding the whole catalogue. A change is recorded in O(change) (a delta at 10M items
    must not copy 2.5 GB); it is folded into sorted arrays only when a base is written or a whole
    catalogue is diffed against it, which cost O(catalogue) anyway."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray):
        self._ids, self._vecs = ids, vecs  # sorted
        self._upserts: dict[int, np.ndarray] = {}
        self._removed: set[int] = set()

    def apply(self, upsert_ids: np.ndarray, upsert_vecs: np.ndarray, removed_ids: np.ndarray) -> None:
        for i in np.asarray(removed_ids, np.int64).tolist():
            self._upserts.pop(i, None)
            self._removed.add(i)
        for i, v in zip(np.asarray(upsert_ids, np.int64).tolist(), upsert_vecs):
            self._upserts[i] = v
            self._removed.discard(i)

    def __len__(self) -> int:
        new = int((find_sorted(self._ids, np.fromiter(self._upserts, np.int64, len(self._upserts))) < 0).sum())
        return len(self._ids) + new - int((find_sorted(self._ids, np.fromiter(self._removed, np.int64, len(self._removed))) >= 0).sum())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids, vectors), with every recorded change folded in."""
        if self._upserts or self._removed:
            up = np.fromiter(self._upserts, np.int64, len(self._upserts))
            up_vecs = np.stack(list(self._upserts.values())) if len(up) else self._vecs[:0]
            gone = np.zeros(len(self._ids), bool)
            at = find_sorted(self._ids, np.concatenate([up, np.fromiter(self._removed, np.int64, len(self._removed))]))
            gone[at[at >= 0]] = True
            ids, vecs = np.concatenate([self._ids[~gone], up]), np.concatenate([self._vecs[~gone], up_vecs])
            order = np.argsort(ids, kind="stable")
            self._ids, self._vecs, self._upserts, self._removed = ids[order], vecs[order], {}, set()
        return self._ids, self._vecs


class IndexPublisher:
    def __init__(self, root: str | Path, keep: int = 3, factory: str = "Flat", rebase_every: int = 10,
                 rebase_fraction: float = 0.2, cache: Path | None = None, search_params: str = ""):
        """root: a local directory, or an object-store prefix (s3://...): then each version is
        written in `cache` as locally, uploaded file by file (the manifest last), and LATEST is
        replaced last, so a reader never follows it to a version that is not whole."""
        self.remote = str(root) if storage.is_remote(root) else None
        self.root = Path(cache or tempfile.mkdtemp(prefix="coldstream-index-")) if self.remote else Path(root)
        if self.remote and cache is None:  # a cache of our own making goes with us
            weakref.finalize(self, shutil.rmtree, self.root, True)
        if self.remote:
            self._adopt_remote_latest()
        self.keep, self.factory, self.search_params = keep, factory, search_params
        self.rebase_every, self.rebase_fraction = rebase_every, rebase_fraction
        self.root.mkdir(parents=True, exist_ok=True)
        # what this process last wrote: a delta needs a base it wrote itself (after a restart, a base comes first)
        self._base: str | None = None
        self._segments: list[str] = []
        self._since_base = 0  # rows upserted or removed since the base
        self._base_rows = 0
        self._last: Catalogue | None = None  # the last version's items, for diffs and for bases built from deltas

    def _adopt_remote_latest(self) -> None:
        """Numbers continue after the store's newest version, and its step and offsets stay the floor."""
        try:
            name = storage.read_bytes(storage.join(self.remote, LATEST)).decode().strip()
            manifest = storage.read_bytes(storage.join(self.remote, name, MANIFEST))
        except (FileNotFoundError, OSError):
            return
        if not (self.root / name).exists():
            (self.root / name).mkdir(parents=True)
            (self.root / name / MANIFEST).write_bytes(manifest)

    def _upload(self, final: Path, needed: set[str]) -> None:
        for f in sorted(final.iterdir(), key=lambda f: f.name == MANIFEST):
            storage.put_file(f, storage.join(self.remote, final.name, f.name))
        storage.write_bytes(storage.join(self.remote, LATEST), final.name.encode())
        for name in storage.list_names(self.remote):
            if name.startswith("v") and name[1:].isdigit() and name not in needed:
                storage.delete_dir(storage.join(self.remote, name))

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
        """Publishes the whole catalogue: a delta segment of what changed since the last version
        when that is small, else a new base. None (and a logged reason) when `info` is older than
        the latest version's (after a restore from a checkpoint older than the last publication).
        `extra` maps more file names to functions that write them (the MEMER mapping,
        early-stage vectors); they are checksummed like the index."""
        ids, vecs = np.asarray(item_ids, np.int64), np.asarray(item_vecs, np.float32)
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            order = np.argsort(ids, kind="stable")
            ids, vecs = ids[order], vecs[order]
        else:  # already sorted (the trainer's case): one copy, kept for the next diff
            ids, vecs = ids.copy(), np.array(vecs, copy=True, order="C")
        if self._last is None or self._base is None:
            return self._commit(Catalogue(ids, vecs), info, user_ids, user_vecs, extra)
        last_ids, last_vecs = self._last.arrays()
        changed = changed_rows(last_ids, last_vecs, ids, vecs)
        removed = np.setdiff1d(last_ids, ids, assume_unique=True)
        return self._commit(Catalogue(ids, vecs), info, user_ids, user_vecs, extra, (ids[changed], vecs[changed], removed))

    def publish_delta(self, upsert_ids: np.ndarray, upsert_vecs: np.ndarray, removed_ids: np.ndarray, user_ids: np.ndarray,
                      user_vecs: np.ndarray, info: dict, extra: dict[str, Callable[[Path], None]] | None = None) -> Published | None:
        """Publishes a change: `upsert_ids` (new, or with new vectors) and `removed_ids`, on top of
        the last version this publisher wrote, which must exist (a base comes first). The change is
        applied to the catalogue the publisher keeps; when a base is due, the base is written instead."""
        if self._base is None or self._last is None:
            raise RuntimeError("publish_delta needs a base written by this publisher first: call publish()")
        change = (np.asarray(upsert_ids, np.int64), np.ascontiguousarray(upsert_vecs, np.float32), np.asarray(removed_ids, np.int64))
        catalogue = self._last
        catalogue.apply(*change)
        return self._commit(catalogue, info, user_ids, user_vecs, extra, change)

    @property
    def takes_deltas(self) -> bool:
        """Whether `publish_delta` may be called: this publisher wrote the last version."""
        return self._base is not None and self._last is not None

    def _commit(self, catalogue: Catalogue, info: dict, user_ids: np.ndarray, user_vecs: np.ndarray,
                extra: dict[str, Callable[[Path], None]] | None,
                change: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Published | None:
        """Writes `change` as a delta segment, or the whole catalogue as a base when there is no
        change to write (first version) or a base is due."""
        if change is not None and not self._rebase_due(len(change[0]) + len(change[2]), len(catalogue)):
            out = self._write(info, user_ids, user_vecs, extra, delta=change)
        else:
            out = self._write(info, user_ids, user_vecs, extra, base=catalogue.arrays())
        # a refused write (older than the latest version) leaves no catalogue: the next publication is whole
        self._last = catalogue if out is not None else None
        return out

    def _rebase_due(self, changed_rows: int, catalogue: int) -> bool:
        return (len(self._segments) + 1 >= self.rebase_every
                or self._since_base + changed_rows > self.rebase_fraction * max(catalogue, 1))

    def _write(self, info: dict, user_ids: np.ndarray, user_vecs: np.ndarray, extra: dict[str, Callable[[Path], None]] | None,
               base: tuple[np.ndarray, np.ndarray] | None = None,
               delta: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Published | None:
        why = self._older(info)
        if why:
            log.warning("not publishing: version %s is newer (%s)", self.next_version() - 1, why)
            return None
        leftovers = list(self.root.glob(".tmp-v*"))
        for stale in leftovers:  # a crash mid-publish left it; only one publisher writes here
            shutil.rmtree(stale, ignore_errors=True)
        version = self.next_version()
        name = f"v{version:06d}"
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        if base is not None:
            ids, vecs = base
            faiss.write_index(build_index(vecs, ids, self.factory, self.search_params), str(tmp / INDEX_FILE))
            np.save(tmp / ITEMS_FILE, ids)
            files = [INDEX_FILE, ITEMS_FILE]
            layout = {"n_items": int(len(ids)), "dim": int(vecs.shape[1]) if vecs.ndim == 2 else 0}
        else:
            up_ids, up_vecs, removed = delta
            np.savez(tmp / DELTA_FILE, ids=up_ids, vectors=up_vecs, removed=removed)
            files = [DELTA_FILE]
            layout = {"base": self._base, "segments": [*self._segments, name], "n_upserted": int(len(up_ids)),
                      "n_removed": int(len(removed)), "dim": int(up_vecs.shape[1]) if up_vecs.ndim == 2 else 0}
        np.savez(tmp / USERS_FILE, ids=user_ids.astype(np.int64), vectors=user_vecs.astype(np.float32))
        for fname, write in (extra or {}).items():
            write(tmp / fname)
        files += [USERS_FILE, *(extra or {})]
        manifest = {
            "version": version,
            "wall_time": time.time(),
            "n_users": int(len(user_ids)),
            "index_factory": self.factory,
            **layout,
            **info,
            "checksums": {f: sha256(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in (*files, MANIFEST):
            _fsync(tmp / f)
        final = self.root / name
        if os.environ.get("COLDSTREAM_CRASH_PUBLISH") == str(version) and not leftovers:  # once: the retry goes through
            log.error("COLDSTREAM_CRASH_PUBLISH=%d: exiting before the rename", version)
            os._exit(1)
        os.rename(tmp, final)
        latest_tmp = self.root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name)
        _fsync(latest_tmp)
        os.replace(latest_tmp, self.root / LATEST)
        _fsync(self.root)
        needed = self._prune()
        if self.remote:
            self._upload(final, needed)  # first: a version the store lacks must not become the base of later deltas
        if base is not None:
            self._base, self._segments, self._since_base, self._base_rows = name, [], 0, len(base[0])
        else:
            self._segments.append(name)
            self._since_base += len(delta[0]) + len(delta[2])
        return Published(version, final, manifest)

    def _prune(self) -> set[str]:
        """Keeps the newest `keep` versions and every base and segment they are built on; returns their names."""
        dirs = version_dirs(self.root)
        needed = {d.name for d in dirs[-self.keep:]}
        for d in dirs[-self.keep:]:
            try:
                m = json.loads((d / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if m.get("base"):
                needed |= {m["base"], *m["segments"]}
        for old in dirs:
            if old.name not in needed:
                shutil.rmtree(old, ignore_errors=True)
        return needed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
