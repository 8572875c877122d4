"""A serving index made of one immutable base and the delta segments published after it.

Why: a version that rewrites the whole index costs what the catalogue holds, not what
changed (at 10M x 64 the write alone is seconds). So a version is the last base plus
delta segments, each holding the vectors upserted and the ids removed since the version
before it. A reader keeps the base it loaded and answers from two levels: the base, with
the ids a segment replaced or removed hidden, and a small overlay of the upserted vectors.
A new version reuses the previous one's base object and copies only the overlay, so a
swap costs the segments, never the base. The publisher rebuilds a base on a slower
cadence (`publish.rebase_every`, or when the overlay outgrows `publish.rebase_fraction`
of the catalogue).

The interface is the part of `faiss.Index` that serving uses (search with an optional
`SearchParameters` selector, reconstruct, add_with_ids, remove_ids, ntotal), so callers do
not care how many levels a version has.
"""
from __future__ import annotations

import faiss
import numpy as np


def find_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Where each of `ids` is in `sorted_ids`, or -1 (O(k log n): no pass over the sorted array)."""
    ids = np.asarray(ids, np.int64)
    if not len(sorted_ids):
        return np.full(len(ids), -1, np.int64)
    pos = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


def changed_rows(last_ids: np.ndarray, last_rows: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which of `ids` are new against the sorted `last_ids`, or have another row than they had there."""
    pos = find_sorted(last_ids, ids)
    known = pos >= 0
    changed = ~known
    changed[known] = (last_rows[pos[known]] != rows[known]).any(1)
    return changed


def _member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return find_sorted(sorted_ids, ids) >= 0


GPU_MAX_K = 2048  # the most results faiss's GPU indexes return per query


def _flat(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class LayeredIndex:
    def __init__(self, base: faiss.Index, base_ids: np.ndarray, base_gpu: faiss.Index | None = None):
        """base: an IndexIDMap2 (never modified here) whose ids are `base_ids` (sorted int64)."""
        self.base, self.base_ids, self.base_gpu = base, np.asarray(base_ids, np.int64), base_gpu
        self.d = base.d
        self.overlay = _flat(self.d)
        self.hidden = np.zeros(0, np.int64)  # sorted base ids that a segment replaced or removed
        self._hide_sel = None

    # ---- versions --------------------------------------------------------------------------
    def derive(self) -> "LayeredIndex":
        """The next version's index: the same base object, a copy of the overlay (O(overlay))."""
        out = LayeredIndex(self.base, self.base_ids, self.base_gpu)
        out.overlay = faiss.clone_index(self.overlay)
        out.hidden, out._hide_sel = self.hidden, self._hide_sel  # replaced, never changed in place, by remove_ids
        return out

    def apply(self, upsert_ids: np.ndarray, upsert_vecs: np.ndarray, removed: np.ndarray) -> None:
        """One delta segment: upserts replace any earlier vector of the same id; removals drop it."""
        upsert_ids, removed = np.asarray(upsert_ids, np.int64), np.asarray(removed, np.int64)
        self.remove_ids(np.concatenate([upsert_ids, removed]))
        if len(upsert_ids):
            self.overlay.add_with_ids(np.ascontiguousarray(upsert_vecs, np.float32), upsert_ids)

    # ---- the faiss.Index surface -----------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self.base.ntotal - len(self.hidden) + self.overlay.ntotal

    def remove_ids(self, ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(ids, np.int64))
        if not len(ids):
            return
        self.overlay.remove_ids(ids)
        in_base = ids[_member(self.base_ids, ids)]
        if len(in_base):
            self.hidden = np.union1d(self.hidden, in_base)
            batch = faiss.IDSelectorBatch(self.hidden)  # built here, with the version: not on a request
            self._hide_sel = (faiss.IDSelectorNot(batch), batch)  # keep the inner selector alive

    def add_with_ids(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        self.apply(ids, vecs, np.zeros(0, np.int64))

    def reconstruct(self, item_id: int) -> np.ndarray:
        """The vector of one id; RuntimeError when this version does not hold it (as faiss)."""
        try:
            return self.overlay.reconstruct(int(item_id))
        except RuntimeError:
            pass
        if _member(self.hidden, np.array([item_id], np.int64))[0]:
            raise RuntimeError(f"id {item_id} was removed")
        return self.base.reconstruct(int(item_id))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` this version serves (O(len(ids) log catalogue))."""
        ids = np.asarray(ids, np.int64)
        overlay = np.isin(ids, faiss.vector_to_array(self.overlay.id_map)) if self.overlay.ntotal else np.zeros(len(ids), bool)
        return overlay | (_member(self.base_ids, ids) & ~_member(self.hidden, ids))

    def ids(self) -> np.ndarray:
        """Every id this version serves, sorted (O(catalogue): for evaluation and tests, not per request)."""
        overlay = faiss.vector_to_array(self.overlay.id_map) if self.overlay.ntotal else np.zeros(0, np.int64)
        return np.union1d(np.setdiff1d(self.base_ids, self.hidden, assume_unique=True), overlay)

    def search(self, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top k over both levels; -1 pads, like faiss. `params.sel` restricts both levels."""
        q = np.ascontiguousarray(queries, np.float32)
        caller = params.sel if params is not None else None
        if caller is None and self.base_gpu is not None and k + len(self.hidden) <= GPU_MAX_K:
            # the GPU copy takes no selector: ask it for enough to drop the hidden ids afterwards
            s1, i1 = self.base_gpu.search(q, k + len(self.hidden))
            gone = _member(self.hidden, i1.ravel()).reshape(i1.shape)
            keep = np.argsort(gone, axis=1, kind="stable")[:, :k]
            s1, i1 = np.take_along_axis(s1, keep, 1), np.where(np.take_along_axis(gone, keep, 1), -1, np.take_along_axis(i1, keep, 1))
        else:
            sel = self._base_selector(caller)
            s1, i1 = self.base.search(q, k, params=self._params(self.base, sel)) if sel is not None else self.base.search(q, k)
        if self.overlay.ntotal == 0:
            return s1, i1
        s2, i2 = self.overlay.search(q, k, params=params) if caller is not None else self.overlay.search(q, k)
        scores, ids = np.concatenate([s1, s2], 1), np.concatenate([i1, i2], 1)
        scores = np.where(ids < 0, -np.inf, scores)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        return np.where(ids < 0, -np.finfo(np.float32).max, scores).astype(np.float32), ids

    @staticmethod
    def _params(index: faiss.Index, sel) -> faiss.SearchParameters:
        """A selector for `index`: an IVF index takes only IVF parameters (keeping its own nprobe)."""
        ivf = faiss.try_extract_index_ivf(index)
        return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe) if ivf is not None else faiss.SearchParameters(sel=sel)

    def _base_selector(self, caller):
        if not len(self.hidden):
            return caller
        hide = self._hide_sel[0]
        if caller is None:
            return hide
        both = faiss.IDSelectorAnd(caller, hide)
        return both
